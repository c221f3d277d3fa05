"""Attention properties: causality, padding invariance, weights that are a distribution, both kernels agree,
the key/value cache."""
import math

import pytest
import torch
import torch.nn.functional as F

import seq2seq.attention
from seq2seq.attention import KVCache, MultiHeadAttention, attention_weights, keep_mask
from tests.conftest import batch


def test_changing_target_token_t_leaves_earlier_decoder_outputs_unchanged(tiny_model):
    src, tgt = batch(tiny_model.cfg.vocab_size)
    t = 3
    changed = tgt.clone()
    changed[:, t] = (changed[:, t] + 1) % tiny_model.cfg.vocab_size
    with torch.no_grad():
        before, after = tiny_model(src, tgt), tiny_model(src, changed)
    torch.testing.assert_close(before[:, :t], after[:, :t])
    assert not torch.allclose(before[:, t], after[:, t])  # the test can fail: position t does see it


def test_changing_padded_source_positions_leaves_outputs_unchanged(tiny_model):
    src, tgt = batch(tiny_model.cfg.vocab_size)
    pad_mask = tiny_model.pad_mask(src)
    garbage = src.clone()
    garbage[pad_mask] = 9  # a real token id where there was padding, but still masked as padding
    with torch.no_grad():
        memory = tiny_model.encode(src, pad_mask)
        memory_garbage = tiny_model.encode(garbage, pad_mask)
        out = tiny_model.decode(tgt, memory, pad_mask)
        out_garbage = tiny_model.decode(tgt, memory_garbage, pad_mask)
    torch.testing.assert_close(memory[~pad_mask], memory_garbage[~pad_mask])
    torch.testing.assert_close(out, out_garbage)
    # and without the mask the garbage would have leaked in
    with torch.no_grad():
        leaked = tiny_model.decode(tgt, tiny_model.encode(garbage, torch.zeros_like(pad_mask)), pad_mask)
    assert not torch.allclose(out, leaked)


@pytest.mark.parametrize("causal", [False, True])
def test_weights_sum_to_one_over_unmasked_keys_and_are_zero_elsewhere(causal):
    torch.manual_seed(0)
    B, H, T, d = 2, 3, 5, 4
    query, key = torch.randn(B, H, T, d), torch.randn(B, H, T, d)
    key_pad_mask = torch.tensor([[False] * 5, [False, False, False, True, True]])
    keep = keep_mask(key_pad_mask, causal, T, T, "cpu")
    weights = attention_weights(query, key, keep)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, H, T))
    assert (weights.masked_select(~keep.expand_as(weights)) == 0).all()
    assert (weights.masked_select(keep.expand_as(weights)) > 0).all()
    if causal:
        assert (weights[..., 0, 1:] == 0).all()  # the first token sees only itself


def test_the_newest_position_alone_needs_no_causal_mask():
    """A decoding step's one query comes after every cached key: the causal mask would hide none of them."""
    pad = torch.tensor([[False, False, True]])
    assert keep_mask(None, True, 1, 3, "cpu") is None
    assert torch.equal(keep_mask(pad, True, 1, 3, "cpu"), ~pad[:, None, None, :])
    two_queries = torch.tensor([[True, True, False], [True, True, True]])  # after one cached key
    assert torch.equal(keep_mask(None, True, 2, 3, "cpu")[0, 0], two_queries)


def test_weights_match_softmax_of_scaled_dot_products_by_hand():
    torch.manual_seed(0)
    query, key = torch.randn(1, 1, 2, 3), torch.randn(1, 1, 2, 3)
    expected = torch.empty(2, 2)
    for t in range(2):
        scores = [float(query[0, 0, t] @ key[0, 0, s]) / math.sqrt(3) for s in range(2)]
        total = sum(math.exp(x) for x in scores)
        expected[t] = torch.tensor([math.exp(x) / total for x in scores])
    torch.testing.assert_close(attention_weights(query, key, None)[0, 0], expected)


