"""Decoding over the plain Transformer: greedy search with the incremental (KV-cached) decoder."""
import torch

from seq2seq.model import Transformer
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID


def max_output_len(src_pad_mask: torch.Tensor, model: Transformer, max_len_a: float, max_len_b: int) -> int:
    """a * (longest source) + b, capped by the position table."""
    src_len = int((~src_pad_mask).sum(1).max())
    return min(int(max_len_a * src_len + max_len_b), model.cfg.max_len - 1)


@torch.no_grad()
def greedy_search(model: Transformer, src: torch.Tensor, src_pad_mask: torch.Tensor,
                  max_len_a: float = 1.5, max_len_b: int = 10) -> torch.Tensor:
    """Pick the most probable token at each step until every sentence has produced eos.

    Args: src (B, S) ids; src_pad_mask (B, S), True at padding.
    Returns: (B, T) ids without bos; eos ends each sentence, pad follows it.
    """
    memory = model.encode(src, src_pad_mask)
    ys = torch.full((src.size(0), 1), BOS_ID, dtype=torch.long, device=src.device)
    finished = torch.zeros(src.size(0), dtype=torch.bool, device=src.device)
    cache = [{} for _ in model.decoder_layers]
    for _ in range(max_output_len(src_pad_mask, model, max_len_a, max_len_b)):
        logits = model.project(model.decode_step(ys[:, -1:], memory, src_pad_mask, cache))  # (B, V)
        next_token = logits.argmax(-1).masked_fill(finished, PAD_ID)  # (B,)
        ys = torch.cat([ys, next_token[:, None]], dim=1)
        finished |= next_token.eq(EOS_ID)
        if finished.all():
            break
    return ys[:, 1:]


def length_penalty(length: int, alpha: float) -> float:
    """GNMT (Wu et al., 2016, eq. 14): lp(Y) = ((5 + |Y|) / 6) ** alpha; scores are log P / lp."""
    return ((5 + length) / 6) ** alpha


def reorder_cache(cache: list[dict], order: torch.Tensor) -> None:
    """Make row i of every self-attention key/value cache the old row order[i] (beams were re-ranked).

    The cross-attention cache needs no reordering: all K beams of a sentence share its memory.
    """
    for layer in cache:
        for name in ("key", "value"):
            layer["self"][name] = layer["self"][name].index_select(0, order)


@torch.no_grad()
def beam_search(model: Transformer, src: torch.Tensor, src_pad_mask: torch.Tensor, beam_size: int = 5,
                alpha: float = 0.6, nbest: int = 1, max_len_a: float = 1.5, max_len_b: int = 10,
                min_len: int = 0) -> list[list[tuple[list[int], float]]]:
    """Keep the beam_size best prefixes per sentence; finished hypotheses are ranked by log P / lp.

    Outputs have at least `min_len` and at most `max_len_a * S + max_len_b` tokens before eos.

    Args: src (B, S) ids; src_pad_mask (B, S), True at padding.
    Returns: for each sentence, the nbest (tokens without bos/eos, score) pairs, best first.
    """
    B, K = src.size(0), beam_size
    memory = model.encode(src, src_pad_mask).repeat_interleave(K, dim=0)  # (B*K, S, D)
    pad_mask = src_pad_mask.repeat_interleave(K, dim=0)  # (B*K, S)
    cache = [{} for _ in model.decoder_layers]
    tokens = torch.full((B * K, 1), BOS_ID, dtype=torch.long, device=src.device)
    scores = torch.zeros(B, K, device=src.device)
    scores[:, 1:] = float("-inf")  # all beams start as the same prefix: let only one of them expand
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    max_len = max_output_len(src_pad_mask, model, max_len_a, max_len_b)
    for step in range(max_len + 1):  # max_len tokens, then eos
        logits = model.project(model.decode_step(tokens[:, -1:], memory, pad_mask, cache)).float()  # (B*K, V)
        log_z = logits.logsumexp(dim=-1, keepdim=True)  # (B*K, 1): log P(v) = logit_v - log_z
        if step < min_len:
            logits[:, EOS_ID] = float("-inf")
        if step == max_len:  # out of room: every beam must end now
            logits[:, :EOS_ID] = float("-inf")
            logits[:, EOS_ID + 1:] = float("-inf")
        # The 2K best of a sentence's K*V continuations are among the 2K best of each beam, so only
        # those are scored: no (B*K, V) log-softmax or sum is ever built.
        beam_logits, beam_tokens = logits.topk(2 * K, dim=-1)  # (B*K, 2K)
        candidates = (scores.view(B * K, 1) + beam_logits - log_z).view(B, K * 2 * K)
        top_scores, top_ids = candidates.topk(2 * K, dim=1)  # (B, 2K): enough to keep K that do not end
        beam, token = top_ids // (2 * K), beam_tokens.view(B, K * 2 * K).gather(1, top_ids)
        collect_finished(finished, top_scores, beam, token, tokens.view(B, K, -1), K, alpha, step + 1)
        if all(len(f) >= K for f in finished):
            break
        alive_scores = top_scores.masked_fill(token.eq(EOS_ID), float("-inf"))
        scores, pick = alive_scores.topk(K, dim=1)  # (B, K)
        order = (beam.gather(1, pick) + torch.arange(B, device=src.device)[:, None] * K).view(-1)  # (B*K,)
        reorder_cache(cache, order)
        tokens = torch.cat([tokens[order], token.gather(1, pick).view(-1, 1)], dim=1)  # (B*K, step + 2)
    return [[(hyp, score) for score, hyp in sorted(f, key=lambda x: -x[0])[:nbest]] for f in finished]


def collect_finished(finished, top_scores, beam, token, prefixes, K: int, alpha: float, length: int) -> None:
    """Move candidates that end in eos among a sentence's top K into its finished list."""
    ends = token[:, :K].eq(EOS_ID) & top_scores[:, :K].isfinite()  # (B, K)
    for b, k in ends.nonzero().tolist():
        if len(finished[b]) < K:
            hyp = prefixes[b, beam[b, k], 1:].tolist()
            finished[b].append((float(top_scores[b, k]) / length_penalty(length, alpha), hyp))
