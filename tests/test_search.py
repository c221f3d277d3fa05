"""Incremental decoding equals full recomputation; greedy search stops at eos."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import seq2seq.search
from seq2seq.attention import KVCache
from seq2seq.ensemble import Ensemble
from seq2seq.int8 import ONEDNN_ROWS, Int8Transformer
from seq2seq.search import (CPU_LOGIT_ROWS, ENCODE_GROUP_ROWS, GREEDY_BLOCKWISE_ROWS, SearchConfig, beam_search,
                            blockwise_topk, cpu_logit_rows, encode_by_length, greedy_search, search_batch,
                            top_next_tokens)
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID
from tests.conftest import HostSyncs, batch


def test_cached_decode_steps_equal_full_recomputation(tiny_model):
    src, tgt = batch(tiny_model.cfg.vocab_size)
    tgt[:, 0] = BOS_ID
    pad_mask = tiny_model.pad_mask(src)
    with torch.no_grad():
        memory = tiny_model.encode(src, pad_mask)
        full = tiny_model.decode(tgt, memory, pad_mask)  # (B, T, D)
        cache = [{} for _ in tiny_model.decoder_layers]
        steps = [tiny_model.decode_step(tgt[:, t:t + 1], memory, pad_mask, cache) for t in range(tgt.size(1))]
    torch.testing.assert_close(torch.stack(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache[0]["self"].key.shape == (3, 2, tgt.size(1), 16)  # (B, H, T, d_head)
    assert cache[0]["cross"]["key"].shape == (3, 2, src.size(1), 16)  # projected once, reused


def test_encoding_by_length_gives_each_row_its_memory_of_a_whole_batch_encode(tiny_model):
    """A large batch of mixed lengths is encoded in groups cut to their own longest row: the real positions'
    memory is the whole batch's (the padding's is masked, as before)."""
    torch.manual_seed(0)
    B, S = 3 * ENCODE_GROUP_ROWS + 5, 24
    lengths = torch.randint(1, S + 1, (B,))
    lengths[0] = S  # one row as long as the batch: most rows are padded by far
    src = torch.randint(4, tiny_model.cfg.vocab_size, (B, S))
    src[torch.arange(S) >= lengths[:, None]] = PAD_ID
    pad_mask = tiny_model.pad_mask(src)
    with torch.no_grad():
        whole, grouped = tiny_model.encode(src, pad_mask), encode_by_length(tiny_model, src, pad_mask)
    real = ~pad_mask
    torch.testing.assert_close(grouped[real], whole[real], atol=1e-5, rtol=1e-5)


def test_greedy_equals_argmax_of_full_recomputation(tiny_model):
    src, _ = batch(tiny_model.cfg.vocab_size)
    pad_mask = tiny_model.pad_mask(src)
    out, _ = greedy_search(tiny_model, src, pad_mask, SearchConfig(max_len_a=0, max_len_b=6))
    with torch.no_grad():
        memory = tiny_model.encode(src, pad_mask)
        ys = torch.full((3, 1), BOS_ID)
        for _ in range(6):
            ys = torch.cat([ys, tiny_model.project(tiny_model.decode(ys, memory, pad_mask)[:, -1]).argmax(-1,
                                                                                                  keepdim=True)], 1)
    expected = ys[:, 1:]
    for b in range(3):  # identical up to and including the first eos; pad after it
        row = expected[b].tolist()
        end = row.index(EOS_ID) + 1 if EOS_ID in row else len(row)
        assert out[b, :end].tolist() == row[:end]
        if EOS_ID not in row:  # 6 tokens without eos: the length limit ends the sentence
            assert out[b, end] == EOS_ID
            end += 1
        assert (out[b, end:] == PAD_ID).all()


class ScriptedModel(torch.nn.Module):
    """A 'model' whose next-token log-probabilities depend only on the prefix, from a table.

    After bos: token 5 has p=0.5, token 6 p=0.4, eos 0.1. After 5: every token is equally likely
    (p=0.1 each of 10), so "5 ..." is a dead end; after 6: eos has p=0.9. Greedy picks 5 (0.5 * 0.1 = 0.05);
    the best sequence is "6 eos" (0.4 * 0.9 = 0.36), which a beam of 2 finds.
    """

    V = 10

    def __init__(self):
        super().__init__()
        self.decoder_layers = [None]
        self.cfg = type("cfg", (), {"max_len": 50, "vocab_size": self.V})()

    def encode(self, src, src_pad_mask):
        return torch.zeros(src.size(0), src.size(1), 1)

    def decode_step(self, tgt_in, memory, src_pad_mask, cache):
        token = tgt_in[:, None, :, None]  # (B, 1, 1, 1): the token is its own key and value
        prefix, _ = cache[0].setdefault("self", KVCache()).append(token, token)  # reordered by the search
        return prefix[:, 0, :, 0]  # the 'state' is the prefix itself

    def project(self, prefix):
        probs = torch.zeros(prefix.size(0), self.V)
        for i, row in enumerate(prefix.tolist()):
            if row == [BOS_ID]:
                probs[i, 5], probs[i, 6], probs[i, EOS_ID] = 0.5, 0.4, 0.1
            elif row[1] == 5:
                probs[i, :] = 0.1
            else:
                probs[i, :] = 0.1 / 9
                probs[i, EOS_ID] = 0.9
        return probs.log()


def test_beam_finds_the_best_sequence_where_greedy_does_not():
    model = ScriptedModel()
    src = torch.ones(1, 3, dtype=torch.long)
    pad = torch.zeros(1, 3, dtype=torch.bool)
    greedy, _ = greedy_search(model, src, pad, SearchConfig(max_len_a=0, max_len_b=3))
    assert greedy[0, 0].item() == 5
    best = beam_search(model, src, pad, SearchConfig(beam_size=2, alpha=0.0, max_len_a=0, max_len_b=3))
    tokens, score = best[0][0]
    assert tokens == [6]
    assert abs(score - math.log(0.4 * 0.9)) < 1e-4


@pytest.mark.parametrize("beam_size", [1, 3])
def test_a_batch_without_padding_is_decoded_without_a_mask_to_the_same_output(tiny_model, beam_size, monkeypatch):
    """One sentence, or sentences of one length, have no padding: the attention layers get no mask, which would
    hide nothing and cost each call a conversion and an add (`attention_padding`). Same tokens, scores bit for bit."""
    torch.manual_seed(0)
    src = torch.randint(4, tiny_model.cfg.vocab_size, (3, 6))
    src[:, -1] = EOS_ID
    padded = src.clone()
    padded[0, 3], padded[0, 4:] = EOS_ID, PAD_ID
    masks, decode_step = [], tiny_model.decode_step
    monkeypatch.setattr(tiny_model, "decode_step", lambda *args: masks.append(args[2]) or decode_step(*args))
    search = SearchConfig(beam_size=beam_size, nbest=beam_size, max_len_a=0, max_len_b=8)
    for rows, padding in ((src[:1], False), (src, False), (padded, True)):
        masks.clear()
        out = search_batch(tiny_model, rows, search)
        assert masks and all((mask is not None) == padding for mask in masks)
        with monkeypatch.context() as m:
            m.setattr(seq2seq.search, "attention_padding", lambda mask: mask)  # every batch masked, as before
            assert search_batch(tiny_model, rows, search) == out


@pytest.mark.parametrize("settings", [dict(alpha=0.0), dict(alpha=1.2), dict(min_len=4),
                                      dict(max_len_a=0.5, max_len_b=2), dict(prefix=True)])
def test_greedy_search_finds_what_one_beam_finds_with_its_score(tiny_model, settings, monkeypatch):
    """Translation's beam_size=1 runs greedy_search (no beams to rank): the same tokens and the same log P / lp
    as beam search with one beam, under the length penalty, min_len, the length limit and a forced prefix."""
    if "min_len" in settings:  # a model that would end at once: only min_len keeps eos away
        project = tiny_model.project
        monkeypatch.setattr(tiny_model, "project", lambda h: project(h).index_add(-1, torch.tensor([EOS_ID]),
                                                                                 torch.full((len(h), 1), 20.0)))
    src, _ = batch(tiny_model.cfg.vocab_size, B=16, S=9)
    pad = tiny_model.pad_mask(src)
    prefix = torch.tensor([[7, 8, 9], [10, -1, -1]] + [[-1] * 3] * 14) if settings.pop("prefix", False) else None
    search = SearchConfig(beam_size=1, **settings)
    ids, scores = greedy_search(tiny_model, src, pad, search, prefix)
    beam = beam_search(tiny_model, src, pad, search, prefix)
    for row, score, nbest in zip(ids.tolist(), scores.tolist(), beam):
        assert (row[:row.index(EOS_ID)] if EOS_ID in row else row) == nbest[0][0]
        assert abs(score - nbest[0][1]) < 1e-4, (score, nbest[0][1])
    if prefix is not None:
        assert ids[0, :3].tolist() == [7, 8, 9] and ids[1, 0] == 10
    if "min_len" in settings:
        assert all(row.index(EOS_ID) == 4 for row in ids.tolist())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(alpha=st.sampled_from([0.0, 0.6, 1.2]), min_len=st.integers(0, 5), max_len_a=st.sampled_from([0.0, 0.5, 1.5]),
       max_len_b=st.integers(0, 10), eos_boost=st.sampled_from([0.0, 10.0]), seed=st.integers(0, 2 ** 16),
       prefix_len=st.integers(0, 4))
def test_greedy_search_and_one_beam_agree_under_any_settings(tiny_model, alpha, min_len, max_len_a, max_len_b,
                                                             eos_boost, seed, prefix_len):
    """Random length limits, min_len, length penalties, prefixes of random lengths (some rows with none), and a
    model that would end early (eos favoured) or not: the same tokens and scores."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, tiny_model.cfg.vocab_size, (6, 7), generator=g)
    src[torch.arange(7) >= torch.randint(1, 8, (6, 1), generator=g)] = PAD_ID  # each row its own length
    prefix = torch.randint(4, tiny_model.cfg.vocab_size, (6, prefix_len), generator=g) if prefix_len else None
    if prefix is not None:
        prefix[torch.arange(prefix_len) >= torch.randint(0, prefix_len + 1, (6, 1), generator=g)] = -1
    search = SearchConfig(beam_size=1, alpha=alpha, min_len=min_len, max_len_a=max_len_a, max_len_b=max_len_b)
    project = tiny_model.project
    tiny_model.project = lambda h: project(h).index_add(-1, torch.tensor([EOS_ID]), torch.full((len(h), 1), eos_boost))
    try:
        ids, scores = greedy_search(tiny_model, src, tiny_model.pad_mask(src), search, prefix)
        beam = beam_search(tiny_model, src, tiny_model.pad_mask(src), search, prefix)
        unscored, _ = greedy_search(tiny_model, src, tiny_model.pad_mask(src), search, prefix, scores=False)
    finally:
        del tiny_model.project
    for row, score, nbest in zip(ids.tolist(), scores.tolist(), beam):
        assert (row[:row.index(EOS_ID)] if EOS_ID in row else row) == nbest[0][0]
        assert abs(score - nbest[0][1]) < 1e-4
    assert torch.equal(unscored, ids)  # the largest logit is the most probable token


