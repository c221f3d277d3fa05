"""Loads the self-contained checkpoints that training writes: weights, model config, SentencePiece model
and what the text was (TextInfo)."""
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from seq2seq import Seq2SeqError
from seq2seq.files import atomic_write
from seq2seq.model import ModelConfig, Transformer
from seq2seq.tokenizer import Tokenizer


@dataclass(frozen=True)
class TextInfo:
    """What a checkpoint knows of its text: direction, cleaning, BLEU tokenization, the data config.

    Stored in checkpoint["seq2seq"]["data"] as a plain dict (checkpoints hold no pickled classes)."""

    src_lang: str
    tgt_lang: str
    normalize: bool  # NFKC when cleaning
    bleu_tokenize: str  # sacrebleu's tokenize= that validation used
    data_config: dict  # the DataConfig the model was trained with

    @property
    def pretokenized(self) -> bool:
        """Was the training text lowercased and word-segmented (small_parallel_enja)?"""
        return bool(self.data_config.get("pretokenized"))


def load_checkpoint(path: str | Path) -> dict:
    """torch.load with weights_only=True (never runs code from the file); errors name the file. Memory-mapped: only
    the tensors used are read (a Lightning checkpoint holds the optimizer's state too, twice the weights with Adam)."""
    if not isinstance(path, (str, Path)):  # ckpt=[a,b] where a command takes one checkpoint
        raise Seq2SeqError(f"ckpt={path}: expected one checkpoint (only translate, evaluate and serve take a list)")
    path = Path(path)
    if not path.is_file():
        raise Seq2SeqError(f"{path}: checkpoint not found")
    if not zipfile.is_zipfile(path):  # torn (no central directory), torch's pre-1.6 format, or no torch file at all
        raise Seq2SeqError(f"{path}: not a readable checkpoint (not the zip archive torch.save writes: torn, or "
                           "another format)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for torn, foreign or unsafe files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Seq2SeqError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or "seq2seq" not in checkpoint or "state_dict" not in checkpoint:
        raise Seq2SeqError(f"{path}: not a seq2seq checkpoint (no model config / tokenizer inside)")
    return checkpoint


def load_model(path: str | Path) -> tuple[Transformer, Tokenizer, TextInfo]:
    """The model (eval mode, CPU), its tokenizer and the data settings it was trained with."""
    checkpoint = load_checkpoint(path)
    meta = checkpoint["seq2seq"]
    model = Transformer(ModelConfig(**meta["model_config"]))
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise Seq2SeqError(f"{path}: weights do not fit the model config ({str(e).splitlines()[0]})") from None
    try:
        info = TextInfo(**meta["data"])
    except TypeError as e:
        raise Seq2SeqError(f"{path}: its text settings do not fit this version ({e})") from None
    try:
        tokenizer = Tokenizer(meta["spm_model"])
    except (RuntimeError, TypeError) as e:
        why = str(e).strip().splitlines()[-1]
        raise Seq2SeqError(f"{path}: its SentencePiece model does not load ({why})") from None
    return model.eval(), tokenizer, info


def save_checkpoint(checkpoint: dict, path: str | Path) -> None:
    """Write atomically (see `atomic_write`): a crash leaves the old file or the new one."""
    with atomic_write(path, "wb") as f:
        torch.save(checkpoint, f)


def average_checkpoints(paths: list[str], output: str | Path) -> None:
    """Average the weights of checkpoints of one model (e.g. the last few) into a self-contained one."""
    if not paths:
        raise Seq2SeqError("ckpts is empty: give a list, ckpts='[a.ckpt,b.ckpt]'")
    checkpoints = [load_checkpoint(p) for p in paths]
    first = checkpoints[0]
    for path, checkpoint in zip(paths[1:], checkpoints[1:]):
        if checkpoint["seq2seq"]["model_config"] != first["seq2seq"]["model_config"]:
            raise Seq2SeqError(f"{path}: a different model config than {paths[0]}; "
                               "only one model's checkpoints average")
    state = {name: sum(c["state_dict"][name].double() for c in checkpoints).div(len(checkpoints)).to(tensor.dtype)
             if tensor.is_floating_point() else tensor for name, tensor in first["state_dict"].items()}
    save_checkpoint({"state_dict": state, "seq2seq": first["seq2seq"], "averaged_from": [str(p) for p in paths]},
                    output)
