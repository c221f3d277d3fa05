"""Torn, corrupt and malicious checkpoints; non-finite losses; fuzzed translation input; kills and full disks."""
import csv
import pickle
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seq2seq import Seq2SeqError
from seq2seq.checkpoint import load_checkpoint, save_checkpoint
from seq2seq.lit_module import TranslationModule
from seq2seq.train import train
from seq2seq.translator import Translator
from tests.conftest import ROOT, compose_train, messages, run_py


class Payload:
    """Unpickling this would create a file: proof that code ran."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "seq2seq": {}, "x": Payload(str(marker))}, f)
    with pytest.raises(Seq2SeqError, match=r"evil\.ckpt: not a readable checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.slow
def test_truncated_checkpoint_is_one_line_everywhere(smoke_run, tmp_path, data_dir):
    torn = tmp_path / "torn.ckpt"
    data = (smoke_run / "checkpoints" / "best.ckpt").read_bytes()
    torn.write_bytes(data[:len(data) // 2])
    with pytest.raises(Seq2SeqError, match="torn.ckpt: not a readable checkpoint"):
        load_checkpoint(torn)
    proc = run_py("translate", f"ckpt={torn}", input="The cat.\n")
    assert proc.returncode == 1 and proc.stderr.strip().startswith(f"error: {torn}: not a readable checkpoint")
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_py("train", "experiment=smoke", f"data_dir={data_dir}", f"hydra.run.dir={tmp_path}/run",
                  f"ckpt_path={torn}")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(f"error: {torn}: not a readable")


def test_save_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "c.ckpt"
    save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(Seq2SeqError, match="c.ckpt: cannot write \\(No space left on device\\)"):
        save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, path)
    assert torch.load(path, weights_only=True)["state_dict"]["w"].tolist() == [1.0, 1.0]  # the old one, whole
    assert [p.name for p in tmp_path.iterdir()] == ["c.ckpt"]  # no temporary left behind


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_leaves_the_old_file(tmp_path):
    """SIGKILL a process while save_checkpoint is writing a large file: the old checkpoint is intact."""
    path = tmp_path / "last.ckpt"
    save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "seq2seq": {"generation": 1}}, path)
    before = path.read_bytes()
    writer = ("import sys, torch; from seq2seq.checkpoint import save_checkpoint\n"
              "save_checkpoint({'state_dict': {'w': torch.ones(400_000_000, dtype=torch.uint8)},"
              " 'seq2seq': {'generation': 2}}, sys.argv[1])")
    proc = subprocess.Popen([sys.executable, "-c", writer, str(path)])
    tmp = tmp_path / ".last.ckpt.tmp"
    while not (tmp.exists() and tmp.stat().st_size > 0) and proc.poll() is None:  # the event: a write has begun
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the writer finished before it could be killed"
    assert path.read_bytes() == before
    assert load_checkpoint(path)["seq2seq"] == {"generation": 1}


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_checkpoints(tmp_path, data_dir, monkeypatch):
    cfg = compose_train(["experiment=smoke", f"data_dir={data_dir}", f"output_dir={tmp_path}",
                         "trainer.max_steps=60", "trainer.val_check_interval=20", "trainer.enable_progress_bar=false"])
    real_loss = TranslationModule.loss

    def poisoned(self, batch, label_smoothing):
        loss, n = real_loss(self, batch, label_smoothing)
        return (loss * float("nan") if self.training and self.global_step >= 30 else loss), n

    monkeypatch.setattr(TranslationModule, "loss", poisoned)
    with pytest.raises(Seq2SeqError, match="non-finite training loss at step 30 "):
        train(cfg)
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 20
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())


@pytest.fixture(scope="module")
def fuzz_translator(smoke_run):
    return Translator.from_checkpoint(smoke_run / "checkpoints" / "best.ckpt")


LINE = st.one_of(
    st.text(max_size=60),
    st.text(alphabet=st.sampled_from(list("\u200b\u200d\ufeff\x00\x07\x1b\t \u3000😀👍🏽漢字かなカナabc<>/")), max_size=40),
    st.sampled_from(["", " ", "</s>", "<unk>", "<s>", "<pad>", "▁", "\u2028", "\x1c", "a" * 3000]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LINE, min_size=1, max_size=12))
def test_fuzzed_lines_in_equal_lines_out(fuzz_translator, lines):
    lines = [line.replace("\n", " ") for line in lines]  # one line each, as read_input would split them
    out = fuzz_translator.translate_nbest(lines, beam_size=2, max_len_b=5)
    assert len(out) == len(lines)
    for line, hyps in zip(lines, out):
        assert len(hyps) == 1 and isinstance(hyps[0][0], str) and "\n" not in hyps[0][0]
        if not line.split():
            assert hyps[0][0] == ""


def last_validation(run_dir) -> tuple[int, float]:
    """(step, val/loss) of the last validation in the newest CSV log of a run."""
    newest = max((run_dir / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    rows = [r for r in csv.DictReader(open(newest / "metrics.csv")) if r.get("val/loss")]
    return int(rows[-1]["step"]), float(rows[-1]["val/loss"])


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_validation_loss(tmp_path, data_dir):
    """SIGKILL mid-epoch, rerun with ckpt_path=last: the run ends at the same step with the same
    validation loss as an uninterrupted run. Weights, optimizer, LR schedule, data position and the
    dropout RNG all come back, and CPU kernels with the same thread count are deterministic, so the
    two losses are equal; the 1e-6 relative tolerance only allows for printing/parsing the CSV."""


    args = ["train", "experiment=smoke", "trainer.precision=32", "trainer.max_steps=75",
            "trainer.val_check_interval=25", "trainer.enable_progress_bar=false", f"data_dir={data_dir}"]
    straight = run_py(*args, f"hydra.run.dir={tmp_path}/a")
    assert straight.returncode == 0, straight.stderr[-2000:]

    proc = subprocess.Popen([sys.executable, "run.py", *args, f"hydra.run.dir={tmp_path}/b"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "b" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:  # the first validation's checkpoint
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(last)["global_step"]
    assert 25 <= killed_at < 75

    resumed = run_py(*args, f"hydra.run.dir={tmp_path}/b", "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    step_a, loss_a = last_validation(tmp_path / "a")
    step_b, loss_b = last_validation(tmp_path / "b")
    assert step_a == step_b == 74
    assert loss_a == pytest.approx(loss_b, rel=1e-6), (loss_a, loss_b, killed_at)


def test_data_position_survives_a_restart(tiny_cfg):
    """The batches after a restored loader state are the ones an uninterrupted epoch would deal."""
    from seq2seq.corpora import DataConfig
    from seq2seq.datamodule import TranslationDataModule

    datamodule = TranslationDataModule(DataConfig(**tiny_cfg.data), tiny_cfg.data_dir + "/cache", seed=3)
    datamodule.setup()
    straight = datamodule.train_dataloader()
    straight.batch_sampler.sampler.set_epoch(2)
    expected = [batch["ids"].tolist() for batch in straight]
    first = datamodule.train_dataloader()
    first.batch_sampler.sampler.set_epoch(2)
    iterator = iter(first)
    for _ in range(7):
        next(iterator)
    state = first.state_dict()
    assert state == {"epoch": 2, "consumed": 7}
    resumed = datamodule.train_dataloader()  # a new process: epoch not set yet, as in Lightning's restart
    resumed.load_state_dict(state)
    assert [batch["ids"].tolist() for batch in resumed] == expected[7:]
    assert [batch["ids"].tolist() for batch in resumed] == expected  # the next epoch starts from the top


def small_disk(max_bytes: int):
    """preexec_fn: files may grow to max_bytes only (EFBIG, like a full disk, instead of SIGXFSZ)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return limit


