"""Decoding over the plain Transformer: greedy and beam search with the incremental (KV-cached) decoder;
the length penalty follows GNMT. SearchConfig holds every decoding default, once."""
from dataclasses import dataclass

import torch

from seq2seq import Seq2SeqError
from seq2seq.hardware import precision_name, rows_per_block
from seq2seq.int8 import ONEDNN_ROWS, Int8Transformer, onednn_pays
from seq2seq.model import Transformer
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID


@dataclass
class SearchConfig:
    """How to decode. The one place these defaults live: `run.py` gives them to Hydra as the `search`
    config that translate, evaluate and visualize merge at their root (so `beam_size=3` works on their
    command lines), and `Translator.translate(lines, beam_size=3)` takes the same names."""

    beam_size: int = 5  # 1 = greedy
    alpha: float = 1.2  # GNMT length penalty: hypotheses are ranked by log P / lp. 1.2 beat GNMT's 0.6 on dev in
                        # 9 of 10 checkpoints of the default recipe, both directions (docs/results.md)
    nbest: int = 1  # hypotheses returned per sentence, best first
    min_len: int = 0  # at least this many tokens before eos
    max_len_a: float = 1.5  # at most a * (source length) + b tokens before eos
    max_len_b: int = 10
    max_tokens: int = 4096  # batch budget in padded source tokens (translate, evaluate)
    precision: str | int = "auto"  # auto, 32, bf16, 16 or int8 (seq2seq/hardware.py); Hydra reads 32 as an int
    device: str = "auto"  # auto (the CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N
    sample: bool = False  # draw each token instead of searching (one translation per line)
    temperature: float = 1.0  # sampling: logits / temperature (below 1: closer to greedy)
    top_k: int = 0  # sampling: only the k most probable tokens (0: all)
    top_p: float = 1.0  # sampling: only the most probable tokens whose probabilities sum to p (nucleus)
    seed: int = 0  # sampling: the same seed, input and settings give the same output

    def __post_init__(self):
        for name in ("beam_size", "nbest", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("alpha", "min_len", "max_len_a", "max_len_b"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must not be negative")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p}: "
                             "need temperature > 0, top_k >= 0 and 0 < top_p <= 1")
        if self.sample and self.nbest > 1:
            raise ValueError(f"sample=true draws one translation per line; nbest={self.nbest} needs beam search")
        if self.nbest > self.beam_size:
            raise ValueError(f"nbest={self.nbest} exceeds beam_size={self.beam_size}: a beam keeps only that many")
        try:
            self.precision = precision_name(self.precision)
        except Seq2SeqError as e:
            raise ValueError(str(e)) from None


def max_output_lens(src_pad_mask: torch.Tensor, model: Transformer, max_len_a: float, max_len_b: int) -> torch.Tensor:
    """Each sentence's output limit, a * (its source length) + b, capped by the position table. (B,)

    Per sentence, so that a translation never depends on which other sentences share its batch.
    """
    src_len = (~src_pad_mask).sum(1)  # (B,)
    return (max_len_a * src_len + max_len_b).long().clamp(max=model.cfg.max_len - 1)


ENCODE_GROUP_ROWS = 64  # rows the encoder takes at a time in a larger batch on a CPU (encode_by_length) ...
ENCODE_GROUP_PADDING = 0.25  # ... where at least this share of the batch's positions is padding
CPU_LOGIT_ROWS = 64  # top_next_tokens on a CPU: rows of logits per block, which then stays in the CPU's cache


def cpu_logit_rows(model: Transformer) -> int:
    """Rows per block of logits on a CPU: CPU_LOGIT_ROWS, or ONEDNN_ROWS for an int8 model where oneDNN's int8
    product pays (seq2seq/int8.py), so that its output projection runs through it. Measured on a 2-core AVX2 EPYC
    against 64-row blocks through fbgemm: beam 5 1.054x (natural length and forced 20), greedy 1.009x; 512 rows
    1.050x. (Without oneDNN, 128-256 rows were 10% faster for top_next_tokens there, but slower on a Xeon.)"""
    int8 = all(isinstance(m, Int8Transformer) for m in getattr(model, "members", [model]))  # an Ensemble's too
    return ONEDNN_ROWS if int8 and onednn_pays() else CPU_LOGIT_ROWS


def attention_padding(src_pad_mask: torch.Tensor) -> torch.Tensor | None:
    """The source padding mask for the attention layers: None where no position of the batch is padding (one
    sentence, or sentences of one length). A mask that hides nothing leaves every output bit for bit the same,
    yet costs each attention call a conversion of the mask and an add: 4-10% of a decoding step at one row a
    step on a 2-core Xeon (fp32; int8 under the AVX2 caps). Reads one value back from the device."""
    return src_pad_mask if bool(src_pad_mask.any()) else None


def encode_by_length(model: Transformer, src: torch.Tensor, src_pad_mask: torch.Tensor | None,
                     group_rows: int | None = None) -> torch.Tensor:
    """The encoder's memory (B, S, D), its rows encoded `group_rows` (on a CPU ENCODE_GROUP_ROWS) at a time in
    order of length, each group cut to its own longest row. A token-budget batch pads every row to the
    longest of them all, and the encoder pays for each padded position (the 500 small_parallel_enja test
    sentences in one batch: 5,370 real tokens of 11,000). Positions past a group's longest row stay zero;
    src_pad_mask hides them (None: no padding, `attention_padding`). A batch of rows of about one length is
    encoded whole: there, groups cost more calls than they save. So is any batch on a GPU, where padded
    positions cost little next to the kernel launches of each group and the wait for its longest row's length
    (a host sync per group).
    """
    group_rows = group_rows or (ENCODE_GROUP_ROWS if src.device.type == "cpu" else src.size(0))
    if src_pad_mask is None or src.size(0) <= group_rows or src_pad_mask.float().mean() < ENCODE_GROUP_PADDING:
        return model.encode(src, src_pad_mask)
    lengths = (~src_pad_mask).sum(1)  # (B,)
    memory = None
    for rows in lengths.argsort().split(group_rows):
        longest = max(int(lengths[rows].max()), 1)
        part = model.encode(src[rows, :longest], attention_padding(src_pad_mask[rows, :longest]))  # (G, longest, D)
        if memory is None:
            memory = part.new_zeros(src.size(0), src.size(1), part.size(-1))
        memory[rows, :longest] = part
    return memory


def output_limits(model: Transformer, src_pad_mask: torch.Tensor, search: SearchConfig,
                  prefix: torch.Tensor | None) -> torch.Tensor:
    """Each sentence's last step (`max_output_lens`), moved on where its forced prefix needs more. (B,)"""
    limit = max_output_lens(src_pad_mask, model, search.max_len_a, search.max_len_b)
    if prefix is not None:  # room for the whole prefix before the forced eos
        limit = torch.maximum(limit, (prefix >= 0).sum(1).clamp(max=model.cfg.max_len - 2))
    return limit


@torch.no_grad()
def greedy_search(model: Transformer, src: torch.Tensor, src_pad_mask: torch.Tensor, search: SearchConfig,
                  prefix: torch.Tensor | None = None, scores: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the most probable token at each step (or draw one, with `search.sample`) until every sentence
    has produced eos: beam search with one beam, the same outputs and scores, without the beams' ranking.

    Of `search`, the length limits (min_len, `max_output_lens`), the length penalty and the sampling
    settings apply; a `prefix` forces each sentence's first tokens, as in beam search. A sentence that has
    ended leaves the batch, so that later steps compute only the sentences still being written. With
    `scores=False` the tokens are taken from the logits as they are: the most probable token is the one with
    the largest logit, and the log-normalizer (an exp over all V logits of every row, every step) is skipped.
    Args: src (B, S) ids; src_pad_mask (B, S), True at padding; prefix (B, P) ids, -1 after a sentence's own.
    Returns: (B, T) ids without bos, eos ending each sentence and pad following it; and (B,) scores,
    log P / lp as beam search ranks its hypotheses (0 where sampled or not asked for).
    """
    limit = output_limits(model, src_pad_mask, search, prefix)  # (B,)
    src_pad_mask = attention_padding(src_pad_mask)  # None for one sentence
    memory = encode_by_length(model, src, src_pad_mask)
    last_steps = set(limit.tolist())  # the steps at which some sentence must end: read once, not once a step
    out = torch.full((src.size(0), max(last_steps) + 1), PAD_ID, dtype=torch.long, device=src.device)
    final = torch.zeros(src.size(0), device=src.device)  # (B,): log P / lp once a sentence has ended
    log_p = torch.zeros(src.size(0), device=src.device)  # (B',): log P of each prefix still being written
    alive = torch.arange(src.size(0), device=src.device)  # the sentences still written (their rows in out)
    last = torch.full((src.size(0), 1), BOS_ID, dtype=torch.long, device=src.device)  # (B', 1)
    cache = [{} for _ in model.decoder_layers]
    generator = torch.Generator(src.device).manual_seed(search.seed) if search.sample else None
    for step in range(out.size(1)):
        h = model.decode_step(last, memory, src_pad_mask, cache)  # (B', D)
        forced = prefix[:, step] if prefix is not None and step < prefix.size(1) else None  # (B',)
        if search.sample:
            next_token = draw(model.project(h), search, generator).masked_fill(limit.eq(step), EOS_ID)
            next_token = next_token if forced is None else torch.where(forced >= 0, forced, next_token)
        else:
            must_end = limit.eq(step) if step in last_steps else None  # (B',)
            best_log_p, best = top_next_tokens(model, h, 1, eos_allowed=step >= search.min_len,
                                               must_end=must_end, forced=forced, log_p=scores)  # (B', 1) each
            log_p, next_token = log_p + best_log_p[:, 0] if scores else log_p, best[:, 0]
        out[alive, step] = next_token
        ended = next_token.eq(EOS_ID)
        n_ended = int(ended.sum())  # the step's one host sync
        if n_ended and scores and not search.sample:
            final[alive] = torch.where(ended, log_p / length_penalty(step + 1, search.alpha), final[alive])
        if n_ended == alive.size(0):
            break
        if n_ended:
            keep = (~ended).nonzero().squeeze(1)
            alive, limit, next_token, log_p = alive[keep], limit[keep], next_token[keep], log_p[keep]
            prefix = prefix[keep] if prefix is not None else None
            memory, src_pad_mask = memory[keep], src_pad_mask[keep] if src_pad_mask is not None else None
            reorder_cache(cache, keep)
            drop_sentences(cache, keep)
        last = next_token[:, None]
    return out[:, :step + 1], final


def draw(logits: torch.Tensor, search: SearchConfig, generator: torch.Generator) -> torch.Tensor:
    """One token per row from softmax(logits / temperature), cut to the top_k and the top_p nucleus. (B,)"""
    scores = logits.float() / search.temperature  # (B, V)
    scores[:, [PAD_ID, BOS_ID]] = float("-inf")  # never drawn: they are not words
    if search.top_k:
        kth = scores.topk(min(search.top_k, scores.size(-1))).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if search.top_p < 1:
        ordered, order = scores.sort(dim=-1, descending=True)
        before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # probability mass ahead of each token
        drop = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order, before >= search.top_p)
        scores = scores.masked_fill(drop, float("-inf"))  # the most probable token always stays
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]


def length_penalty(length: int, alpha: float) -> float:
    """GNMT (Wu et al., 2016, eq. 14): lp(Y) = ((5 + |Y|) / 6) ** alpha; scores are log P / lp."""
    return ((5 + length) / 6) ** alpha


def reorder_cache(cache: list[dict], order: torch.Tensor) -> None:
    """Make row i of every self-attention key/value cache the old row order[i] (beams were re-ranked).

    The cross-attention cache needs no reordering: it holds one row per sentence, shared by its K beams.
    """
    for layer in cache:
        layer["self"].reorder(order)


@torch.no_grad()
def beam_search(model: Transformer, src: torch.Tensor, src_pad_mask: torch.Tensor,
                search: SearchConfig, prefix: torch.Tensor | None = None) -> list[list[tuple[list[int], float]]]:
    """Keep the beam_size best prefixes per sentence; finished hypotheses are ranked by log P / lp.

    Outputs have at least `min_len` and at most `max_len_a * S + max_len_b` tokens before eos, S being
    each sentence's own source length (`max_output_lens`). A `prefix` forces each sentence's first
    tokens (its score still counts their log P).

    The first step decodes one row per sentence, not K: its K beams would all be the same prefix (bos), so
    the K best of that row's continuations start the beams (as CTranslate2 does on a CPU).

    Args: src (B, S) ids; src_pad_mask (B, S), True at padding; prefix (B, P) ids, -1 after a sentence's own.
    Returns: for each sentence, the nbest (tokens without bos/eos, score) pairs, best first.
    """
    K, alpha, min_len = search.beam_size, search.alpha, search.min_len
    limit = output_limits(model, src_pad_mask, search, prefix)  # (B,): at most limit, then eos
    src_pad_mask = attention_padding(src_pad_mask)  # None for one sentence
    memory = encode_by_length(model, src, src_pad_mask)  # (B, S, D): a sentence's K beams share it (cross_attention)
    cache = [{} for _ in model.decoder_layers]
    alive = torch.arange(src.size(0), device=src.device)  # sentences still searched (their input rows)
    tokens = torch.full((src.size(0), 1), BOS_ID, dtype=torch.long, device=src.device)  # (B, 1): one row each
    scores = torch.zeros(src.size(0), 1, device=src.device)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(src.size(0))]
    last_steps = set(limit.tolist())  # the steps at which some sentence must end: read once, not once a step
    for step in range(max(last_steps) + 1):
        B = alive.size(0)
        W = tokens.size(0) // B  # beams a sentence has now: 1 at the first step, then K
        h = model.decode_step(tokens[:, -1:], memory, src_pad_mask, cache)  # (B*W, D)
        forced = prefix[:, step].repeat_interleave(W) if prefix is not None and step < prefix.size(1) else None
        must_end = limit.eq(step).repeat_interleave(W) if step in last_steps else None  # (B*W,)
        # The 2K best of a sentence's W*V continuations are among the 2K best of each beam, so only
        # those are added to the prefix scores: no (B*W, V) sum is built.
        beam_log_probs, beam_tokens = top_next_tokens(model, h, 2 * K, eos_allowed=step >= min_len,
                                                      must_end=must_end, forced=forced)  # (B*W, 2K)
        candidates = (scores.view(B * W, 1) + beam_log_probs).view(B, W * 2 * K)
        top_scores, top_ids = candidates.topk(2 * K, dim=1)  # (B, 2K): enough to keep K that do not end
        beam, token = top_ids // (2 * K), beam_tokens.view(B, W * 2 * K).gather(1, top_ids)
        collect_finished(finished, alive, top_scores, beam, token, tokens.view(B, W, -1), K, alpha, step + 1)
        searching = [len(finished[b]) < K for b in alive.tolist()]  # (B,), on the host
        if not any(searching):
            break
        alive_scores = top_scores.masked_fill(token.eq(EOS_ID), float("-inf"))
        scores, pick = alive_scores.topk(K, dim=1)  # (B, K)
        order = beam.gather(1, pick) + torch.arange(B, device=src.device)[:, None] * W  # (B, K): rows to extend
        next_token = token.gather(1, pick)  # (B, K)
        if not all(searching):  # drop sentences with K finished hypotheses: later steps skip their rows
            keep = torch.tensor([b for b, more in enumerate(searching) if more], device=src.device)
            alive, scores, order, limit = alive[keep], scores[keep], order[keep], limit[keep]
            next_token = next_token[keep]
            prefix = prefix[keep] if prefix is not None else None
            memory, src_pad_mask = memory[keep], src_pad_mask[keep] if src_pad_mask is not None else None
            drop_sentences(cache, keep)
        order = order.view(-1)  # (B'*K,)
        reorder_cache(cache, order)
        tokens = torch.cat([tokens[order], next_token.view(-1, 1)], dim=1)  # (B'*K, step + 2)
    return [[(hyp, score) for score, hyp in sorted(f, key=lambda x: -x[0])[:search.nbest]] for f in finished]


def search_batch(model: Transformer, src: torch.Tensor, search: SearchConfig,
                 prefix: torch.Tensor | None = None, scores: bool = True) -> list[list[tuple[list[int], float]]]:
    """Each sentence's nbest (tokens without bos/eos, score), best first, as `search` asks: beam search, or for
    one beam (and for sampling) greedy_search, which finds what one beam finds without ranking beams.
    `scores=False`: the caller does not read the scores, so greedy search skips the log-normalizer and gives
    0 (beam search ranks by them, and always has them).
    Args: src (B, S) ids; prefix (B, P) ids, -1 after a sentence's own (forced first tokens)."""
    if search.beam_size > 1 and not search.sample:
        return beam_search(model, src, model.pad_mask(src), search, prefix)
    rows, scores = greedy_search(model, src, model.pad_mask(src), search, prefix, scores)
    return [[(row[:row.index(EOS_ID)] if EOS_ID in row else row, score)]
            for row, score in zip(rows.tolist(), scores.tolist())]


def drop_sentences(cache: list[dict], keep: torch.Tensor) -> None:
    """Keep only the sentences `keep` in the cross-attention caches (one row per sentence)."""
    for layer in cache:
        if "cross" in layer:
            for name in ("key", "value"):
                layer["cross"][name] = layer["cross"][name].index_select(0, keep)


def top_next_tokens(model: Transformer, h: torch.Tensor, k: int, eos_allowed: bool, must_end: torch.Tensor | None,
                    forced: torch.Tensor | None = None, rows_per_chunk: int | None = None,
                    log_p: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most probable next tokens for each decoder state h (N, D): (log P (N, k) in fp32, ids (N, k)).
    With `log_p=False`, the same ids with their logits in place of log P: no log-normalizer is computed (an exp
    over each row's V logits), which is what CTranslate2 skips too unless asked for scores.

    Rows where `must_end` (N,) is True reached their length limit: eos is their only continuation
    (it wins over `eos_allowed=False`, the min_len rule); None where the caller knows no row does. `forced`
    (N,): a token id a row must take (a target prefix), or -1. Such a row's one token (its real log P)
    replaces its top k after the top-k, every other entry -inf: no pass over its V logits to mask them.
    Nothing here reads a value back from the device: on a GPU, a read would wait for the decoder's step
    before the projection could be queued. Done `rows_per_chunk` rows at a time (by default
    `rows_per_block`: on a CPU `cpu_logit_rows`, so that each (rows, V) block of logits stays in the CPU
    cache through the projection, the fp32 log-normalizer and the top-k, one pass over memory, not five;
    on a GPU as many as its memory bound allows).
    """
    rows_per_chunk = rows_per_chunk or rows_per_block(h.device, model.cfg.vocab_size, cpu_logit_rows(model))
    only = forced  # (N,): the one token a row may take, -1 where free
    if must_end is not None:
        only = torch.where(must_end, EOS_ID, forced if forced is not None else -1)
    top_log_probs, top_ids = [], []
    for start in range(0, h.size(0), rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        logits = model.project(h[rows]).float()  # (C, V)
        if log_p:  # log P(v) = logit_v - log Z: log_softmax's one fused pass measured 1.6x logsumexp's alone
            logits = logits.log_softmax(dim=-1)
        if only is not None:
            token = only[rows, None]  # (C, 1)
            only_log_p = logits.gather(1, token.clamp(min=0))  # (C, 1), before eos is masked
        if not eos_allowed:
            logits[:, EOS_ID] = float("-inf")
        values, ids = blockwise_topk(logits, k)  # (C, k)
        if only is not None:
            one = torch.cat([only_log_p, only_log_p.new_full((len(token), k - 1), float("-inf"))], dim=1)  # (C, k)
            values, ids = torch.where(token >= 0, one, values), torch.where(token >= 0, token, ids)
        top_log_probs.append(values)
        top_ids.append(ids)
    return torch.cat(top_log_probs), torch.cat(top_ids)


# Greedy's top-1 goes through the blocks from this many rows: below, `max` is faster. On a 2-core AVX2 EPYC, V 7,317:
# the blocks' eight operations cost about 90 us however few the rows (92 us at one row, 146 at 32, 180 at 64), max
# 10 us at one row, 126 at 32, 237 at 64. Both give the first of tied maxima, so no translation depends on which
# runs. Beam search's top-k keeps the blocks at every row count: there ties could come back in another order.
GREEDY_BLOCKWISE_ROWS = 32


def blockwise_topk(x: torch.Tensor, k: int, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """x.topk(k, dim=-1) for x (N, V), from the k blocks of `block` columns with the largest maxima.

    The k largest values of a row lie in those blocks (a value outside them is beaten by k block maxima),
    so the exact top-k runs over k * block candidates instead of V. On a CPU, where topk costs per element,
    this measured 2x faster for V = 7317, k = 10. Ties may come back with other (equally good) ids.
    Returns: values (N, k) and ids (N, k), largest first.
    """
    N, V = x.shape
    if k == 1 and N < GREEDY_BLOCKWISE_ROWS:  # the first largest value, as the blocks give it (tested)
        return x.max(dim=-1, keepdim=True)
    if V < 4 * k * block:
        return x.topk(k, dim=-1)
    full = V // block * block  # columns in whole blocks; the few after them are always candidates
    blocks = x[:, :full].view(N, full // block, block)  # (N, V // block, block)
    top_blocks = blocks.amax(dim=-1).topk(k, dim=-1).indices  # (N, k)
    in_blocks = blocks.gather(1, top_blocks[:, :, None].expand(N, k, block)).view(N, k * block)
    values, i = torch.cat([in_blocks, x[:, full:]], dim=1).topk(k, dim=-1)  # (N, k) over the candidates
    block_ids = top_blocks.gather(1, (i // block).clamp(max=k - 1)) * block + i % block
    return values, torch.where(i < k * block, block_ids, full + i - k * block)


def collect_finished(finished, alive, top_scores, beam, token, prefixes, K: int, alpha: float, length: int) -> None:
    """Move candidates that end in eos among a sentence's top K into its finished list.

    Row b of the step's tensors is sentence alive[b]. The ended candidates are picked on the device and
    read back whole (on a GPU, each value read alone would wait for the GPU: thousands of waits per batch).
    """
    ends = token[:, :K].eq(EOS_ID) & top_scores[:, :K].isfinite()  # (B, K)
    rows, ks = ends.nonzero(as_tuple=True)  # (E,) each, in (b, k) order
    if rows.numel() == 0:
        return
    hyps = prefixes[rows, beam[rows, ks], 1:]  # (E, length - 1)
    for b, hyp, score in zip(alive[rows].tolist(), hyps.tolist(), top_scores[rows, ks].tolist()):
        sentence = finished[b]
        if len(sentence) < K:
            sentence.append((score / length_penalty(length, alpha), hyp))
