"""Loads the self-contained checkpoints that training writes: weights, model config, SentencePiece model."""
from pathlib import Path

import torch

from seq2seq import Seq2SeqError
from seq2seq.model import ModelConfig, Transformer
from seq2seq.tokenizer import Tokenizer


def load_checkpoint(path: str | Path) -> dict:
    """torch.load with weights_only=True (never runs code from the file); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise Seq2SeqError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for torn, foreign or unsafe files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Seq2SeqError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or "seq2seq" not in checkpoint or "state_dict" not in checkpoint:
        raise Seq2SeqError(f"{path}: not a seq2seq checkpoint (no model config / tokenizer inside)")
    return checkpoint


def load_model(path: str | Path) -> tuple[Transformer, Tokenizer, dict]:
    """The model (eval mode, CPU), its tokenizer and the data settings it was trained with."""
    checkpoint = load_checkpoint(path)
    meta = checkpoint["seq2seq"]
    model = Transformer(ModelConfig(**meta["model_config"]))
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise Seq2SeqError(f"{path}: weights do not fit the model config ({str(e).splitlines()[0]})") from None
    return model.eval(), Tokenizer(meta["spm_model"]), meta["data"]
