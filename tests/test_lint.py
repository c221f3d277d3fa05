"""pyflakes' checks (through ruff) over the whole tree: an undefined name or an unused import in a script that
no test imports, such as a bench, fails here and not at the end of a ten-minute benchmark (slow: a process)."""
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_no_undefined_names_or_unused_imports_anywhere():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F", "--output-format", "concise", "."],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
