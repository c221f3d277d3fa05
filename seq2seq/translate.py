"""`run.py translate`: batch translation of a file or stdin with beam search, one output line per input line."""
import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from seq2seq import Seq2SeqError, atomic_write, temporary_path, write_error
from seq2seq.checkpoint import load_model
from seq2seq.config import build_config
from seq2seq.corpora import clean_line
from seq2seq.data import LengthOrderSampler, TokenBatchSampler
from seq2seq.hardware import AUTOCAST_DTYPE, choose_precision, log_choice, resolve_device, this_machine
from seq2seq.int8 import Int8Transformer
from seq2seq.search import SearchConfig, beam_search
from seq2seq.tokenizer import EOS_ID, PAD_ID

log = logging.getLogger(__name__)


class Translator:
    """A trained model with its tokenizer: `Translator.from_checkpoint(path).translate(["I like tea."])`.

    The model sits on `device` (`auto`: the CUDA GPU when there is one, else the CPU); a translate call
    with another `device=` moves it there. `precision` is decided per call (`auto`: seq2seq/hardware.py);
    int8 decodes with an int8 copy of the model, made at its first use and kept.
    """

    def __init__(self, model, tokenizer, info: dict, device: str = SearchConfig.device):
        self.tokenizer, self.info = tokenizer, info
        self.device = resolve_device(device, this_machine())
        self.model = model.eval().to(self.device)
        self.int8_model: Int8Transformer | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = SearchConfig.device) -> "Translator":
        return cls(*load_model(path), device=device)

    @contextmanager
    def decoding(self, search: SearchConfig):
        """The model to decode with, inside the autocast its precision asks for: on `search.device` (`auto`:
        where the model is), at `search.precision` (`auto`: what this device does fastest, logged once)."""
        if search.device != "auto":
            self.device = resolve_device(search.device, this_machine())
            self.model.to(self.device)
        precision, reason = choose_precision(search.precision, self.device.type, training=False,
                                             machine=this_machine())
        log_choice("decoding", precision, reason)
        if precision == "int8":
            self.int8_model = self.int8_model or Int8Transformer(self.model)
            yield self.int8_model
        elif precision in AUTOCAST_DTYPE:
            with torch.autocast(self.device.type, dtype=AUTOCAST_DTYPE[precision]):
                yield self.model
        else:
            yield self.model

    def encode(self, lines: list[str]) -> list[list[int]]:
        """Clean as training did, encode, and cut lines the model cannot take (with a warning naming them)."""
        ids = self.tokenizer.encode([clean_line(line, self.info["normalize"]) for line in lines])
        limit = self.model.cfg.max_len - 1  # room for eos
        for lineno, seq in enumerate(ids, 1):
            if len(seq) > limit:
                print(f"warning: line {lineno}: {len(seq)} tokens, truncated to {limit}", file=sys.stderr)
        return [seq[:limit] for seq in ids]

    def translate(self, lines: list[str], search: SearchConfig | None = None, progress: bool = False,
                  **settings) -> list[list[tuple[str, float]]]:
        """For each line, its nbest (translation, score), best first. An empty line gives [("", 0.0)].

        `search` and/or SearchConfig's fields by name (`beam_size=1`, `alpha=1.0`, `precision="32"`,
        `device="cpu"`, ...), which override it.
        """
        search = replace(search or SearchConfig(), **settings)
        ids = self.encode(lines)
        sizes = np.array([len(s) + 1 for s in ids])
        out: list = [[("", 0.0)] for _ in lines]
        todo = [i for i, s in enumerate(ids) if s]
        batches = TokenBatchSampler(LengthOrderSampler(sizes[todo], shuffle=False, seed=0),
                                    max(search.max_tokens, int(sizes.max(initial=1))))
        bar = tqdm(total=len(todo), disable=not progress, file=sys.stderr, unit="line")
        with self.decoding(search) as model:
            for batch in batches:
                rows = [todo[i] for i in batch]
                src = pad_batch([ids[r] for r in rows]).to(model.embed.weight.device)
                hyps = beam_search(model, src, model.pad_mask(src), search)
                for r, sentence_hyps in zip(rows, hyps):
                    texts = self.tokenizer.decode([h for h, _ in sentence_hyps])
                    out[r] = [(t, s) for t, (_, s) in zip(texts, sentence_hyps)]
                bar.update(len(rows))
        bar.close()
        return out


def pad_batch(seqs: list[list[int]]) -> torch.Tensor:
    """Source ids + eos, padded: (B, S)."""
    src = torch.full((len(seqs), max(len(s) for s in seqs) + 1), PAD_ID, dtype=torch.long)
    for b, s in enumerate(seqs):
        src[b, :len(s) + 1] = torch.tensor(s + [EOS_ID])
    return src


def read_input(path: str, errors: str) -> list[str]:
    """Lines split on \\n only (so every other control character stays inside its line)."""
    name = "<stdin>" if path == "-" else path
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as e:
        raise Seq2SeqError(f"{name}: cannot read ({e.strerror or e})") from None
    raw = data.split(b"\n")
    if raw[-1] == b"":
        raw.pop()
    lines = []
    for lineno, line in enumerate(raw, 1):
        try:
            lines.append(line.decode("utf-8", errors=errors).removesuffix("\r"))
        except UnicodeDecodeError as e:
            raise Seq2SeqError(f"{name}:{lineno}: invalid UTF-8 ({e.reason} at byte {e.start}); "
                               "pass errors=replace to translate it anyway") from None
    return lines


def check_output(path: str, input_path: str = "-") -> None:
    """Before any work: the output can be created, and it is not the input (which stays untouched)."""
    if path == "-":
        return
    target = Path(path)
    if input_path != "-" and target.exists() and target.resolve() == Path(input_path).resolve():
        raise Seq2SeqError(f"{path}: output= is the input file; choose another so the input stays untouched")
    probe = temporary_path(target)  # the file atomic_write will create
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise write_error(path, e) from None


def write_output(path: str, text: str) -> None:
    """A file is written atomically (a full disk leaves no half-written output); - is stdout."""
    if path != "-":
        with atomic_write(path) as f:
            f.write(text)
        return
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as e:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error as Python exits
        raise Seq2SeqError(f"<stdout>: cannot write ({e.strerror or e})") from None


def search_config(cfg: DictConfig) -> SearchConfig:
    """The search settings of a translate/evaluate/visualize command line, checked (one line if wrong)."""
    return build_config(SearchConfig, {f.name: cfg[f.name] for f in fields(SearchConfig)}, "search", top_level=True)


def translate(cfg: DictConfig) -> None:
    search = search_config(cfg)
    if cfg.errors not in ("strict", "replace"):
        raise Seq2SeqError(f"errors={cfg.errors}: expected strict or replace")
    check_output(str(cfg.output), str(cfg.input))
    lines = read_input(str(cfg.input), cfg.errors)
    results = Translator.from_checkpoint(cfg.ckpt, device=search.device).translate(lines, search, progress=cfg.progress)
    if search.nbest > 1:
        text = "".join(f"{i} ||| {hyp} ||| {score:.4f}\n" for i, hyps in enumerate(results, 1) for hyp, score in hyps)
    else:
        text = "".join(hyps[0][0] + "\n" for hyps in results)
    write_output(str(cfg.output), text)
