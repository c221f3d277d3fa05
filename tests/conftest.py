"""Shared fixtures: the generated demo corpus, a tokenizer trained on it, the real config composed small."""
from pathlib import Path

import resource
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.utils._python_dispatch
from hydra import compose, initialize_config_dir

from seq2seq.corpora import SMALL_ENJA_LINES, DataConfig, load_demo
from seq2seq.model import ModelConfig, Transformer
from seq2seq.tokenizer import train_tokenizer

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
ROOT = Path(__file__).resolve().parents[1]


def compose_train(overrides: list[str]):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def demo_corpus(data_dir):
    """The demo corpus, generated like `data=demo` does: {split: (en lines, ja lines)}."""
    cfg = compose_train(["data=demo", f"data_dir={data_dir}", "output_dir=unused"])
    return load_demo(DataConfig(**cfg.data))


@pytest.fixture(scope="session")
def tokenizer(demo_corpus, data_dir):
    src, tgt = demo_corpus["train"]
    return train_tokenizer(src + tgt, vocab_size=400, cache_dir=data_dir / "cache")


@pytest.fixture
def tiny_cfg(data_dir, tmp_path):
    """The real conf/ with model=tiny data=demo trainer=debug, writing under tmp_path."""
    return compose_train(["model=tiny", "data=demo", "trainer=debug", f"data_dir={data_dir}",
                          f"output_dir={tmp_path}"])


@pytest.fixture
def tiny_model(tokenizer) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id, d_model=32, n_heads=2, d_ff=64,
                      n_enc_layers=1, n_dec_layers=1, dropout=0.0, pre_norm=True, max_len=64)
    return Transformer(cfg).eval()


def messages(stderr: str) -> list[str]:
    """stderr without the [INFO] log lines (the precision chosen and why): the warnings and errors."""
    return [line for line in stderr.strip().splitlines() if not line.startswith("[INFO]")]


def pytest_collection_modifyitems(items):
    """A test that needs the smoke run's checkpoint (directly or through a fixture) trains: slow."""
    for item in items:
        if "smoke_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_py(*args, timeout=900, **kw):
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, **kw)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, data_dir) -> Path:
    """One short `run.py train experiment=smoke` shared by the tests that need a trained checkpoint."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    proc = run_py("train", "experiment=smoke", "trainer.max_steps=150", "trainer.val_check_interval=75",
                  "trainer.enable_progress_bar=false", f"data_dir={data_dir}", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def batch(vocab: int, B=3, S=7, T=6, seed=0):
    """Random source and target ids (B, S), (B, T); sentences 1 and 2 end in padding."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, vocab, (B, S), generator=g)
    src[1, 5:] = 0  # padding at the end of sentence 1
    src[2, 3:] = 0
    tgt = torch.randint(4, vocab, (B, T), generator=g)
    return src, tgt


def write_small_enja_mirror(root, n_train=SMALL_ENJA_LINES["train"]):
    """A local copy of small_parallel_enja's layout with numbered stand-in sentences."""
    root.mkdir()
    for name, split in (("train", "train"), ("dev", "valid"), ("test", "test")):
        n = n_train if split == "train" else SMALL_ENJA_LINES[split]
        (root / f"{name}.en").write_text("".join(f"sentence {i} .\n" for i in range(n)))
        (root / f"{name}.ja").write_text("".join(f"文 {i} 。\n" for i in range(n)))


def small_disk(max_bytes: int):
    """preexec_fn: files may grow to max_bytes only (EFBIG, like a full disk, instead of SIGXFSZ)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return limit


def run_limited(args, max_bytes, **kw):
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True,
                          preexec_fn=small_disk(max_bytes), timeout=900, **kw)


# aten ops that make the host wait for a GPU: a value read (item, bool, int, float) or a result whose size
# depends on the data (a boolean index is a nonzero). A copy to the host (.tolist(), .cpu() of a GPU tensor)
# waits too; on a CPU it runs no op, so a CPU run sees only these.
HOST_SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique",
                 "aten::_unique2", "aten::repeat_interleave")


class HostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten op run under it that would sync a GPU."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in HOST_SYNC_OPS or (name.startswith("aten::index") and boolean_index(args)):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def boolean_index(args) -> bool:
    """Does aten::index / index_put_ get a mask? It counts the mask's True values below this dispatch level."""
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)