class OpNames(TorchDispatchMode):
    """The name of every aten op run under it."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("scores", [True, False])
def test_greedy_search_without_scores_takes_no_exp_over_the_vocabulary(tiny_model, scores):
    """translate, serve and validation never show a greedy translation's score: without one, the log-normalizer
    (an exp of each of V logits, every row, every step) is not computed, and the tokens are the same."""
    src, _ = batch(tiny_model.cfg.vocab_size, B=8, S=9)
    prefix = torch.tensor([[7, 8], [10, -1]] + [[-1, -1]] * 6)
    search = SearchConfig(beam_size=1, min_len=2)
    expected, expected_scores = greedy_search(tiny_model, src, tiny_model.pad_mask(src), search, prefix)
    with OpNames() as ops:
        ids, got_scores = greedy_search(tiny_model, src, tiny_model.pad_mask(src), search, prefix, scores=scores)
    assert torch.equal(ids, expected)
    exps = [name for name in ops.names if name in ("aten::exp", "aten::exp_", "aten::logsumexp", "aten::_log_softmax")]
    if scores:
        assert exps and torch.equal(got_scores, expected_scores) and (got_scores < 0).all()
    else:
        assert exps == [] and (got_scores == 0).all()


def test_a_drawn_translation_starts_with_its_forced_prefix(tiny_model):
    src, _ = batch(tiny_model.cfg.vocab_size, B=3)
    prefix = torch.tensor([[7, 8, 9], [10, -1, -1], [-1, -1, -1]])
    search = SearchConfig(beam_size=1, sample=True, seed=5)
    drawn, _ = greedy_search(tiny_model, src, tiny_model.pad_mask(src), search, prefix)
    assert drawn[0, :3].tolist() == [7, 8, 9] and drawn[1, 0] == 10
    free, _ = greedy_search(tiny_model, src, tiny_model.pad_mask(src), search)
    assert not torch.equal(drawn[:2, :3], free[:2, :3])


def test_batched_beam_search_equals_one_sentence_at_a_time(tiny_model):
    src, _ = batch(tiny_model.cfg.vocab_size)
    pad = tiny_model.pad_mask(src)
    search = SearchConfig(beam_size=4, nbest=3, max_len_a=0, max_len_b=8)
    batched = beam_search(tiny_model, src, pad, search)
    for b in range(3):
        length = int((~pad[b]).sum())
        single = beam_search(tiny_model, src[b:b + 1, :length], pad[b:b + 1, :length], search)
        assert [h for h, _ in single[0]] == [h for h, _ in batched[b]]
        for (_, s1), (_, s2) in zip(single[0], batched[b]):
            assert abs(s1 - s2) < 1e-4



def test_the_first_step_decodes_one_row_per_sentence_whose_k_best_start_k_different_beams(tiny_model, monkeypatch):
    """All K beams of a sentence start as bos: the first step decodes that row once, not K times (CTranslate2
    does the same on a CPU), and its K best continuations become K different beams."""
    src, _ = batch(tiny_model.cfg.vocab_size)
    rows, decode_step = [], tiny_model.decode_step
    monkeypatch.setattr(tiny_model, "decode_step", lambda *args: rows.append(args[0].size(0)) or decode_step(*args))
    out = beam_search(tiny_model, src, tiny_model.pad_mask(src), SearchConfig(beam_size=4, nbest=4, max_len_a=0,
                                                                                max_len_b=6))
    assert rows[:2] == [3, 12]
    for nbest in out:
        assert len(nbest) == 4 and len({tuple(hyp) for hyp, _ in nbest}) == 4
        assert len({hyp[0] for hyp, _ in nbest if hyp}) > 1  # the beams did not all take the one best first token

@pytest.mark.parametrize("beam_size", [1, 4])
def test_a_sentence_translates_the_same_alone_and_next_to_a_longer_one(tiny_model, beam_size):
    """The output length limit is a * (the sentence's own source length) + b, not the batch's longest."""
    src, _ = batch(tiny_model.cfg.vocab_size)
    pad = tiny_model.pad_mask(src)
    lengths = (~pad).sum(1)
    short = int(lengths.argmin())
    assert lengths.max() > lengths[short]  # the batch has a longer sentence
    search = SearchConfig(beam_size=beam_size, max_len_a=1.0, max_len_b=1)
    batched = beam_search(tiny_model, src, pad, search)
    n = int(lengths[short])
    alone = beam_search(tiny_model, src[short:short + 1, :n], pad[short:short + 1, :n], search)
    assert alone[0][0][0] == batched[short][0][0]
    assert len(alone[0][0][0]) <= n + 1
    greedy_batched = greedy_search(tiny_model, src, pad, search)[0][short].tolist()
    greedy_alone = greedy_search(tiny_model, src[short:short + 1, :n], pad[short:short + 1, :n], search)[0][0].tolist()
    assert greedy_batched[:len(greedy_alone)] == greedy_alone and set(greedy_batched[len(greedy_alone):]) <= {PAD_ID}


def test_greedy_gives_each_sentence_its_own_output_as_others_finish_and_leave_the_batch(tiny_model):
    """Five sentences whose length limits end them at five different steps: after each one leaves the batch
    (its rows dropped from memory and caches), every other still gets what it gets alone."""
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, tiny_model.cfg.vocab_size, (5, 9), generator=g)
    for b, n in enumerate([9, 3, 7, 1, 5]):
        src[b, n:] = PAD_ID
    pad = tiny_model.pad_mask(src)
    search = SearchConfig(beam_size=1, max_len_a=1.0, max_len_b=0)  # limit = the sentence's own length
    batched = greedy_search(tiny_model, src, pad, search)[0].tolist()
    for b, n in enumerate([9, 3, 7, 1, 5]):
        alone = greedy_search(tiny_model, src[b:b + 1, :n], pad[b:b + 1, :n], search)[0][0].tolist()
        assert batched[b][:len(alone)] == alone and set(batched[b][len(alone):]) <= {PAD_ID}
        assert EOS_ID in alone and len(alone) <= n + 1


@pytest.mark.parametrize("beam_size", [1, 4])
def test_beam_search_reads_back_from_the_device_a_few_times_a_step(tiny_model, beam_size, monkeypatch):
    """On a GPU each read of a value waits for the GPU. The finished hypotheses of a step are read back
    together, not value by value (3 reads each: 200 sentences at beam 5 made 178 reads a step)."""
    src, _ = batch(tiny_model.cfg.vocab_size, B=16, S=9)
    steps = []
    decode_step = tiny_model.decode_step
    monkeypatch.setattr(tiny_model, "decode_step", lambda *args: steps.append(1) or decode_step(*args))
    with HostSyncs() as syncs, torch.no_grad():
        nbest = beam_search(tiny_model, src, tiny_model.pad_mask(src),
                            SearchConfig(beam_size=beam_size, nbest=beam_size))
    assert all(len(hyps) == beam_size for hyps in nbest)  # 16 * beam_size hypotheses finished
    assert len(syncs.seen) <= len(steps) + 2, (syncs.seen, len(steps))  # the finished hypotheses' one read


def test_greedy_search_reads_back_from_the_device_a_few_times_a_step(tiny_model, monkeypatch):
    src, _ = batch(tiny_model.cfg.vocab_size, B=16, S=9)
    steps = []
    decode_step = tiny_model.decode_step
    monkeypatch.setattr(tiny_model, "decode_step", lambda *args: steps.append(1) or decode_step(*args))
    with HostSyncs() as syncs, torch.no_grad():
        greedy_search(tiny_model, src, tiny_model.pad_mask(src), SearchConfig(beam_size=1))
    # a read of how many sentences ended each step, and where some did, which (after that read: no wait)
    assert len(syncs.seen) <= 2 * len(steps), (syncs.seen, len(steps))


def test_the_next_tokens_are_chosen_without_a_read_from_the_device(tiny_model):
    """A read inside would wait for the decoder's step before the projection could be queued (on a GPU)."""
    h = torch.randn(50, tiny_model.cfg.d_model)
    must_end, forced = torch.rand(50) < 0.2, torch.where(torch.rand(50) < 0.2, 7, -1)
    with HostSyncs() as syncs, torch.no_grad():
        top_next_tokens(tiny_model, h, 3, eos_allowed=False, must_end=must_end, forced=forced, rows_per_chunk=16)
    assert syncs.seen == []


def test_min_len_and_max_len_bound_the_output(tiny_model):
    src, _ = batch(tiny_model.cfg.vocab_size)
    pad = tiny_model.pad_mask(src)
    out = beam_search(tiny_model, src, pad, SearchConfig(beam_size=3, max_len_a=0, max_len_b=5, min_len=5))
    assert all(len(h) == 5 for hyps in out for h, _ in hyps)


@pytest.mark.parametrize("settings,message", [
    (dict(beam_size=0), "beam_size=0 must be at least 1"),
    (dict(beam_size=2, nbest=3), "nbest=3 exceeds beam_size=2"),
    (dict(max_len_a=-1.0), "max_len_a=-1.0 must not be negative"),
    (dict(precision="fp16"), "precision=fp16: expected one of auto, 32, bf16, 16, int8"),
])
def test_impossible_search_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        SearchConfig(**settings)


@pytest.mark.parametrize("V", [50, 7317, 8000])
def test_blockwise_topk_equals_topk(V):
    torch.manual_seed(V)
    x = torch.randn(37, V)
    x[0, -3:] = 20.0 + torch.arange(3.0)  # the winners in the columns after the last whole block
    x[1, :3] = 10.0 + torch.arange(3.0)  # and in the first block
    values, ids = blockwise_topk(x, 10)
    expected_values, expected_ids = x.topk(10, dim=-1)
    assert torch.equal(values, expected_values) and torch.equal(ids, expected_ids)


def test_greedy_top1_is_the_same_for_a_row_alone_and_in_a_batch():
    """Below GREEDY_BLOCKWISE_ROWS rows greedy's top-1 is `max`, from there the blocks: with maxima tied within a
    block and across blocks, a row alone gets the id it gets in a batch (the first of the tied), so a line's
    translation does not depend on how many lines share its batch."""
    torch.manual_seed(0)
    x = torch.randint(-40, 3, (GREEDY_BLOCKWISE_ROWS + 8, 7317)).float()  # the top value 2 some 50 times a row
    x[::3, ::64] = 2.0  # and at the start of every block, in every third row
    values, ids = blockwise_topk(x, 1)  # through the blocks
    alone = [blockwise_topk(x[r:r + 1], 1) for r in range(len(x))]  # through max
    assert torch.equal(ids, torch.cat([i for _, i in alone])) and torch.equal(values, torch.cat([v for v, _ in alone]))
    first = (x == x.amax(dim=1, keepdim=True)).float().argmax(dim=1, keepdim=True)  # the first column at the max
    assert torch.equal(ids, first)


@pytest.mark.parametrize("pays", [True, False])
def test_an_int8_model_takes_logits_in_blocks_that_its_faster_product_runs_on(tiny_model, pays, monkeypatch):
    """Where oneDNN's int8 product pays it takes calls of ONEDNN_ROWS rows or more: the output projection's
    blocks grow to that size; a float model, or int8 through fbgemm alone, keeps cache-sized blocks."""
    monkeypatch.setattr(seq2seq.search, "onednn_pays", lambda: pays)
    int8 = Int8Transformer(tiny_model)
    assert cpu_logit_rows(tiny_model) == CPU_LOGIT_ROWS
    assert cpu_logit_rows(int8) == cpu_logit_rows(Ensemble([int8, int8])) == (ONEDNN_ROWS if pays else CPU_LOGIT_ROWS)
    assert cpu_logit_rows(Ensemble([int8, tiny_model])) == CPU_LOGIT_ROWS

def test_the_next_tokens_are_the_same_in_blocks_of_rows_as_all_at_once(tiny_model):
    """Blocks of 64 rows (a CPU's cache) or one block (a GPU): the same log P and ids, with forced rows, rows
    at their length limit and eos not yet allowed in the same step."""
    torch.manual_seed(0)
    N = 150
    h = torch.randn(N, tiny_model.cfg.d_model)
    must_end = torch.rand(N) < 0.1
    forced = torch.where((torch.rand(N) < 0.1) & ~must_end, torch.randint(4, 40, (N,)), -1)
    with torch.no_grad():
        rules = dict(eos_allowed=False, must_end=must_end, forced=forced)
        blocks = top_next_tokens(tiny_model, h, 6, rows_per_chunk=64, **rules)
        whole = top_next_tokens(tiny_model, h, 6, rows_per_chunk=N, **rules)
    assert torch.equal(blocks[1], whole[1]) and torch.allclose(blocks[0], whole[0])
    assert (blocks[1][must_end, 0] == EOS_ID).all() and (blocks[1][forced >= 0, 0] == forced[forced >= 0]).all()


def test_sampling_is_reproducible_for_a_seed_and_differs_across_seeds(tiny_model):
    src, _ = batch(tiny_model.cfg.vocab_size, B=3)
    mask = tiny_model.pad_mask(src)
    draw = lambda **kw: greedy_search(tiny_model, src, mask, SearchConfig(beam_size=1, sample=True, **kw))[0]  # noqa: E731
    with torch.no_grad():
        assert torch.equal(draw(seed=1), draw(seed=1))
        assert not torch.equal(draw(seed=1), draw(seed=2))
        greedy, _ = greedy_search(tiny_model, src, mask, SearchConfig(beam_size=1))
        # rows where this untrained model's argmax is a word (sampling never draws <pad> or <s>)
        words = [r for r, row in enumerate(greedy.tolist()) if BOS_ID not in row[:row.index(EOS_ID)]]
        assert words
        assert torch.equal(draw(seed=1, top_k=1)[words], greedy[words])  # top_k=1 leaves only the argmax
        assert torch.equal(draw(seed=3, top_p=1e-6)[words], greedy[words])  # so does a tiny nucleus


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
    from seq2seq.search import draw

    logits = torch.log(torch.tensor([[0.05, 0.05, 0.05, 0.05, 0.5, 0.3, 0.1, 0.0 + 1e-9]]))  # ids 4, 5, 6 likely
    generator = torch.Generator().manual_seed(0)
    drawn = {int(draw(logits, SearchConfig(beam_size=1, sample=True, top_k=2), generator)) for _ in range(200)}
    assert drawn == {4, 5}
    drawn = {int(draw(logits, SearchConfig(beam_size=1, sample=True, top_p=0.75), generator)) for _ in range(200)}
    assert drawn == {4, 5}  # 0.5 + 0.3 reaches 0.75: the nucleus is ids 4 and 5
    drawn = {int(draw(logits, SearchConfig(beam_size=1, sample=True), generator)) for _ in range(400)}
    assert {0, 2} & drawn == set() and {4, 5, 6} <= drawn  # pad and bos never; the rest by probability


@pytest.mark.parametrize("settings, message", [
    (dict(sample=True, nbest=2), "sample=true draws one translation per line"),
    (dict(temperature=0.0), "need temperature > 0"),
    (dict(top_p=1.5), "0 < top_p <= 1"),
])
def test_impossible_sampling_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        SearchConfig(**settings)


def test_a_forced_prefix_starts_every_hypothesis_and_its_own_best_prefix_changes_nothing(tiny_model):
    src, _ = batch(tiny_model.cfg.vocab_size, B=3)
    mask = tiny_model.pad_mask(src)
    search = SearchConfig(beam_size=3, nbest=3)
    with torch.no_grad():
        free = beam_search(tiny_model, src, mask, search)
        own = torch.tensor([hyps[0][0][:2] for hyps in free])  # each sentence's own best first two tokens
        again = beam_search(tiny_model, src, mask, search, prefix=own)
        assert [hyps[0] for hyps in again] == [hyps[0] for hyps in free]  # same best hypothesis, same score
        chosen = torch.tensor([[7, 8, 9], [10, -1, -1], [-1, -1, -1]])  # -1: no more prefix for that sentence
        forced = beam_search(tiny_model, src, mask, search, prefix=chosen)
    assert all(hyp[:3] == [7, 8, 9] for hyp, _ in forced[0]) and all(hyp[:1] == [10] for hyp, _ in forced[1])
    assert forced[2] == free[2]  # no prefix: as before


def test_a_translator_given_only_empty_lines_returns_empty_lines(tiny_model, tokenizer):
    """No line to search: no batch at all (a chunk of blank lines in `translate` or the service)."""
    from seq2seq.checkpoint import TextInfo
    from seq2seq.translator import Translator

    info = TextInfo("en", "ja", normalize=False, bleu_tokenize="ja-mecab", data_config={})
    translator = Translator(tiny_model, tokenizer, info, device="cpu")
    assert translator.translate(["", "  "], precision="32") == ["", ""]
    assert translator.translate(["", "\x00\x01\x1f"], precision="32")[0] == ""  # control characters: no crash


@pytest.mark.parametrize("beam_size", [1, 3])
def test_visualize_and_explain_draw_the_translation_that_translate_gives(tiny_model, tokenizer, beam_size):
    from seq2seq.checkpoint import TextInfo
    from seq2seq.translator import Translator

    info = TextInfo("en", "ja", normalize=False, bleu_tokenize="ja-mecab", data_config={})
    translator = Translator(tiny_model, tokenizer, info, device="cpu")
    search = SearchConfig(beam_size=beam_size, precision="32", max_len_b=12)
    for line in ("the cat sat on the mat .", "a dog ."):
        translation = translator.translate(line, search)
        src_ids = translator.encode(translator.prepare([line]))[0]
        assert tokenizer.decode([translator.best_ids(src_ids, search)])[0] == translation


def test_translate_leaves_out_greedy_scores_and_translate_nbest_keeps_them(tiny_model, tokenizer):
    """`translate` returns text only (as do the CLI without nbest, the service and validation): its greedy search
    computes no log-normalizer. `translate_nbest`, which returns scores, still gets them; the text is the same."""
    from seq2seq.checkpoint import TextInfo
    from seq2seq.translator import Translator

    info = TextInfo("en", "ja", normalize=False, bleu_tokenize="ja-mecab", data_config={})
    translator = Translator(tiny_model, tokenizer, info, device="cpu")
    lines, search = ["the cat sat on the mat .", "a dog ."], SearchConfig(beam_size=1, precision="32", max_len_b=12)
    translator.translate(lines, search)  # the first fp32 call on a CPU builds its model (stepped_copy): not spied on
    with OpNames() as ops:
        texts = translator.translate(lines, search)
    assert "aten::logsumexp" not in ops.names and "aten::exp" not in ops.names
    nbest = translator.translate_nbest(lines, search)
    assert [hyps[0][0] for hyps in nbest] == texts and all(hyps[0][1] < 0 for hyps in nbest)


def test_translator_calls_sentencepiece_a_string_at_a_time(tiny_model, tokenizer, monkeypatch):
    """SentencePiece starts a pool of threads at each call with a list, even of one thread, and it waits for cores
    that torch's OpenMP threads spin on (seq2seq/tokenizer.py): the translator encodes its lines and prefixes, and
    decodes its translations, one string (one id list) a call."""
    from seq2seq.checkpoint import TextInfo
    from seq2seq.translator import Translator

    calls, encode, decode = [], tokenizer.sp.encode, tokenizer.sp.decode
    monkeypatch.setattr(tokenizer.sp, "encode", lambda x, **kw: calls.append(("encode", x)) or encode(x, **kw))
    monkeypatch.setattr(tokenizer.sp, "decode", lambda x, **kw: calls.append(("decode", x)) or decode(x, **kw))
    info = TextInfo("en", "ja", normalize=False, bleu_tokenize="ja-mecab", data_config={})
    translator = Translator(tiny_model, tokenizer, info, device="cpu")
    out = translator.translate_nbest(["the cat sat on the mat .", "a dog ."], SearchConfig(
        beam_size=2, nbest=2, precision="32", max_len_b=4), prefixes=["", "a"])
    encoded = [x for kind, x in calls if kind == "encode"]
    decoded = [x for kind, x in calls if kind == "decode"]
    assert len(encoded) == 4 and all(isinstance(x, str) for x in encoded)  # two lines, two prefixes
    assert len(decoded) == 4 and all(isinstance(i, int) for x in decoded for i in x)  # two translations a line
    assert sorted(text for nbest in out for text, _ in nbest) == sorted(decode(x) for x in decoded)  # batch order


@pytest.mark.parametrize("precision, inference", [("32", True), ("int8", True), ("bf16", False)])
def test_translator_decodes_in_inference_mode_except_under_autocast(tiny_model, tokenizer, precision, inference):
    """Inference mode drops version counters and view tracking (faster one sentence at a time), but under autocast
    it turns off the cache of weights cast to bf16, so there the translator leaves it off. The int8 copy is made
    before inference mode starts: ordinary tensors, which later calls in any mode can use."""
    from seq2seq.checkpoint import TextInfo
    from seq2seq.translator import Translator

    info = TextInfo("en", "ja", normalize=False, bleu_tokenize="ja-mecab", data_config={})
    translator = Translator(tiny_model, tokenizer, info, device="cpu")
    with translator.decoding(SearchConfig(precision=precision)) as model:
        assert torch.is_inference_mode_enabled() == inference  # (search itself runs under no_grad)
        assert not any(t.is_inference() for t in model.state_dict().values())
    assert translator.translate("a dog .", beam_size=1, precision=precision, max_len_b=4) is not None
