"""The Transformer around attention: shapes, the embedding tied to the output layer, positions, dropout,
the post-norm variant, bf16, and loading checkpoints written before W_Q was split from W_K, W_V."""
import pytest
import torch

from seq2seq.model import Dropout, ModelConfig, Transformer, sinusoidal_positions
from tests.conftest import batch


def test_output_shapes(tiny_model):
    src, tgt = batch(tiny_model.cfg.vocab_size)
    assert tiny_model(src, tgt).shape == (3, 6, tiny_model.cfg.vocab_size)
    assert tiny_model.encode(src, tiny_model.pad_mask(src)).shape == (3, 7, 32)


def test_bf16_cpu_path_matches_fp32(tiny_model):
    src, tgt = batch(tiny_model.cfg.vocab_size)
    with torch.no_grad():
        ref = tiny_model(src, tgt)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = tiny_model(src, tgt)
    assert (low.float().argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_d_model_must_divide_into_heads():
    with pytest.raises(ValueError, match="not divisible"):
        ModelConfig(vocab_size=10, pad_id=0, d_model=30, n_heads=4, d_ff=8, n_enc_layers=1, n_dec_layers=1,
                    dropout=0.0, pre_norm=True, max_len=8)


def test_post_norm_variant_runs(tokenizer):
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, pad_id=0, d_model=16, n_heads=2, d_ff=32,
                      n_enc_layers=1, n_dec_layers=1, dropout=0.0, pre_norm=False, max_len=16)
    src, tgt = batch(tokenizer.vocab_size)
    assert torch.isfinite(Transformer(cfg)(src, tgt)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])

def test_dropout_zeroes_a_fraction_p_and_scales_the_rest(dtype):
    torch.manual_seed(0)
    dropout = Dropout(0.1)
    x = torch.ones(999, 1001, dtype=dtype, requires_grad=True)  # not a multiple of 4 elements
    y = dropout(x)
    kept = y.detach() != 0
    assert y.dtype == dtype and abs(kept.float().mean().item() - 0.9) < 0.002
    assert torch.equal(y.detach()[kept], torch.full_like(y.detach()[kept], 1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient flows through the same mask
    assert not torch.equal(dropout(x) != 0, kept)  # a fresh mask each call
    rows_kept = kept.float().mean(dim=1)  # no pattern along either axis
    assert rows_kept.min() > 0.8 and kept.float().mean(dim=0).min() > 0.8
    dropout.eval()
    assert dropout(x) is x


def test_the_output_layer_is_the_embedding_matrix(tiny_model):
    """Logits are h @ E^T with the same E that embeds the tokens (tied weights, one matrix to learn)."""
    src, tgt = batch(tiny_model.cfg.vocab_size)
    with torch.no_grad():
        h = tiny_model.decode(tgt, tiny_model.encode(src, tiny_model.pad_mask(src)), tiny_model.pad_mask(src))
        torch.testing.assert_close(tiny_model(src, tgt), h @ tiny_model.embed.weight.T)
        tiny_model.embed.weight.mul_(2)  # and changing E changes both
        torch.testing.assert_close(tiny_model.project(h), 2 * (h @ (tiny_model.embed.weight / 2).T))


def test_sinusoidal_positions_are_bounded_and_distinct():
    pe = sinusoidal_positions(64, 32)
    assert pe.shape == (64, 32) and pe.abs().max() <= 1.0
    assert torch.equal(pe[0, 0::2], torch.zeros(16)) and torch.equal(pe[0, 1::2], torch.ones(16))
    assert torch.cdist(pe, pe).add(torch.eye(64)).min() > 0.1  # no two positions alike


def test_a_checkpoint_with_the_old_stacked_in_proj_loads_with_the_same_outputs(tiny_model):
    src, tgt = batch(tiny_model.cfg.vocab_size)
    state = {}
    for name, tensor in tiny_model.state_dict().items():  # the layout before the split: one in_proj
        if ".q_proj." in name:
            kv = tiny_model.state_dict()[name.replace(".q_proj.", ".kv_proj.")]
            state[name.replace(".q_proj.", ".in_proj.")] = torch.cat([tensor, kv])
        elif ".kv_proj." not in name:
            state[name] = tensor
    assert any(".in_proj." in name for name in state)
    torch.manual_seed(1)
    fresh = Transformer(tiny_model.cfg).eval()
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(src, tgt), tiny_model(src, tgt))