@pytest.mark.parametrize("kind", ["self", "causal", "cross"])
def test_explicit_weights_path_equals_sdpa_path(kind):
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4).eval()
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    mem_pad = torch.tensor([[False] * 7, [False] * 4 + [True] * 3])

    def run():
        if kind == "self":
            return mha.self_attention(x, key_pad_mask=mem_pad[:, :5])
        if kind == "causal":
            return mha.self_attention(x, causal=True)
        return mha.cross_attention(x, memory, mem_pad)

    fast = run()
    mha.store_weights = True
    slow = run()
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert mha.weights.shape == (2, 4, 5, 7 if kind == "cross" else 5)


@pytest.mark.parametrize("rows, sdpa", [(2, True), (200, False)])
def test_a_large_decoding_step_on_a_cpu_takes_two_matmuls_and_a_softmax_to_sdpas_output(rows, sdpa, monkeypatch):
    """Causal self-attention over a KV cache and cross-attention with padding, one new position a row: with
    rows x heads past STEP_MIN_VECTORS the explicit path runs (SDPA's flash kernel is slow there), below it SDPA."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4).eval()
    prefix, x, memory = torch.randn(rows, 3, 16), torch.randn(rows, 1, 16), torch.randn(rows, 7, 16)
    mem_pad = torch.zeros(rows, 7, dtype=torch.bool)
    mem_pad[::2, 4:] = True

    def step():
        cache = KVCache()
        with torch.no_grad():
            mha.self_attention(prefix, causal=True, cache=cache)
            return mha.self_attention(x, causal=True, cache=cache), mha.cross_attention(x, memory, mem_pad)

    calls, sdpa_kernel = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa_kernel(*a, **k))
    got = step()
    assert len(calls) == (3 if sdpa else 0)
    monkeypatch.setattr(seq2seq.attention, "STEP_MIN_VECTORS", 10 ** 9)  # SDPA everywhere
    calls.clear()
    for a, b in zip(got, step()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert len(calls) == 3


def test_cross_attention_takes_keys_and_values_from_memory_only():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 2).eval()
    x, memory = torch.randn(1, 3, 16), torch.randn(1, 4, 16)
    out = mha.cross_attention(x, memory, None)
    assert not torch.allclose(out, mha.cross_attention(x, memory + 1, None))
    # changing one query row changes only that row: the other queries attend to the same memory
    x2 = x.clone()
    x2[0, 0] += 1
    out2 = mha.cross_attention(x2, memory, None)
    torch.testing.assert_close(out[0, 1:], out2[0, 1:])


def test_kv_cache_equals_reordering_and_concatenating():
    """Appends and beam reorders (rows repeat, rows leave, two reorders in a row), past its first room of 16
    positions, against torch.cat/index_select; an append without a reorder writes in place while it has room."""
    cache, expected = KVCache(), None
    steps = [(4, None), (4, torch.tensor([2, 2, 0, 3])), (3, torch.tensor([1, 0, 0])), (3, None)] + [(3, None)] * 20
    for rows, order in steps:
        if order is not None:
            cache.reorder(order)
            expected = expected.index_select(0, order)
        key = torch.randn(rows, 2, 1, 8)
        expected = key if expected is None else torch.cat([expected, key], dim=2)
        storage = cache.storage
        keys, values = cache.append(key, -key)
        assert torch.equal(keys, expected) and torch.equal(values, -expected)
        assert cache.length == expected.size(2) and torch.equal(cache.key, keys)
        moved = storage is None or order is not None or expected.size(2) > storage.size(0)
        assert (cache.storage is not storage) == moved
    cache.reorder(torch.tensor([2, 1, 0]))
    cache.reorder(torch.tensor([0, 0, 1]))
    keys, _ = cache.append(torch.zeros(3, 2, 1, 8), torch.zeros(3, 2, 1, 8))
    assert torch.equal(keys[:, :, :-1], expected[[2, 2, 1]])


def test_kv_cache_takes_a_prefix_of_several_positions():
    """A forced prefix enters as T > 1 positions at once, then one position a step."""
    cache = KVCache()
    prefix, step = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 1, 8)
    cache.append(prefix, prefix * 2)
    keys, values = cache.append(step, step * 2)
    torch.testing.assert_close(keys, torch.cat([prefix, step], dim=2), rtol=0, atol=0)
    torch.testing.assert_close(values, torch.cat([prefix, step], dim=2) * 2, rtol=0, atol=0)