def run_limited(args, max_bytes, **kw):
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True,
                          preexec_fn=small_disk(max_bytes), timeout=900, **kw)


@pytest.mark.slow
def test_translate_output_that_cannot_be_written_is_one_line_and_the_input_is_untouched(smoke_run, tmp_path):
    ckpt = f"ckpt={smoke_run}/checkpoints/best.ckpt"
    source = tmp_path / "in.en"
    source.write_text("The cat eats the fish.\nThe dog reads the book.\n")
    before = source.read_bytes()
    (tmp_path / "a_file").write_text("")

    proc = run_py("translate", ckpt, f"input={source}", f"output={tmp_path}/a_file/out.ja")  # caught up front
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {tmp_path}/a_file/out.ja: cannot write ({tmp_path}/a_file is not a directory)"

    proc = run_limited(["translate", ckpt, f"input={source}", f"output={tmp_path}/out.ja", "progress=false"], 10)
    assert proc.returncode == 1 and messages(proc.stderr) == [f"error: {tmp_path}/out.ja: cannot write (File too large)"]
    assert not (tmp_path / "out.ja").exists() and not (tmp_path / ".out.ja.tmp").exists()  # nothing half-written

    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "run.py", "translate", ckpt, f"input={source}", "progress=false"],
                              cwd=ROOT, stdout=full, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 1
    assert messages(proc.stderr) == ["error: <stdout>: cannot write (No space left on device)"]

    proc = run_py("translate", ckpt, f"input={source}", f"output={source}")
    assert proc.returncode == 1 and "output= is the input file" in proc.stderr
    assert source.read_bytes() == before


@pytest.mark.slow
def test_train_on_a_full_disk_or_an_unwritable_run_dir_is_one_line(tmp_path, data_dir):
    args = ["train", "experiment=smoke", "trainer.max_steps=30", "trainer.val_check_interval=20",
            "trainer.enable_progress_bar=false", f"data_dir={data_dir}"]
    corpus = {p: p.read_bytes() for p in (data_dir / "demo").iterdir() if p.is_file()}
    proc = run_limited([*args, f"hydra.run.dir={tmp_path}/run"], 200_000)  # logs fit, checkpoints do not
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path}/run/checkpoints/") and "cannot write" in last, last
    assert not list((tmp_path / "run" / "checkpoints").glob("*"))  # no torn checkpoint
    assert {p: p.read_bytes() for p in (data_dir / "demo").iterdir() if p.is_file()} == corpus

    (tmp_path / "a_file").write_text("")
    proc = run_py(*args, f"hydra.run.dir={tmp_path}/a_file/run")
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: [Errno 20] Not a directory: '{tmp_path}/a_file/run'"
