"""Checkpoints: pickled code refused, a torn or foreign file is one line everywhere, writes are atomic
(a failing write, a SIGKILL mid-write)."""
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from seq2seq import Seq2SeqError
from seq2seq.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import run_py


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
def test_checkpoint_in_torch_legacy_format_is_one_line(tmp_path):
    """Checkpoints are memory-mapped, which torch's pre-1.6 format cannot be: one line naming the file, not mmap's."""
    old = tmp_path / "old.ckpt"
    torch.save({"seq2seq": {}, "state_dict": {}}, old, _use_new_zipfile_serialization=False)
    with pytest.raises(Seq2SeqError, match=r"old\.ckpt: not a readable checkpoint \(not the zip archive torch\.save"):
        load_checkpoint(old)


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
def test_a_checkpoint_whose_sentencepiece_model_is_torn_is_one_line(smoke_run, tmp_path):
    checkpoint = load_checkpoint(smoke_run / "checkpoints" / "best.ckpt")
    checkpoint["seq2seq"]["spm_model"] = checkpoint["seq2seq"]["spm_model"][:100]
    save_checkpoint(checkpoint, tmp_path / "torn_spm.ckpt")
    proc = run_py("translate", f"ckpt={tmp_path}/torn_spm.ckpt", input="The cat.\n")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith(f"error: {tmp_path}/torn_spm.ckpt: its SentencePiece model does not load")
