"""The benches run to their last lines, the verdicts (slow: they start processes, train and decode). A bench
that dies after printing its table hides that its verdict is missing; bench/machine_class.py runs
`experiment=smoke`, bench/train.py and bench/decode.py and reads every verdict line of theirs. bench/ab.py's swap
of a function between a git revision and the working tree is checked in-process (fast)."""
import importlib.util
import inspect
import os
import re
import subprocess
import sys

import pytest
import torch

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


# bench/train.py's last line: our best row against Marian's best
TRAIN_VERDICT = r"\nbest seq2seq \(seq2seq \w+\) / best Marian \(Marian \w+ \w+\): [\d.]+x\n"

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
    assert re.search(TRAIN_VERDICT, log), log
    assert re.search(r"\nbeam5 forced 20: best seq2seq \(.+\) / Marian \(.+\) = [\d.]+x", log), log
    assert re.search(r"\nGPU-style \d+ sentences/s, CPU-style \d+; same output: True\n", log), log
    assert re.search(r"\ngpu_check: done in \d+ s\n$", log), log


@pytest.mark.slow
def test_the_gpu_check_runs_every_step_after_one_fails_and_lists_the_failures(tmp_path):
    """A lent GPU's minutes come once: a step that fails must not cost the figures of the steps after it. Here
    training cannot write its run folder (a file stands in its place), so the steps that need its checkpoint fail
    too, with one line; the GPU tests and the training speed still run, and the script ends with the list and exit 1."""
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    (work / "smoke").write_text("not a folder")
    proc = subprocess.run(["bash", "bench/gpu_check.sh", str(work)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "REHEARSE": "1", "OUT": str(out)})
    log = (out / "gpu_check.log").read_text(encoding="utf-8")
    assert proc.returncode == 1, log[-3000:]
    failed = ["2. train experiment=smoke on the GPU",
              "3. GPU and CPU translations of the same checkpoint (greedy, fp32)",
              "5. decoding speed on the GPU, side by side with HF Marian",
              "6. the CPU's cache blocking on the GPU, A/B: beam 5, 2,000 lines, 16,384-token batches"]
    listing = "".join(f"  {re.escape(title)}\n" for title in failed)
    assert re.search(r"\ngpu_check: 4 of 6 steps failed, in \d+ s:\n" + listing + "$", log), log[-2000:]
    assert f"\nerror: {work / 'smoke' / 'checkpoints' / 'best.ckpt'}: checkpoint not found\n" in log
    assert re.search(TRAIN_VERDICT, log), log  # step 4 ran


