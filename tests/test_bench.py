"""The benches run to their last lines, the verdicts (slow: they start processes, train and decode). A bench
that dies after printing its table hides that its verdict is missing; bench/machine_class.py runs
`experiment=smoke`, bench/train.py and bench/decode.py and reads every verdict line of theirs."""
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_machine_class_runs_every_bench_and_reads_their_verdicts(tmp_path):
    proc = subprocess.run([sys.executable, "bench/machine_class.py", "--demo", "--rounds", "1", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("machine: CPU")  # the machine comes first
    row = re.search(r"\n\| (.+) \| ([\d.]+) s \| ([\d.]+)× \((\d+)% of peak\) \| ([\d.]+)× \((\w+); "
                    r"forced ([\d.]+)×\) \| ([\d.]+)× \|\n", out)
    assert row, out
    assert float(row.group(2)) > 0 and float(row.group(3)) > 0 and float(row.group(8)) > 0
    assert "precision 32 (d_model 64 < 128" in out  # auto keeps model=tiny in fp32, and the smoke run says so
    for case in ("greedy", "greedy forced 5", "beam5", "beam5 forced 5"):
        line = re.search(rf"\n{case}: seq2seq \w+ = (.+); auto \(\w+\) / fastest \(\w+\) = \d+\.\d\dx\n", out)
        assert line and "x CT2 int8" in line.group(1), out
        assert ("x Marian" in line.group(1)) == ("forced" in case)  # Marian's weights are random: forced rows only
    versus = re.search(r"\nhead to head with CT2 int8, alternating passes, median \(range\) of 2 rounds: (.+)\n", out)
    assert versus, out
    for case in ("greedy", "greedy forced 5", "beam5", "beam5 forced 5"):
        median, low, high = map(float, re.search(rf"(?:^|, ){case} ([\d.]+)x \(([\d.]+)-([\d.]+)\)",
                                                  versus.group(1)).groups())
        assert 0 < low <= median <= high
    assert (tmp_path / "headline.md").read_text(encoding="utf-8") in out
    for log in ("smoke.log", "train.log", "decode.log", "head_to_head.log"):
        assert (tmp_path / log).stat().st_size > 0


@pytest.mark.slow
def test_the_gpu_check_script_runs_every_step_in_its_cpu_rehearsal(tmp_path):
    """bench/gpu_check.sh runs where a GPU is lent, for a few minutes a session at most: REHEARSE=1 runs each of
    its steps on the CPU at toy sizes, so that a broken step shows here and not on the GPU's clock."""
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(["bash", "bench/gpu_check.sh", str(tmp_path / "work")], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "REHEARSE": "1", "OUT": str(out)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "gpu_check.log").read_text(encoding="utf-8")  # all of the output, kept where $OUT is
    assert log.startswith("rehearsal: every step on the CPU") and "\nmachine: CPU" in log
    assert re.search(r"\nsmoke on the GPU: [\d,]+ tokens/s, 600 steps in [\d.]+ s, test BLEU [\d.]+; "
                     r"3 validations took [\d.]+ s \(\d+% of training\)\n", log), log
    assert re.search(r"\nGPU and CPU agree on (\d+) of \1 lines\n", log), log
    assert re.search(r"\nbest seq2seq \(seq2seq \w+\) / best Marian \(Marian \w+ \w+\): [\d.]+x\n", log), log
    assert re.search(r"\nbeam5 forced 20: best seq2seq \(.+\) / Marian \(.+\) = [\d.]+x", log), log
    assert re.search(r"\nGPU-style \d+ sentences/s, CPU-style \d+; same output: True\n", log), log
    assert re.search(r"\ngpu_check: done in \d+ s\n$", log), log
