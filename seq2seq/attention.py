"""Multi-head attention: one module for encoder self-attention, decoder causal self-attention and
decoder cross-attention, which differ only in where the keys and values come from.

Mask convention: a mask passed in is True where a key must be *hidden* (`src_pad_mask` is True at
padding). It is flipped into the kernel's convention (True = may attend) in `keep_mask` only.
The causal mask is never built by hand for the fast path: SDPA's `is_causal` applies it.

Which kernel runs: `F.scaled_dot_product_attention`, except for bfloat16 on a CPU, where PyTorch's
SDPA kernels measured 1.5-7x slower than the two matmuls and softmax of `attention_weights`
(forward+backward, 4 heads of 64, T=16..512; see the commit that added this; on a later AMX CPU
still 3-7x slower at T=17..64, though 15% faster at T=256), except for large decoding steps on a CPU
(`STEP_QUERIES`), and except when the weights are asked for. Both paths compute the same function.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


# Decoding steps on a CPU: at most STEP_QUERIES queries a row (one position; a sentence's beams in cross-attention)
# and at least STEP_MIN_VECTORS query vectors in all (rows x heads x queries) take the two matmuls and softmax of
# `attention_weights`, not SDPA's flash kernel, whose per-(row, head) work is tiny there. Measured alone on a 2-core
# AVX2 EPYC: 1.15-2.0x from 200-500 vectors, 0.3-0.8x below 100 (one sentence); in decoding, 500 lines: beam 5
# 1.105x, greedy forced 20 1.052x. On a 2-core Xeon (AVX2 caps) without the lower bound: 1.01x on 500 lines, 0.89x
# one sentence greedy.
STEP_QUERIES, STEP_MIN_VECTORS = 8, 512


def keep_mask(key_pad_mask: torch.Tensor | None, causal: bool, T: int, S: int, device) -> torch.Tensor | None:
    """Boolean (B or 1, 1, T, S) mask, True where query t may attend to key s; None where it may attend to all.

    A single causal query (a decoding step: the newest position) sees every key, so it gets no mask: the
    kernel then skips the masking, at every layer of every step."""
    keep = None
    if key_pad_mask is not None:
        keep = ~key_pad_mask[:, None, None, :]  # (B, 1, 1, S)
    if causal and T > 1:
        # query t sees keys 0..t (+ the S - T cached keys before the first query)
        future = torch.ones(T, S, dtype=torch.bool, device=device).triu(S - T + 1)
        keep = ~future[None, None] if keep is None else keep & ~future
    return keep


def explicit_step(vectors: int, queries: int) -> bool:
    """Whether attention with `queries` queries a row and `vectors` query vectors in all (rows x heads x queries) is
    a large decoding step, which on a CPU takes the explicit matmuls and softmax: see STEP_QUERIES."""
    return queries <= STEP_QUERIES and vectors >= STEP_MIN_VECTORS


def decoding_step_on_cpu(query: torch.Tensor) -> bool:
    """Whether query (B, H, T, d_head) is a large decoding step on a CPU (`explicit_step`)."""
    return (query.device.type == "cpu" and not query.requires_grad
            and explicit_step(query.numel() // query.size(-1), query.size(2)))


def kernel_unchanged(attention: "MultiHeadAttention") -> bool:
    """Whether a MultiHeadAttention computes its plain output: no weights stored or recorded, no head switched off."""
    return attention.record is None and not attention.store_weights and attention.head_gate is None


def attention_scores(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Q K^T / sqrt(d_head): how relevant each key is to each query, by dot product. (B, H, T, S)"""
    return query @ key.transpose(-2, -1) / math.sqrt(query.size(-1))


