"""The benches run to their last line, the one that says how `precision=auto` does here (slow: each starts
processes, trains or decodes). A bench that dies after printing its table hides that its verdict is missing."""
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def run_bench(script: str, *args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, f"bench/{script}", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_bench_train_compares_with_marian_and_judges_auto(data_dir):
    out = run_bench("train.py", "--data", "demo", "--data-dir", data_dir, "--model", "tiny", "--steps", 2,
                    "--rounds", 1).stdout
    assert out.startswith("machine: CPU")  # the machine comes first
    assert re.search(r"\nseq2seq fp32 .+\nMarian eager fp32 .+\nMarian sdpa fp32 ", out)
    assert re.search(r"\nbest seq2seq \(seq2seq \w+\) / best Marian \(Marian \w+ \w+\): \d+\.\d\dx\n", out)
    # model=tiny (d_model 64) is narrower than a reduced precision pays for: auto trains it in fp32, measured here
    assert re.search(r"\nprecision=auto trains at 32 here .+ = \d+\.\d\dx$", out.rstrip())


def test_bench_decode_compares_three_decoders_and_judges_auto(smoke_run, data_dir):
    test_split = data_dir / "demo"  # test.en, test.ja of the corpus the smoke run trained on
    out = run_bench("decode.py", "--ckpt", smoke_run / "checkpoints" / "best.ckpt", "--data-url", test_split,
                    "--limit", 16, "--rounds", 1, "--budgets", 512, "--marian-batches", 16, "--forced-len", 5).stdout
    for case in ("greedy", "greedy forced 5", "beam5", "beam5 forced 5"):
        verdict = re.search(rf"\n{case}: best seq2seq \(seq2seq \w+, 512 tok\) / (.+)\n", out).group(1)
        peers = ["CT2 int8"] + (["Marian"] if "forced" in case else [])  # Marian's weights are random
        assert all(re.search(rf"{peer} \(.+?\) = \d+\.\d\dx", verdict) for peer in peers), verdict
        assert re.search(rf"\n{case}: auto \(\w+\) / fastest \(\w+\) = \d+\.\d\dx", out)
