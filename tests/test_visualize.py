"""The math of what `visualize` draws, and the files it writes."""
import math

import pytest
import torch

from seq2seq.visualize import attention_maps, capture_weights, text_report
from tests.conftest import batch, run_py


def maps_for(tiny_model, tokenizer):
    src_ids = tokenizer.encode(["The big dog ate the red apple."])[0]
    tgt_ids = tokenizer.encode(["大きい犬は赤いりんごを食べました。"])[0]
    return attention_maps(tiny_model, tokenizer, src_ids, tgt_ids), len(src_ids) + 1, len(tgt_ids) + 1


def test_shapes_rows_and_masked_cells(tiny_model, tokenizer):
    maps, S, T = maps_for(tiny_model, tokenizer)
    L, H = 1, 2
    assert maps.encoder.shape == (L, H, S, S) and maps.decoder.shape == (L, H, T, T)
    assert maps.cross.shape == (L, H, T, S)
    assert len(maps.src_tokens) == S and len(maps.tgt_in) == len(maps.tgt_out) == T
    for weights in (maps.encoder, maps.decoder, maps.cross):
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    assert (maps.decoder[..., future] == 0).all()  # exactly zero, not just small
    assert (maps.decoder[..., ~future] > 0).all()


def test_padding_columns_are_zero(tiny_model):
    src, tgt = batch(tiny_model.cfg.vocab_size)
    pad = tiny_model.pad_mask(src)
    with torch.no_grad(), capture_weights(tiny_model):
        tiny_model.decode(tgt, tiny_model.encode(src, pad), pad)
        cross = tiny_model.decoder_layers[0].cross_attn.weights  # (B, H, T, S)
        encoder = tiny_model.encoder_layers[0].self_attn.weights  # (B, H, S, S)
    assert (cross.permute(0, 3, 1, 2)[pad] == 0).all()
    assert (encoder.permute(0, 3, 1, 2)[pad] == 0).all()
    assert tiny_model.decoder_layers[0].cross_attn.store_weights is False  # switched back off


def test_weights_equal_a_reference_from_queries_and_keys(tiny_model, tokenizer):
    maps, S, _ = maps_for(tiny_model, tokenizer)
    src_ids = tokenizer.encode(["The big dog ate the red apple."])[0] + [3]
    layer = tiny_model.encoder_layers[0]
    with torch.no_grad():
        x = tiny_model.embed_tokens(torch.tensor([src_ids]))[0]  # (S, D)
        h = layer.sublayers[0].norm(x)  # pre-norm: attention reads the normalized stream
        D, H = tiny_model.cfg.d_model, tiny_model.cfg.n_heads
        attn = layer.self_attn
        query = h @ attn.q_proj.weight.t() + attn.q_proj.bias  # (S, D)
        key = h @ attn.kv_proj.weight[:D].t() + attn.kv_proj.bias[:D]  # (S, D)
        d = D // H
        for head in range(H):
            q, k = query[:, head * d:(head + 1) * d], key[:, head * d:(head + 1) * d]
            expected = torch.softmax(q @ k.t() / math.sqrt(d), dim=-1)
            torch.testing.assert_close(maps.encoder[0, head], expected)


def test_text_report_has_one_line_per_target_token(tiny_model, tokenizer):
    maps, _, T = maps_for(tiny_model, tokenizer)
    lines = text_report(maps, top=2).splitlines()
    assert len(lines) == T and all(len(line.split("\t")[1].split("  ")) == 2 for line in lines)


@pytest.mark.slow
def test_cli_writes_html_and_pngs(smoke_run, tmp_path):
    out = tmp_path / "attn"
    proc = run_py("visualize", f"ckpt={smoke_run}/checkpoints/best.ckpt", "text=Yesterday, the cat's dog ate it.",
                  f"output={out}")
    assert proc.returncode == 0, proc.stderr
    for name in ("attention.html", "cross.png", "alignment.png", "encoder.png", "decoder.png", "attention.txt"):
        assert (out / name).stat().st_size > 0, name
    page = (out / "attention.html").read_text()
    assert "const DATA = {" in page and "http" not in page.split("<script>")[1]  # self-contained
    proc = run_py("visualize", f"ckpt={smoke_run}/checkpoints/best.ckpt", "text=The cat reads the book.",
                  "target=猫は本を読みます。", "format=text")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].startswith("target: ") and "読" in proc.stdout
