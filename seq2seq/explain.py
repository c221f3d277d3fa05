"""The idea, step by step, on one sentence pair: `run.py explain`.

Every tensor here comes from the model's real forward pass: the chosen attention module keeps each
step of its last call (`MultiHeadAttention.record`: Q, K, V, the scores before the mask, the mask,
the softmax weights, the context), and a hook keeps its output, the update it adds to the residual
stream. Nothing is recomputed another way for the picture.

What a head does to the prediction is measured by switching it off (`MultiHeadAttention.head_gate`:
its output set to zero, so the layer's W_O sees nothing from it) and reading the change in the
log-probability of each reference token. Zeroing was chosen over uniform weights because it removes
exactly that head's contribution to the residual stream; uniform weights would still move an average
of all values into every position, a different intervention.
"""
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from seq2seq.attention import MultiHeadAttention
from seq2seq.model import Transformer
from seq2seq.tokenizer import BOS_ID, EOS_ID, Tokenizer

KINDS = ("encoder", "decoder", "cross")  # encoder self-, decoder (causal) self-, cross-attention


@dataclass
class AttentionSteps:
    """One head of one attention layer on one pair; T queries, S keys.

    queries/keys: the pieces on each side; embedding_norms: ‖embedding × √d + position‖ of the query
    pieces (tokens become vectors); scores (T, S): q·k/√d_head before the mask; keep (T, S): True
    where a query may look; masked (T, S): the scores with hidden cells at -inf; weights (T, S): the
    softmax, rows summing to 1; values (S, d_head); context (T, d_head) = weights @ values;
    head_update (T, D): this head's share of the update, context @ W_O[:, head]ᵀ; update (T, D): the
    whole layer's attention output (all heads, + bias), added to the residual stream;
    contributions (T, S): weight × ‖v_s W_O[:, head]ᵀ‖, how much each key moved each query.
    """

    kind: str
    layer: int
    head: int
    queries: list[str]
    keys: list[str]
    embedding_norms: torch.Tensor
    scores: torch.Tensor
    keep: torch.Tensor
    masked: torch.Tensor
    weights: torch.Tensor
    values: torch.Tensor
    context: torch.Tensor
    head_update: torch.Tensor
    update: torch.Tensor
    contributions: torch.Tensor

    @property
    def cells(self) -> int:
        """The cost: T × S scores per head and layer, quadratic in the length."""
        return self.scores.numel()


def attention_module(model: Transformer, kind: str, layer: int) -> MultiHeadAttention:
    if kind not in KINDS:
        raise ValueError(f"kind={kind}: expected one of {', '.join(KINDS)}")
    layers = model.encoder_layers if kind == "encoder" else model.decoder_layers
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer={layer}: this model's {kind} has layers 0..{len(layers) - 1}")
    return layers[layer].cross_attn if kind == "cross" else layers[layer].self_attn


