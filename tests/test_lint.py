"""ruff over the whole tree, with pyproject.toml's rules: pyflakes' checks, so that an undefined name or an unused
import in a script that no test imports, such as a bench, fails here and not at the end of a ten-minute benchmark;
and no line over 120 characters (slow: a process)."""
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_no_undefined_names_unused_imports_or_long_lines_anywhere():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "."],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