def test_batch_size_bench_prints_every_batch_size_at_every_precision(smoke_run, tmp_path):
    (tmp_path / "test.en").write_text("a cat .\nthe dog sat .\ntea .\nhe runs .\nshe is here .\n", encoding="utf-8")
    ckpt = str(smoke_run / "checkpoints" / "best.ckpt")
    proc = subprocess.run([sys.executable, "bench/batch_size.py", "--ckpt", ckpt,
                           "--data-url", str(tmp_path), "--lines", "5", "--largest", "4", "--beam-size", "3",
                           "--rounds", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("machine: CPU") and "\nauto decodes at 32 here: d_model 64 < 128" in out
    header = re.search(r"\n\| search \| n \| rows a step \| 32((?: \| \w+)*) \|", out)
    assert header, out
    n_precisions = 1 + header.group(1).count("|")  # 32 and the others; each other has its ratio to 32 too
    rows = re.findall(r"\n\| (greedy|beam 3) \| (\d+) \| (\d+) \|((?: [\d.]+x? \|)+)", out)
    assert [(s, int(n), int(r)) for s, n, r, _ in rows] == [("greedy", 1, 1), ("greedy", 2, 2), ("greedy", 4, 4),
                                                            ("beam 3", 1, 3), ("beam 3", 2, 6), ("beam 3", 4, 12)]
    for *_, cells in rows:
        values = cells.strip(" |").split(" | ")
        assert len(values) == 2 * n_precisions - 1 and all(float(v.rstrip("x")) > 0 for v in values)


def load_ab():
    spec = importlib.util.spec_from_file_location("bench_ab", ROOT / "bench" / "ab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ab_swaps_the_function_everywhere_seq2seq_looks_it_up():
    """bench/ab.py times a git revision's version of a function against the working tree's: the swap must reach
    the modules that imported the function by name, keep a staticmethod a staticmethod, and put B back."""
    import seq2seq.loss
    import seq2seq.search
    import seq2seq.translator

    ab = load_ab()
    live = seq2seq.search.search_batch
    impl = ab.swapper("seq2seq.search:search_batch", "HEAD")
    impl("A")
    try:
        assert seq2seq.search.search_batch is not live and seq2seq.translator.search_batch is not live
        assert seq2seq.translator.search_batch.__code__.co_filename == "HEAD:seq2seq/search.py"
    finally:
        impl("B")
    assert seq2seq.search.search_batch is live and seq2seq.translator.search_batch is live

    cls = seq2seq.loss.FusedProjectionCrossEntropy
    impl = ab.swapper("seq2seq.loss:FusedProjectionCrossEntropy.forward", "HEAD")
    impl("A")
    try:
        swapped = inspect.getattr_static(cls, "forward")
        assert isinstance(swapped, staticmethod) and swapped.__func__.__code__.co_filename == "HEAD:seq2seq/loss.py"
    finally:
        impl("B")
    assert inspect.getattr_static(cls, "forward").__func__.__code__.co_filename.endswith("seq2seq/loss.py")


@pytest.mark.parametrize("target, message", [
    ("seq2seq.search", "expected MODULE:FUNCTION"),
    ("seq2seq.search:no_such_function", "seq2seq.search has no no_such_function"),
    ("seq2seq.no_such_module:f", "No module named 'seq2seq.no_such_module'"),
])
def test_ab_names_what_it_cannot_compare(target, message):
    ab = load_ab()
    with pytest.raises(ab.ABError, match=re.escape(message)):
        ab.swapper(target, "HEAD")


def test_ab_times_a_method_new_to_a_class_against_what_the_class_inherited(monkeypatch):
    import seq2seq.int8
    from seq2seq.model import Transformer
    ab = load_ab()
    revision = type(sys)("seq2seq.int8@old")
    revision.Int8Transformer = type("Int8Transformer", (Transformer,), {})  # no encode of its own yet
    monkeypatch.setattr(ab, "module_at_revision", lambda module_name, rev: revision)
    compiled_encode = seq2seq.int8.Int8Transformer.encode
    use = ab.swapper("seq2seq.int8:Int8Transformer.encode", "old")
    use("A")
    assert seq2seq.int8.Int8Transformer.encode is Transformer.encode
    use("B")
    assert seq2seq.int8.Int8Transformer.encode is compiled_encode
    with pytest.raises(ab.ABError, match="has no no_such_function"):  # a module's function still must exist
        ab.swapper("seq2seq.search:no_such_function", "HEAD")


def test_ab_lets_a_revisions_method_call_super_on_the_live_class():
    """A method compiled in the revision's own class finds that class in its super(); the live objects are no
    instance of it, so the swapped-in method is rebound to the live class."""
    ab = load_ab()

    class Base:
        def name(self):
            return "base"

    class Live(Base):
        def name(self):
            return "live"

    class Revision(Base):  # what module_at_revision builds: a class of the same name, not the same class
        def name(self):
            return "revision of " + super().name()

    with pytest.raises(TypeError):
        Revision.name(Live())
    assert ab.bound_to_class(vars(Revision)["name"], Live)(Live()) == "revision of base"


def test_ab_gives_torchscript_the_revisions_source():
    """int8's compiled() runs a function eager where TorchScript finds no source: a revision's functions must
    compile as the working tree's do, or A is timed eager against a compiled B."""
    ab = load_ab()
    revision = ab.module_at_revision("seq2seq.int8", "HEAD")
    assert "def packed_linear" in inspect.getsource(revision.packed_linear)
    assert isinstance(revision.compiled(revision.packed_linear), torch.jit.ScriptFunction)


def test_ab_names_a_revision_git_does_not_know():
    ab = load_ab()
    with pytest.raises(ab.ABError, match="no_such_revision"):
        ab.swapper("seq2seq.search:search_batch", "no_such_revision")


def test_ab_forces_the_length_it_is_given_and_refuses_one_step():
    """--forced-len L means L - 1 tokens and then eos: L = 1 would leave no token to time."""
    ab = load_ab()
    with pytest.raises(SystemExit):
        ab.parse_args(["seq2seq.search:search_batch", "--task", "decode", "--ckpt", "c", "--src", "s",
                       "--forced-len", "1"])
    forced = ab.decode_settings(ab.parse_args(["seq2seq.search:search_batch", "--task", "decode", "--ckpt", "c",
                                               "--src", "s", "--forced-len", "4"]))
    assert (forced["max_len_a"], forced["max_len_b"], forced["min_len"]) == (0, 3, 3)  # 3 tokens, then eos


def test_ab_decodes_and_trains_in_alternating_rounds(smoke_run, tmp_path, data_dir):
    (tmp_path / "test.en").write_text("a cat .\nthe dog sat .\ntea .\nhe runs .\nshe is here .\n", encoding="utf-8")
    ckpt = str(smoke_run / "checkpoints" / "best.ckpt")
    decode_targets = ["seq2seq.search:top_next_tokens", "seq2seq.search:beam_search"]  # two, swapped together
    runs = {"decode": [*decode_targets, "--task", "decode", "--ckpt", ckpt, "--src", str(tmp_path / "test.en"),
                       "--beam-size", "3", "--forced-len", "4", "--batch-lines", "2"],  # 2 lines a call
            "train": ["seq2seq.loss:FusedProjectionCrossEntropy.forward", "--task", "train", "--data", "demo",
                      "--data-dir", str(data_dir), "--model", "tiny", "--steps", "2"]}
    for task, args in runs.items():
        proc = subprocess.run([sys.executable, "bench/ab.py", *args, "--rounds", "2"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        out = proc.stdout
        assert out.startswith("machine: CPU")
        assert re.search(r"\nA/B time per round: [\d.]+ [\d.]+\n", out), out
        assert re.search(r"\nB is [\d.]+x as fast as A \(median; range [\d.]+-[\d.]+\)\n", out), out
        if task == "decode":  # the same code on both sides: the same translations
            assert f"\n{' '.join(decode_targets)}, decode, 2 alternating rounds;" in out, out
            assert out.endswith("\nsame translation on 5 of 5 lines, scores at most 0.0e+00 apart\n"), out
        else:  # what `auto` trains model=tiny at, on any CPU, and why
            assert "\ntraining precision 32: d_model 64 < 128" in out, out