def masked_softmax(scores: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Hidden keys get score -inf, so weight exactly 0; each row then sums to 1 over the keys it may see."""
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores.softmax(dim=-1)


def attention_weights(query: torch.Tensor, key: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_head)) with hidden keys at weight 0: the picture of attention.

    Args: query (B, H, T, d_head), key (B, H, S, d_head), keep (B or 1, 1, T, S) or None.
    Returns: weights (B, H, T, S); each row sums to 1 over the keys it may see.
    """
    return masked_softmax(attention_scores(query, key), keep)


class KVCache:
    """The keys and values of the positions decoded so far, for one decoder self-attention layer.

    They are stored position-major, (room, 2, B, H, d_head), keys then values of each position, with room for
    positions to come: a step writes its new position in place, and `key` and `value` are (B, H, S, d_head) views of
    the first S positions, which the attention reads as they lie. Stored (B, H, S, d_head), as before, every step
    copied the whole cache into a longer tensor: on a 2-core AVX2 EPYC those copies took 164 of 1,064 ms of greedy
    int8 decoding of 500 lines for 20 steps, now 62 (docs/benchmarks.md).

    `append` adds the new positions' keys and values and returns all of them. `reorder(order)`, called when beam
    search re-ranks its hypotheses (or finished sentences leave), makes row i the old row order[i]; it is applied
    at the next `reserve`, which gathers the kept rows into the storage the reorder before it left (`spare`): one
    copy a reorder, and no fresh memory to fault in.
    """

    def __init__(self):
        self.storage: torch.Tensor | None = None  # (room, 2, B, H, d_head): keys, then values, of each position
        self.length = 0  # positions 0..length-1 are filled
        self.order: torch.Tensor | None = None  # (B,): a reorder waiting for the next reserve
        self.spare: torch.Tensor | None = None  # the storage before the last reorder, which the next one reuses

    @property
    def key(self) -> torch.Tensor | None:
        """The cached keys, (B, H, S, d_head): a view."""
        return None if self.storage is None else self.storage[:self.length, 0].permute(1, 2, 0, 3)

    @property
    def value(self) -> torch.Tensor | None:
        """The cached values, (B, H, S, d_head): a view."""
        return None if self.storage is None else self.storage[:self.length, 1].permute(1, 2, 0, 3)

    def reorder(self, order: torch.Tensor) -> None:
        self.order = order if self.order is None else self.order[order]

    def reserve(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Room for the keys and values of `shape` (B, H, T, d_head), T new positions, a waiting reorder applied:
        the storage (room, 2, B, H, d_head), keys then values, of like's dtype and device, positions 0..length-1
        filled."""
        rows, heads, new, d_head = shape
        S, past, order = self.length, self.storage, self.order
        fits = past is not None and S + new <= past.size(0)
        if fits and order is None:
            return past
        room = past.size(0) if fits else max(2 * (S + new), 16)  # grows by doubling
        storage_shape = (room, 2, rows, heads, d_head)
        size = math.prod(storage_shape)
        if order is not None and self.spare is not None and self.spare.numel() >= size:
            # a reorder gathers into the storage the one before it left: no fresh pages to fault in
            storage = self.spare if self.spare.shape == storage_shape else \
                self.spare.view(-1)[:size].view(storage_shape)
        else:
            storage = like.new_empty(storage_shape)
        if past is not None and order is not None:
            torch.index_select(past[:S], 2, order, out=storage[:S])  # the kept rows, straight in
            self.spare = past
        elif past is not None:
            storage[:S] = past[:S]  # grown
        self.storage, self.order = storage, None
        return storage

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """key, value (B, H, T, d_head) of T new positions -> all keys, values (B, H, S + T, d_head): views, which
        the second reorder after this one overwrites (it gathers into their memory)."""
        storage = self.reserve(key.shape, key)
        S, T = self.length, key.size(2)
        storage[S:S + T, 0], storage[S:S + T, 1] = key.permute(2, 0, 1, 3), value.permute(2, 0, 1, 3)
        self.length = S + T
        return self.key, self.value


class MultiHeadAttention(nn.Module):
    """n_heads attention heads side by side, each over a d_model / n_heads slice.

    Set `store_weights = True` to keep the attention weights of the last call in `self.weights`
    (B, H, T, S): the same forward pass then takes the explicit softmax path instead of the fused
    SDPA kernel. Training and decoding leave it off. `record = {}` keeps every step of the last call
    (query, key, value, scores, keep, weights, context: seq2seq/explain.py), and `head_gate` (H,)
    scales each head's output (0 switches a head off; None, the default, leaves the output untouched).
    """

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.d_model, self.n_heads = d_model, n_heads
        self.q_proj = nn.Linear(d_model, d_model)  # W_Q: queries, always from the sequence being updated
        self.kv_proj = nn.Linear(d_model, 2 * d_model)  # W_K, W_V stacked: from x (self) or the memory (cross)
        self.out_proj = nn.Linear(d_model, d_model)  # W_O
        self.store_weights = False
        self.weights: torch.Tensor | None = None
        self.record: dict | None = None
        self.head_gate: torch.Tensor | None = None

    def reset_projections(self) -> None:
        """W_Q, W_K, W_V drawn as one stacked (3D, D) Xavier matrix, as nn.MultiheadAttention draws them."""
        stacked = nn.init.xavier_uniform_(torch.empty(3 * self.d_model, self.d_model))
        with torch.no_grad():
            self.q_proj.weight.copy_(stacked[:self.d_model])
            self.kv_proj.weight.copy_(stacked[self.d_model:])

    def self_attention(self, x: torch.Tensor, key_pad_mask: torch.Tensor | None = None,
                       causal: bool = False, cache: KVCache | None = None) -> torch.Tensor:
        """Queries, keys and values all come from x (B, T, D). Returns (B, T, D).

        With a `cache` (incremental decoding), x holds only the new positions: their keys and values
        are appended to the cached ones (B, H, S_past, d_head), so earlier positions are never projected again.
        """
        query, key, value = self.project_qkv(x)  # (B, H, T, d_head) each
        if cache is not None:
            key, value = cache.append(key, value)  # (B, H, S_past + T, d_head)
        return self.out_proj(self.merge_heads(self.attend(query, key, value, key_pad_mask, causal)))

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of self-attention, all from x (B, T, D): (B, H, T, d_head) each."""
        query = self.split_heads(self.q_proj(x))
        key, value = (self.split_heads(t) for t in self.kv_proj(x).chunk(2, dim=-1))  # keys and values from x too
        return query, key, value

    def cross_attention(self, x: torch.Tensor, memory: torch.Tensor, memory_pad_mask: torch.Tensor | None,
                        cache: dict | None = None) -> torch.Tensor:
        """Queries come from the decoder x (B, T, D); keys and values from the encoder output memory (B, S, D).

        x may hold G consecutive rows per memory row (the G beams of one sentence: x is (B*G, T, D)).
        Their queries then attend as G*T positions of one row, so the memory's keys and values are
        projected and stored once per sentence, not once per beam. With a `cache`, the memory's keys
        and values are projected on the first call only.
        """
        B, T = memory.size(0), x.size(1)
        G = x.size(0) // B  # queries per memory row
        query = self.split_heads(self.q_proj(x).reshape(B, G * T, self.d_model))  # (B, H, G*T, d_head)
        if cache is not None and "key" in cache:
            key, value = cache["key"], cache["value"]
        else:
            key, value = self.project_memory(memory)
            if cache is not None:
                cache["key"], cache["value"] = key, value
        context = self.attend(query, key, value, memory_pad_mask, causal=False)  # (B, H, G*T, d_head)
        return self.out_proj(self.merge_heads(context).view(B * G, T, self.d_model))

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, S, d_head) each, from the encoder output memory (B, S, D); contiguous,
        so that every decoding step reads them without a copy."""
        return tuple(self.split_heads(t).contiguous() for t in self.kv_proj(memory).chunk(2, dim=-1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Checkpoints written before W_Q was split from W_K, W_V kept one stacked `in_proj`: split it."""
        for kind in ("weight", "bias"):
            stacked = state_dict.pop(f"{prefix}in_proj.{kind}", None)
            if stacked is not None:
                state_dict[f"{prefix}q_proj.{kind}"], state_dict[f"{prefix}kv_proj.{kind}"] = \
                    stacked[:self.d_model], stacked[self.d_model:]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def attend(self, query, key, value, key_pad_mask, causal: bool) -> torch.Tensor:
        """Scaled dot-product attention of every head at once.

        query (B, H, T, d_head), key/value (B, H, S, d_head) -> context (B, H, T, d_head).
        """
        T, S = query.size(2), key.size(2)
        if self.record is not None:
            context = self.attend_step_by_step(query, key, value, keep_mask(key_pad_mask, causal, T, S, query.device))
        elif self.store_weights or (query.device.type == "cpu" and query.dtype == torch.bfloat16) or \
                decoding_step_on_cpu(query):
            weights = attention_weights(query, key, keep_mask(key_pad_mask, causal, T, S, query.device))
            self.weights = weights if self.store_weights else None
            context = weights.to(value.dtype) @ value  # (B, H, T, d_head): values move between positions
        elif causal and key_pad_mask is None and T == S:
            context = F.scaled_dot_product_attention(query, key, value, is_causal=True)
        else:
            context = F.scaled_dot_product_attention(query, key, value,
                                                     attn_mask=keep_mask(key_pad_mask, causal, T, S, query.device))
        return context if self.head_gate is None else context * self.head_gate.to(context.dtype)[:, None, None]

    def attend_step_by_step(self, query, key, value, keep) -> torch.Tensor:
        """The explicit path, keeping each step in `self.record` (what `run.py explain` shows)."""
        scores = attention_scores(query, key)  # (B, H, T, S), before the mask
        weights = masked_softmax(scores, keep)
        context = weights.to(value.dtype) @ value  # (B, H, T, d_head)
        self.weights = weights if self.store_weights else None
        self.record.update(query=query, key=key, value=value, scores=scores, keep=keep, weights=weights,
                           context=context)
        return context

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.n_heads, -1).transpose(1, 2)  # (B, H, L, d_head)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, _, L, _ = x.shape
        return x.transpose(1, 2).reshape(B, L, self.d_model)  # (B, L, D)