def pair(model: Transformer, src_ids: list[int], tgt_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """src (1, S) = ids + </s>; tgt_in (1, T) = <s> + ids: what the decoder reads to predict ids + </s>."""
    device = model.embed.weight.device
    return torch.tensor([src_ids + [EOS_ID]], device=device), torch.tensor([[BOS_ID] + tgt_ids], device=device)


@torch.no_grad()
def attention_steps(model: Transformer, tokenizer: Tokenizer, src_ids: list[int], tgt_ids: list[int],
                    layer: int, head: int, kind: str) -> AttentionSteps:
    """Run the pair through the model once and keep every step of one head (see AttentionSteps)."""
    model.eval()
    module = attention_module(model, kind, layer)
    if not 0 <= head < module.n_heads:
        raise ValueError(f"head={head}: this model has heads 0..{module.n_heads - 1}")
    src, tgt_in = pair(model, src_ids, tgt_ids)
    outputs = []
    hook = module.out_proj.register_forward_hook(lambda _m, _i, out: outputs.append(out))
    module.record = {}
    try:
        model(src, tgt_in)
        record = module.record
    finally:
        module.record = None
        hook.remove()
    return steps_of(model, module, record, outputs[0][0], src, tgt_in, tokenizer, kind, layer, head)


def steps_of(model, module, record, update, src, tgt_in, tokenizer, kind, layer, head) -> AttentionSteps:
    d_head = module.d_model // module.n_heads
    W_O = module.out_proj.weight[:, head * d_head:(head + 1) * d_head]  # (D, d_head): this head's columns
    h = lambda name: record[name][0, head].float()  # noqa: E731  (T, S) or (T | S, d_head) of this head
    context, values, weights, scores = h("context"), h("value"), h("weights"), h("scores")
    keep = record["keep"][0, 0].expand_as(scores) if record["keep"] is not None else torch.ones_like(scores).bool()
    src_pieces = tokenizer.pieces(src[0, :-1].tolist()) + ["</s>"]
    tgt_pieces = ["<s>"] + tokenizer.pieces(tgt_in[0, 1:].tolist())
    queries = src_pieces if kind == "encoder" else tgt_pieces
    keys = {"encoder": src_pieces, "decoder": tgt_pieces, "cross": src_pieces}[kind]
    embedded = model.embed_tokens(src if kind == "encoder" else tgt_in)[0]
    return AttentionSteps(kind, layer, head, queries, keys, embedded.norm(dim=-1).cpu(), scores.cpu(),
                          keep.cpu(), scores.masked_fill(~keep, float("-inf")).cpu(), weights.cpu(), values.cpu(),
                          context.cpu(), (context @ W_O.float().T).cpu(), update.float().cpu(),
                          (weights * (values @ W_O.float().T).norm(dim=-1)[None]).cpu())


@contextmanager
def switched_off(modules: list[MultiHeadAttention], head: int | None = None):
    """Inside the block, `head` (or every head) of these modules outputs zero; restored after."""
    for m in modules:
        gate = torch.ones(m.n_heads, device=m.out_proj.weight.device)
        gate[slice(None) if head is None else head] = 0
        m.head_gate = gate
    try:
        yield
    finally:
        for m in modules:
            m.head_gate = None


@torch.no_grad()
def reference_logprobs(model: Transformer, src: torch.Tensor, tgt_in: torch.Tensor, tgt_out: torch.Tensor):
    """log P(reference token t | source, reference prefix) for each target position: (T,)."""
    return model(src, tgt_in)[0].float().log_softmax(-1).gather(-1, tgt_out[0][:, None])[:, 0]


@torch.no_grad()
def head_importance(model: Transformer, src_ids: list[int], tgt_ids: list[int]) -> tuple[list[str], torch.Tensor]:
    """Rows: every head of every attention layer, then each kind of attention as a whole; columns: target
    positions. Each cell: the drop in log P(reference token) when that head (or kind) is switched off."""
    model.eval()
    src, tgt_in = pair(model, src_ids, tgt_ids)
    tgt_out = torch.tensor([tgt_ids + [EOS_ID]], device=src.device)
    base = reference_logprobs(model, src, tgt_in, tgt_out)
    labels, drops = [], []
    for kind in KINDS:
        modules = [attention_module(model, kind, i) for i in range(len(model.encoder_layers if kind == "encoder"
                                                                       else model.decoder_layers))]
        for layer, module in enumerate(modules):
            for head in range(module.n_heads):
                with switched_off([module], head):
                    drops.append(base - reference_logprobs(model, src, tgt_in, tgt_out))
                labels.append(f"{kind} L{layer} H{head}")
        with switched_off(modules):
            drops.append(base - reference_logprobs(model, src, tgt_in, tgt_out))
        labels.append(f"all {kind}")
    return labels, torch.stack(drops).cpu()


@torch.no_grad()
def top_predictions(model: Transformer, tokenizer: Tokenizer, src_ids: list[int], tgt_ids: list[int],
                    k: int = 5) -> list[list[tuple[str, float]]]:
    """For each target position, the model's k most probable next pieces with their probabilities."""
    model.eval()
    src, tgt_in = pair(model, src_ids, tgt_ids)
    probs, ids = model(src, tgt_in)[0].float().softmax(-1).topk(k)
    return [[(tokenizer.pieces([i])[0], p) for i, p in zip(row_ids, row_probs)]
            for row_ids, row_probs in zip(ids.tolist(), probs.tolist())]


PROFILE = ("peak", "self", "previous", "marker", "entropy")


@torch.no_grad()
def attention_profiles(model: Transformer, src_ids: list[int], tgt_ids: list[int]) -> dict[str, dict[str, float]]:
    """What each head attends to on one pair, from one forward pass: {"cross L2 H0": {...}}.

    Averaged over the head's queries: `peak`, the weight on its strongest key (1 = one key only);
    `self`, on the query's own position, and `previous`, on the one before it (self-attention only);
    `marker`, on the sentence marker (<s> for decoder keys, </s> for source keys); `entropy` of the
    weights in nats (0 = one key; log S = uniform)."""
    model.eval()
    src, tgt_in = pair(model, src_ids, tgt_ids)
    modules = {(kind, i): attention_module(model, kind, i) for kind in KINDS
               for i in range(len(model.encoder_layers if kind == "encoder" else model.decoder_layers))}
    for m in modules.values():
        m.record = {}
    try:
        model(src, tgt_in)
        weights = {key: m.record["weights"][0].float().cpu() for key, m in modules.items()}  # (H, T, S) each
    finally:
        for m in modules.values():
            m.record = None
    profiles = {}
    for (kind, layer), w in weights.items():
        T = w.shape[1]
        diagonal = w.diagonal(dim1=1, dim2=2) if kind != "cross" else None  # (H, T)
        previous = w.diagonal(offset=-1, dim1=1, dim2=2) if kind != "cross" and T > 1 else None
        marker = w[:, :, 0] if kind == "decoder" else w[:, :, -1]
        entropy = -(w * w.clamp_min(1e-12).log()).sum(-1)
        for head in range(w.shape[0]):
            profiles[f"{kind} L{layer} H{head}"] = {
                "peak": float(w[head].max(-1).values.mean()),
                "self": float(diagonal[head].mean()) if diagonal is not None else float("nan"),
                "previous": float(previous[head].mean()) if previous is not None else float("nan"),
                "marker": float(marker[head].mean()),
                "entropy": float(entropy[head].mean())}
    return profiles
