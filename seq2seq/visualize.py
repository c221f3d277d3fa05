"""Attention as pictures: every layer and head of encoder self-, decoder self- and cross-attention for
one sentence pair, as PNG grids, one self-contained HTML page, or text.

The weights come from the model's normal forward pass (`MultiHeadAttention.store_weights`).
"""
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from seq2seq import Seq2SeqError
from seq2seq.attention import MultiHeadAttention
from seq2seq.model import Transformer
from seq2seq.plots import plot_grid
from seq2seq.tokenizer import BOS_ID, EOS_ID, Tokenizer


@dataclass
class AttentionMaps:
    """Attention weights of one (source, target) pair. Each row sums to 1 over the keys it may see.

    src_tokens: S source pieces (ending in </s>); tgt_in: T decoder input pieces (<s> y1 .. yn);
    tgt_out: T pieces each decoder position predicts (y1 .. yn </s>).
    encoder (L_enc, H, S, S): query source token x key source token.
    decoder (L_dec, H, T, T): query = position predicting tgt_out[t], key = tgt_in[s]; the future (s > t) is 0.
    cross (L_dec, H, T, S): query = position predicting tgt_out[t], key = source token s.
    """

    src_tokens: list[str]
    tgt_in: list[str]
    tgt_out: list[str]
    encoder: torch.Tensor
    decoder: torch.Tensor
    cross: torch.Tensor


@contextmanager
def capture_weights(model: Transformer):
    """Make every MultiHeadAttention keep its weights (explicit softmax path) inside the block."""
    modules = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    for m in modules:
        m.store_weights = True
    try:
        yield
    finally:
        for m in modules:
            m.store_weights, m.weights = False, None


@torch.no_grad()
def attention_maps(model: Transformer, tokenizer: Tokenizer, src_ids: list[int], tgt_ids: list[int]) -> AttentionMaps:
    """Run the pair through encode/decode once and collect the weights of every layer and head."""
    model.eval()
    device = model.embed.weight.device
    src = torch.tensor([src_ids + [EOS_ID]], device=device)  # (1, S)
    tgt_in = torch.tensor([[BOS_ID] + tgt_ids], device=device)  # (1, T)
    src_pad_mask = model.pad_mask(src)
    with capture_weights(model):
        memory = model.encode(src, src_pad_mask)
        encoder = torch.stack([layer.self_attn.weights[0] for layer in model.encoder_layers])  # (L, H, S, S)
        model.decode(tgt_in, memory, src_pad_mask)
        decoder = torch.stack([layer.self_attn.weights[0] for layer in model.decoder_layers])  # (L, H, T, T)
        cross = torch.stack([layer.cross_attn.weights[0] for layer in model.decoder_layers])  # (L, H, T, S)
    src, tgt = tokenizer.pieces(src_ids), tokenizer.pieces(tgt_ids)
    return AttentionMaps(src + ["</s>"], ["<s>"] + tgt, tgt + ["</s>"], encoder.float().cpu(), decoder.float().cpu(),
                         cross.float().cpu())


def text_report(maps: AttentionMaps, top: int = 3) -> str:
    """For each target token, the source tokens it attends to most (cross-attention, mean of layers and heads)."""
    mean = maps.cross.mean(dim=(0, 1))  # (T, S)
    lines = []
    for t, token in enumerate(maps.tgt_out):
        weights, idx = mean[t].topk(min(top, mean.size(1)))
        lines.append(f"{token}\t" + "  ".join(f"{maps.src_tokens[i]} {w:.2f}" for w, i in zip(weights.tolist(),
                                                                                          idx.tolist())))
    return "\n".join(lines) + "\n"


def write_html(maps: AttentionMaps, path: Path) -> None:
    """One page, no network: pick a kind, layer and head; hover a token to see what it attends to."""
    data = {"src": maps.src_tokens, "tgt_in": maps.tgt_in, "tgt_out": maps.tgt_out,
            "cross": maps.cross.tolist(), "encoder": maps.encoder.tolist(), "decoder": maps.decoder.tolist()}
    page = (Path(__file__).with_name("attention.html")).read_text(encoding="utf-8")
    path.write_text(page.replace("/*DATA*/null", json.dumps(data, ensure_ascii=False).replace("</", "<\\/")),
                    encoding="utf-8")


def visualize(cfg: DictConfig) -> AttentionMaps:
    from seq2seq.config import check_choice, check_flag, search_config
    from seq2seq.translator import Translator

    search = search_config(cfg)
    check_flag("pretokenized", cfg.pretokenized)
    check_choice("format", cfg.format, ("files", "text"))
    translator = Translator.from_checkpoint(cfg.ckpt, device=search.device)
    model, tokenizer = translator.model, translator.tokenizer
    text = translator.prepare([str(cfg.text)], cfg.pretokenized)[0]  # as `translate` reads it
    if not text:
        raise Seq2SeqError("text is empty: give a sentence, text=\"The cat sat on the mat.\"")
    limit = model.cfg.max_len - 1
    src_ids = tokenizer.encode([text])[0][:limit]
    if cfg.target is not None:
        tgt_ids = tokenizer.encode(translator.prepare([str(cfg.target)], cfg.pretokenized, side="tgt"))[0][:limit]
    else:
        tgt_ids = translator.best_ids(src_ids, search)
    maps = attention_maps(model, tokenizer, src_ids, tgt_ids)
    if cfg.format == "text":
        print(f"source: {' '.join(maps.src_tokens)}\ntarget: {' '.join(maps.tgt_out)}")
        print(text_report(maps), end="")
        return maps
    out = Path(cfg.output)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Seq2SeqError(f"{out}: cannot create ({e.strerror or e})") from None
    write_html(maps, out / "attention.html")
    plot_grid(maps.cross, maps.tgt_out, maps.src_tokens, "cross-attention (target x source)", out / "cross.png")
    plot_grid(maps.cross.mean(dim=(0, 1))[None, None], maps.tgt_out, maps.src_tokens,
              "alignment: cross-attention averaged over layers and heads", out / "alignment.png")
    plot_grid(maps.encoder, maps.src_tokens, maps.src_tokens, "encoder self-attention", out / "encoder.png")
    plot_grid(maps.decoder, maps.tgt_out, maps.tgt_in, "decoder self-attention (future masked)", out / "decoder.png",
              causal=True)
    (out / "attention.txt").write_text(text_report(maps), encoding="utf-8")
    print(f"wrote {out}/attention.html, cross.png, alignment.png, encoder.png, decoder.png, attention.txt")
    return maps
