"""int8 decoding on a CPU: the Transformer with every linear layer, the output projection included, in int8;
and the compiled small decoding steps it shares with fp32 decoding on a CPU.

Weights are quantized once, per output channel. Activations are quantized on the fly, each row (one
token of one sentence) with its own scale, as CTranslate2 does, so the lines batched with a line do not
change how it is quantized. PyTorch's dynamic quantization scales a whole batch at once; with it, 44 of
300 test lines translated alone came out unlike the same lines in a batch, and with rows scaled on
their own 0 of 300. (What is left: attention over a batch's padding changes fp32 sums in their last
bit, which can move a value across a rounding step; measured, 1 of 500 lines alone and 3 of 640 in
random batches of 32 changed, near-ties of the beam; fp32 0.) The integer dot products are fbgemm's
(VNNI or AVX2), or for calls of many rows oneDNN's (what CTranslate2 uses on AMD CPUs) where that measured
faster (`onednn_pays`): the same integer sums and scaling, so the same output bit for bit. Attention scores,
softmax and LayerNorm stay in fp32.

Small steps (one sentence at a time, the last rows of a batch) are some 800 operations too small to be worth calling
one by one from Python: `SteppedTransformer` runs a step's decoder layers in one TorchScript call, the same
operations as the eager layers, in the same order, the same bits. Int8Transformer is one; fp32 decoding on a CPU
takes another, which shares the float model's weights (`stepped_copy`).

PyTorch has announced the removal of its quantized CPU kernels (torch.ao, torch.ops.quantized). A torch
without them multiplies through `torch._int_mm` instead, a core ATen op, on CPUs with VNNI (integer dot
products that cannot saturate): measured 0.94-0.98x the fbgemm path, still 1.2x fp32 (docs/benchmarks.md).
"""
import functools
import time
import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from seq2seq.attention import KVCache, MultiHeadAttention, explicit_step, keep_mask, kernel_unchanged
from seq2seq.ensemble import Ensemble
from seq2seq.model import FeedForward, Transformer

# Rows scaled into [-1, 1] are quantized with this fixed scale and zero point to 1..127: seven bits, as
# fbgemm's reduce_range keeps its u8 x s8 products from saturating on CPUs without VNNI.
ROW_SCALE, ZERO_POINT = 1 / 63, 64
FIXED_SCALE_OP = "linear_with_input_q_dq_qweight_dq_output_fp32"
# A "fixed" Int8Linear call of this many rows or more multiplies through oneDNN where `onednn_pays`. Measured on a
# 2-core AVX2 EPYC, the product alone: oneDNN 0.9-1.3x fbgemm at 256 rows, 1.0-1.25x from 500, 0.3-0.8x below 128
# (50-90 us more a call); in decoding, 256 rows gave greedy 1.021x and beam 5 1.040x, 512 rows 1.018x and 1.042x.
ONEDNN_ROWS = 256
# oneDNN is used unless its product timed more than 5% slower than fbgemm's (`onednn_pays`). On a 2-core EPYC VM one
# process's timing wandered from 0.88x to 1.40x fbgemm (40 processes, median 1.12x): asking it to time faster, as
# before, left 8 of 40 processes on fbgemm, with which beam 5 decoded 4-7% slower (docs/benchmarks.md).
ONEDNN_MARGIN = 0.95


def quantized_ops() -> bool:
    """Whether this torch still has the quantized CPU kernels (torch.ops.quantized) that PyTorch means to remove."""
    return all(hasattr(torch.ops.quantized, op) for op in ("linear_prepack", "linear_dynamic")) and \
        hasattr(torch, "quantize_per_channel")


def vnni() -> bool:
    """Whether this CPU has VNNI (AVX512-VNNI or AVX-VNNI): u8 x s8 dot products into int32, no saturation."""
    return getattr(torch.cpu, "_is_vnni_supported", lambda: False)()


def int_mm_exact() -> bool:
    """Whether torch._int_mm gives exact int32 sums here, extreme values included: without VNNI, pairs of
    u8 x s8 products are summed in 16 bits, and 255 * 127 * 2 does not fit."""
    try:
        a = torch.tensor([[127] * 64, [-127] * 64, [127, -127] * 32], dtype=torch.int8)  # (3, 64)
        b = a.t().contiguous()  # (64, 3): every sign pattern against every other
        return torch.equal(torch._int_mm(a, b), (a.long() @ b.long()).int())
    except (AttributeError, NotImplementedError, RuntimeError):
        return False


def int8_kernel() -> str:
    """The integer matrix product this torch and CPU offer, best first (measured on an AVX-512 CPU):
    "fixed"    fbgemm's kernel at one fixed activation scale (the x86 engine);
    "dynamic"  the quantized engine's dynamic kernel, its range pinned by two anchor rows (qnnpack on ARM);
    "int_mm"   torch._int_mm, for a torch without the quantized kernels, on a CPU with VNNI;
    ""         none: int8 decoding is not offered (`auto` decodes in fp32).
    """
    if quantized_ops():
        fixed = torch.backends.quantized.engine in ("x86", "fbgemm") and hasattr(torch.ops.quantized, FIXED_SCALE_OP)
        return "fixed" if fixed else "dynamic"
    return "int_mm" if vnni() and int_mm_exact() else ""


def onednn_qlinear() -> bool:
    """Whether this torch has oneDNN's int8 linear (torch.ops.onednn, x86 builds; Inductor's int8 path)."""
    return all(hasattr(torch.ops.onednn, op) for op in ("qlinear_prepack", "qlinear_pointwise"))


@functools.cache
def onednn_pays() -> bool:
    """Whether to multiply through oneDNN (calls of ONEDNN_ROWS rows or more): where its product timed no more than
    5% slower than fbgemm's (`ONEDNN_MARGIN`), once a process, at the first call that could use it. Which one runs
    changes no output bit, only the time."""
    if not onednn_qlinear() or int8_kernel() != "fixed":
        return False
    try:
        with torch.random.fork_rng(devices=[]):  # the random layers and rows leave no trace in the caller's draws
            return onednn_speedup() >= ONEDNN_MARGIN
    except RuntimeError:  # a torch whose oneDNN ops take other arguments: fbgemm's alone
        return False


def onednn_speedup(d_model: int = 256) -> float:
    """fbgemm's time over oneDNN's for a pass over three new layers of a Transformer's shapes (D -> 3D, D -> 4D,
    4D -> D), 2 * ONEDNN_ROWS rows each: the best of 5 passes of each kernel, taken in turn after a warm-up pass
    (oneDNN builds its kernel for each shape). A pass over several layers is what decoding does: one layer's two
    products called in turn were often 1.5-1.9x apart on a virtual machine, one or the other at random."""
    shapes = [(d_model, 3 * d_model), (d_model, 4 * d_model), (4 * d_model, d_model)]
    stack = [Int8Linear(nn.Linear(d_in, d_out)) for d_in, d_out in shapes]
    rows = {d_in: torch.rand(2 * ONEDNN_ROWS, d_in) * 2 - 1 for d_in in (d_model, 4 * d_model)}
    best = {"fbgemm_product": float("inf"), "onednn_product": float("inf")}
    for run in range(6):
        for product in best:
            start = time.perf_counter()
            for layer in stack:
                getattr(layer, product)(rows[layer.in_features])
            if run:  # the first pass is the warm-up
                best[product] = min(best[product], time.perf_counter() - start)
    return best["fbgemm_product"] / best["onednn_product"]


def packed_linear(x: torch.Tensor, packed: "torch.classes.quantized.LinearPackedParamsBase",
                  bias: Optional[torch.Tensor], dynamic: bool) -> torch.Tensor:
    """Int8Linear's forward through the quantized engine's packed weights (the "fixed" kernel, or "dynamic"):
    x (..., in) -> x W^T + b (..., out), each row of x scaled by its own max |x|."""
    magnitude = x.abs()  # (..., in): then x / row_scale, written over it
    row_scale = magnitude.amax(dim=-1, keepdim=True).clamp_min_(1e-30)  # (..., 1)
    return packed_scaled(torch.div(x, row_scale, out=magnitude), row_scale, packed, bias, dynamic)


def packed_scaled(rows: torch.Tensor, row_scale: torch.Tensor, packed: "torch.classes.quantized.LinearPackedParamsBase",
                  bias: Optional[torch.Tensor], dynamic: bool, scale: float = ROW_SCALE,
                  zero_point: int = ZERO_POINT) -> torch.Tensor:
    """x W^T + b from rows = x / row_scale (..., in), each in [-1, 1], and row_scale (..., 1). The fixed kernel
    quantizes the rows to 1..127; the dynamic one gets two extra rows, of +1 and of -1, so that the range it
    measures, and hence its scale, is [-1, 1] for every batch."""
    if dynamic:
        anchor = torch.tensor([[1.0], [-1.0]]).expand(2, rows.size(-1))
        flat = torch.cat([rows.reshape(-1, rows.size(-1)), anchor])  # (N + 2, in)
        y = torch.ops.quantized.linear_dynamic(flat, packed, reduce_range=True)[:-2]
        y = y.view(list(rows.shape[:-1]) + [y.size(-1)])  # (..., out)
    else:
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(rows, scale, zero_point, packed)
    return y.mul_(row_scale) if bias is None else torch.addcmul(bias, y, row_scale, out=y)


def packed_feed_forward(x: torch.Tensor, packed1: "torch.classes.quantized.LinearPackedParamsBase",
                        bias1: Optional[torch.Tensor], packed2: "torch.classes.quantized.LinearPackedParamsBase",
                        bias2: Optional[torch.Tensor], dynamic: bool) -> torch.Tensor:
    """Int8FeedForward's forward through packed weights: W2 ReLU(W1 x), the hidden rows scaled for W2 in place."""
    h = packed_linear(x, packed1, bias1, dynamic).relu_()  # (..., d_ff), >= 0
    h_scale = h.amax(dim=-1, keepdim=True).clamp_min_(1e-30)
    return packed_scaled(h.div_(h_scale), h_scale, packed2, bias2, dynamic)


def sublayer_input(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                   pre_norm: bool) -> torch.Tensor:
    """What a sublayer reads (Sublayer.forward): LayerNorm(x) with pre-norm, x itself with post-norm."""
    return F.layer_norm(x, [x.size(-1)], weight, bias, eps) if pre_norm else x


def sublayer_output(x: torch.Tensor, f: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                    pre_norm: bool) -> torch.Tensor:
    """The residual connection around a sublayer's output f (Sublayer.forward): x + f with pre-norm,
    LayerNorm(x + f) with post-norm."""
    return x + f if pre_norm else F.layer_norm(x + f, [x.size(-1)], weight, bias, eps)


def packed_encoder_layer(x: torch.Tensor, keep: Optional[torch.Tensor], norms: List[torch.Tensor], eps: float,
                         packed: List["torch.classes.quantized.LinearPackedParamsBase"],
                         biases: List[Optional[torch.Tensor]], n_heads: int, pre_norm: bool,
                         dynamic: bool) -> torch.Tensor:
    """An EncoderLayer whose linear layers all go through packed weights, in one call: the same operations, in the
    same order, as its eager forward with SDPA (a small batch: `Int8Transformer.encode`).

    Args: x (B, S, D); keep (B, 1, 1, S) True where a key may be attended to, or None; norms the two sublayers'
    LayerNorm weight and bias; packed and biases of W_QKV, W_O, W_1, W_2. Returns: x (B, S, D).
    """
    B, S, D = x.shape
    h = sublayer_input(x, norms[0], norms[1], eps, pre_norm)
    query, key, value = [t.view(B, S, n_heads, D // n_heads).transpose(1, 2)
                         for t in packed_linear(h, packed[0], biases[0], dynamic).chunk(3, dim=-1)]
    context = F.scaled_dot_product_attention(query, key, value, attn_mask=keep)
    a = packed_linear(context.transpose(1, 2).reshape(B, S, D), packed[1], biases[1], dynamic)
    x = sublayer_output(x, a, norms[0], norms[1], eps, pre_norm)
    h = sublayer_input(x, norms[2], norms[3], eps, pre_norm)
    f = packed_feed_forward(h, packed[2], biases[2], packed[3], biases[3], dynamic)
    return sublayer_output(x, f, norms[2], norms[3], eps, pre_norm)


def packed_encoder_layers(x: torch.Tensor, keep: Optional[torch.Tensor], norms: List[List[torch.Tensor]], eps: float,
                          packed: List[List["torch.classes.quantized.LinearPackedParamsBase"]],
                          biases: List[List[Optional[torch.Tensor]]], n_heads: int, pre_norm: bool,
                          dynamic: bool) -> torch.Tensor:
    """Every encoder layer (`packed_encoder_layer`, each with its own norms, packed weights and biases) in one
    TorchScript call. One sentence of 10 tokens, 4 layers: 0.87-0.89 ms, against 1.68-1.86 ms for the eager layers
    (2-core AVX2 EPYC), the same bits."""
    for i in range(len(norms)):
        x = packed_encoder_layer(x, keep, norms[i], eps, packed[i], biases[i], n_heads, pre_norm, dynamic)
    return x


def packed_decoder_layer(y: torch.Tensor, storage: torch.Tensor, past: int,
                         cross_key: torch.Tensor, cross_value: torch.Tensor,
                         memory_keep: Optional[torch.Tensor], norms: List[torch.Tensor], eps: float,
                         weights: Optional[List[torch.Tensor]],
                         packed: Optional[List["torch.classes.quantized.LinearPackedParamsBase"]],
                         biases: List[Optional[torch.Tensor]], n_heads: int, pre_norm: bool,
                         dynamic: bool) -> torch.Tensor:
    """One decoding step of a DecoderLayer in one call, its products in fp32 (`weights`) or through int8 packed weights
    (`packed`; the other None): the same operations, in the same order, as its eager forward with SDPA (a small
    step: `SteppedTransformer.decode_step`).

    Args: y (B*G, T, D), G rows per memory row; storage (room, 2, B*G, H, d_head) the KVCache's keys and values,
    its first `past` positions filled, with room for T more (KVCache.reserve), which this writes; cross_key, cross_value
    (B, H, S_src, d_head); memory_keep (B, 1, 1, S_src) True where a row may attend, or None; norms the three
    sublayers' LayerNorm weight and bias; packed and biases of W_QKV, W_O, cross W_Q, cross W_O, W_1, W_2, or weights
    and biases of W_Q, W_KV, W_O, cross W_Q, cross W_O, W_1, W_2 (fp32 keeps W_Q apart from W_K, W_V, as the eager
    layer does: the same products, the same bits). Returns: y (B*G, T, D).
    """
    rows, T, D = y.shape
    B = cross_key.size(0)
    h = sublayer_input(y, norms[0], norms[1], eps, pre_norm)
    if weights is not None:
        key_value = F.linear(h, weights[1], biases[1]).chunk(2, dim=-1)
        qkv = [F.linear(h, weights[0], biases[0]), key_value[0], key_value[1]]
    else:
        assert packed is not None
        qkv = packed_linear(h, packed[0], biases[0], dynamic).chunk(3, dim=-1)
    query, key, value = [t.view(rows, T, n_heads, D // n_heads).transpose(1, 2) for t in qkv]
    storage[past:past + T, 0], storage[past:past + T, 1] = key.permute(2, 0, 1, 3), value.permute(2, 0, 1, 3)
    key, value = storage[:past + T, 0].permute(1, 2, 0, 3), storage[:past + T, 1].permute(1, 2, 0, 3)  # KVCache.key
    if past == 0:
        context = F.scaled_dot_product_attention(query, key, value, is_causal=True)
    else:  # one new position sees every key: no mask
        context = F.scaled_dot_product_attention(query, key, value)
    a = step_linear(context.transpose(1, 2).reshape(rows, T, D), 1, weights, packed, biases, dynamic)
    y = sublayer_output(y, a, norms[0], norms[1], eps, pre_norm)
    h = sublayer_input(y, norms[2], norms[3], eps, pre_norm)
    cross_query = step_linear(h, 2, weights, packed, biases, dynamic).reshape(B, rows // B * T, D)
    cross_query = cross_query.view(B, rows // B * T, n_heads, D // n_heads).transpose(1, 2)  # (B, H, G*T, d_head)
    context = F.scaled_dot_product_attention(cross_query, cross_key, cross_value, attn_mask=memory_keep)
    c = step_linear(context.transpose(1, 2).reshape(B, rows // B * T, D).view(rows, T, D), 3, weights, packed, biases,
                    dynamic)
    y = sublayer_output(y, c, norms[2], norms[3], eps, pre_norm)
    h = sublayer_input(y, norms[4], norms[5], eps, pre_norm)
    if weights is not None:
        f = F.linear(F.linear(h, weights[5], biases[5]).relu(), weights[6], biases[6])
    else:
        assert packed is not None
        f = packed_feed_forward(h, packed[4], biases[4], packed[5], biases[5], dynamic)
    return sublayer_output(y, f, norms[4], norms[5], eps, pre_norm)


def step_linear(x: torch.Tensor, i: int, weights: Optional[List[torch.Tensor]],
                packed: Optional[List["torch.classes.quantized.LinearPackedParamsBase"]],
                biases: List[Optional[torch.Tensor]], dynamic: bool) -> torch.Tensor:
    """x W^T + b of `packed_decoder_layer`'s i-th int8 product (1: W_O, 2: cross W_Q, 3: cross W_O), or of its fp32
    twin, one further along in `weights` (which holds W_Q and W_KV where int8 has one W_QKV)."""
    if weights is not None:
        return F.linear(x, weights[i + 1], biases[i + 1])
    assert packed is not None
    return packed_linear(x, packed[i], biases[i], dynamic)


def packed_decoder_layers(y: torch.Tensor, storages: List[torch.Tensor], past: int, cross_keys: List[torch.Tensor],
                          cross_values: List[torch.Tensor], memory_keep: Optional[torch.Tensor],
                          norms: List[List[torch.Tensor]], eps: float, weights: Optional[List[List[torch.Tensor]]],
                          packed: Optional[List[List["torch.classes.quantized.LinearPackedParamsBase"]]],
                          biases: List[List[Optional[torch.Tensor]]], n_heads: int, pre_norm: bool,
                          dynamic: bool) -> torch.Tensor:
    """A small decoding step's pass through every decoder layer (`packed_decoder_layer`, each with its own cache,
    cross keys and values, norms, weights or packed weights, and biases) in one TorchScript call. int8: called a layer
    at a time from Python, the 4 layers of a one-row step took 720-830 us, in one call 640-770 us; fp32: 880 us in one
    call, against 2,200 us for the eager layers (2-core AVX2 EPYC)."""
    for i in range(len(storages)):
        y = packed_decoder_layer(y, storages[i], past, cross_keys[i], cross_values[i], memory_keep, norms[i], eps,
                                 None if weights is None else weights[i], None if packed is None else packed[i],
                                 biases[i], n_heads, pre_norm, dynamic)
    return y


@functools.cache
def compiled(function):
    """`function` compiled by TorchScript, or itself where this torch cannot compile it.

    Called from Python, an op that takes the quantized engine's packed weights (a TorchScript object) costs about
    17 us more than the same op called from TorchScript: measured on a 2-core EPYC, 25.6 against 8.8 us at one row
    of 256 -> 256 through fbgemm. Compiled, `packed_linear` took 22-33 us where the eager path took 62-71 us at 1-5
    rows (2-2.8x), the output the same bit for bit: what one sentence at a time, and every small batch, waits for.
    TorchScript is deprecated (torch 2.13 warns), like the quantized ops themselves; a torch without it runs the
    same ops eager."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.script(function)
    except Exception:  # noqa: BLE001  (a torch without TorchScript, or one that rejects it: the same ops, eager)
        return function


class Int8Linear(nn.Module):
    """y = x W^T + b with W in int8 (one scale per output row) and each row of x quantized by its own max |x|.

    x / s_row goes through an int8 GEMM (`int8_kernel`) at one fixed activation scale, and y = s_row * (x / s_row) W^T
    + b: one quantization per row, independent of the other rows. The dynamic kernel gets two extra rows, of +1
    and of -1, so that the range it measures, and hence its scale, is [-1, 1] for every batch.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.kernel = int8_kernel()
        if not self.kernel:
            raise NotImplementedError(f"torch {torch.__version__} has no quantized CPU kernels, and torch._int_mm "
                                      "needs a CPU with VNNI")
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127  # (out,): symmetric, per output channel
        if self.kernel == "int_mm":
            self.q_weight_t = torch.round(weight / scale[:, None]).to(torch.int8).t()  # (in, out)
            self.out_scale = scale / 127  # rows are quantized to -127..127
        else:
            with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao, whose CPU
                warnings.simplefilter("ignore")  # int8 path measured 3.5x slower than fbgemm's in eager mode
                q_weight = torch.quantize_per_channel(weight, scale.double(),
                                                      torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
                self.packed = torch.ops.quantized.linear_prepack(q_weight, None)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.onednn_weight = None  # the weights packed for oneDNN, at the first call that multiplies through it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) float -> (..., out) float."""
        if self.through_packed(x):
            return compiled(packed_linear)(x, self.packed, self.bias, self.kernel == "dynamic")
        magnitude = x.abs()  # (..., in): then x / row_scale, written over it
        row_scale = magnitude.amax(dim=-1, keepdim=True).clamp_min_(1e-30)  # (..., 1)
        return self.scaled(torch.div(x, row_scale, out=magnitude), row_scale)

    def through_packed(self, x: torch.Tensor) -> bool:
        """Whether x (..., in) is multiplied by the quantized engine's packed weights (`packed_scaled`): the dynamic
        kernel, or the fixed one unless oneDNN takes the call (many rows)."""
        return self.packed_for(x.numel() // self.in_features)

    def packed_for(self, rows: int) -> bool:
        """through_packed for a call of this many rows."""
        return self.kernel == "dynamic" or self.kernel == "fixed" and not (rows >= ONEDNN_ROWS and onednn_pays())

    def scaled(self, rows: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
        """x W^T + b from rows = x / row_scale (..., in), each in [-1, 1], and row_scale (..., 1), for a call that
        does not go through the packed weights (`through_packed`: those take `packed_linear` whole)."""
        if self.kernel == "fixed":
            y = self.onednn_product(rows)
        else:
            q = rows.reshape(-1, self.in_features).mul(127).round_().to(torch.int8)  # (N, in)
            y = torch._int_mm(q, self.q_weight_t).float().mul_(self.out_scale)
            y = y.view(*rows.shape[:-1], self.out_features)
        return y.mul_(row_scale) if self.bias is None else torch.addcmul(self.bias, y, row_scale, out=y)

    def fbgemm_product(self, rows: torch.Tensor) -> torch.Tensor:
        """(x / row_scale) W^T through fbgemm, rows quantized to 1..127 inside the kernel (no bias, no row scale)."""
        return getattr(torch.ops.quantized, FIXED_SCALE_OP)(rows, ROW_SCALE, ZERO_POINT, self.packed)

    def onednn_product(self, rows: torch.Tensor) -> torch.Tensor:
        """fbgemm_product through oneDNN: the rows quantized alike (1..127), the same int32 sums and scales."""
        if self.onednn_weight is None:
            q_weight, _ = torch.ops.quantized.linear_unpack(self.packed)  # qint8, per-channel scales
            self.weight_scale = q_weight.q_per_channel_scales().float()
            self.weight_zero_point = torch.zeros(self.out_features, dtype=torch.long)
            self.onednn_weight = torch.ops.onednn.qlinear_prepack(q_weight.int_repr(), None)
            with warnings.catch_warnings():  # its once-a-process notice that quantized tensors are deprecated
                warnings.simplefilter("ignore")
                torch.quantize_per_tensor(torch.zeros(1), ROW_SCALE, ZERO_POINT, torch.quint8)
        q = torch.quantize_per_tensor(rows, ROW_SCALE, ZERO_POINT, torch.quint8)  # as fbgemm's kernel rounds them
        u8 = torch.empty(0, dtype=torch.uint8).set_(q.untyped_storage(), 0, q.shape, q.stride())  # its bytes, no copy
        return torch.ops.onednn.qlinear_pointwise(u8, ROW_SCALE, ZERO_POINT, self.onednn_weight, self.weight_scale,
                                                  self.weight_zero_point, None, 1.0, 0, torch.float32, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8FeedForward(nn.Module):
    """FFN(x) = W2 ReLU(W1 x) with both layers Int8Linear. The hidden activations, d_ff wide, are ReLU'd
    and scaled for W2 in place: no max |h| (h >= 0) and no fresh buffers, which measured 6% of a beam-5
    decoding on a 2-core AVX-512 CPU (3% greedy), the output unchanged."""

    def __init__(self, ffn: FeedForward):
        super().__init__()
        self.w1, self.w2 = Int8Linear(ffn[0]), Int8Linear(ffn[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w1.through_packed(x):  # then W2 too: as many rows
            return compiled(packed_feed_forward)(x, self.w1.packed, self.w1.bias, self.w2.packed, self.w2.bias,
                                                 self.w1.kernel == "dynamic")
        h = self.w1(x).relu_()  # (..., d_ff), >= 0
        h_scale = h.amax(dim=-1, keepdim=True).clamp_min_(1e-30)
        return self.w2.scaled(h.div_(h_scale), h_scale)


class Int8SelfAttention(MultiHeadAttention):
    """Self-attention with W_Q, W_K and W_V stacked into one Int8Linear (3D, D): x is scaled and quantized once
    a layer, not once for W_Q and again for W_K, W_V, and one integer product replaces two. The outputs are the
    same bit for bit: the weights keep their per-output-channel scales and x its row scales. Measured for the
    pair under the AVX2 caps on a 2-core Xeon: 1.9x at one row, 1.14x at 1,850 rows (beam 5, 370 sentences)."""

    def __init__(self, attn: MultiHeadAttention):
        super().__init__(attn.d_model, attn.n_heads)
        stacked = nn.Linear(attn.d_model, 3 * attn.d_model)
        with torch.no_grad():
            stacked.weight.copy_(torch.cat([attn.q_proj.weight, attn.kv_proj.weight]))
            stacked.bias.copy_(torch.cat([attn.q_proj.bias, attn.kv_proj.bias]))
        del self.q_proj, self.kv_proj
        self.qkv_proj, self.out_proj = Int8Linear(stacked), Int8Linear(attn.out_proj)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values, all from x (B, T, D): (B, H, T, d_head) each."""
        return tuple(self.split_heads(t) for t in self.qkv_proj(x).chunk(3, dim=-1))


def replace_linears(module: nn.Module) -> None:
    """Every nn.Linear inside `module` becomes an Int8Linear, and every FeedForward an Int8FeedForward, in place."""
    for name, child in module.named_children():
        if isinstance(child, FeedForward):
            setattr(module, name, Int8FeedForward(child))
        elif isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child))
        else:
            replace_linears(child)


class SteppedTransformer(Transformer):
    """A trained Transformer for decoding on a CPU (no gradients), whose small decoding steps run every decoder layer in
    one TorchScript call (`packed_decoder_layers`), the same operations as the eager layers, in the same order. There a
    step is some 800 small operations, and eager PyTorch spends more calling them than computing them: a one-row step
    of 4 layers took 2.2 ms eager and 0.9 ms compiled in fp32, 2.4 and 0.7-0.8 ms in int8 (2-core AVX2 EPYC). fp32,
    one sentence a call: greedy 1.31x, beam 5 1.18x; 500 lines in 4,096-token batches 1.00x (docs/benchmarks.md).

    `stepped_copy(model)` makes the fp32 one, which shares the model's weights; Int8Transformer is the int8 one.
    """

    step_weights: tuple | None = None  # what packed_decoder_layers takes besides its inputs (`step_arguments`)

    def compiled_step(self, rows: int) -> bool:
        """Whether a small step of this many rows runs compiled (int8: unless oneDNN takes products of so many)."""
        return True

    def decode_step(self, tgt_in: torch.Tensor, memory: torch.Tensor, src_pad_mask: torch.Tensor | None,
                    cache: list[dict]) -> torch.Tensor:
        """Transformer.decode_step, the decoder's layers in one TorchScript call (`packed_decoder_layers`) where the
        step is small (`compiled_step`). Larger steps, and layers asked for their weights, take the eager path."""
        layers = self.decoder_layers
        small = tgt_in.size(1) == 1 and not explicit_step(tgt_in.size(0) * self.cfg.n_heads, 1)
        if not (small and self.step_weights and self.compiled_step(tgt_in.size(0)) and all(
                kernel_unchanged(m) for layer in layers for m in (layer.self_attn, layer.cross_attn))):
            return super().decode_step(tgt_in, memory, src_pad_mask, cache)
        step = cache[0]["self"].length if cache[0] else 0
        y = self.embed_tokens(tgt_in, start=step)  # (B*G, 1, D)
        memory_keep = keep_mask(src_pad_mask, False, 1, memory.size(1), memory.device)  # (B, 1, 1, S) or None
        new_keys = (y.size(0), self.cfg.n_heads, 1, self.cfg.d_model // self.cfg.n_heads)  # each layer's new keys
        storages, cross_keys, cross_values = [], [], []
        for layer, layer_cache in zip(layers, cache):
            past, cross = layer_cache.setdefault("self", KVCache()), layer_cache.setdefault("cross", {})
            if "key" not in cross:
                cross["key"], cross["value"] = layer.cross_attn.project_memory(memory)
            storages.append(past.reserve(new_keys, y))
            cross_keys.append(cross["key"])
            cross_values.append(cross["value"])
        y = compiled(packed_decoder_layers)(y, storages, step, cross_keys, cross_values, memory_keep,
                                            *self.step_weights)
        for layer_cache in cache:
            layer_cache["self"].length += 1
        return self.decoder_norm(y)[:, -1]


class Int8Transformer(SteppedTransformer):
    """A trained Transformer's weights with its nn.Linear layers in int8; for decoding (no gradients).

    The output projection is tied to the embedding in the float model; here it gets an int8 copy of
    the embedding matrix of its own (`output`), while the embedding lookup keeps the float rows.
    """

    def __init__(self, model: Transformer):
        with torch.random.fork_rng(devices=[]):  # the float init that load_state_dict overwrites: no trace left
            super().__init__(model.cfg)
        self.load_state_dict(model.state_dict())  # copied into this model's CPU fp32 parameters
        self.output = nn.Linear(model.cfg.d_model, model.cfg.vocab_size, bias=False)
        self.output.weight = nn.Parameter(self.embed.weight.detach().clone())
        self.eval()
        with torch.random.fork_rng(devices=[]):  # the float layers built on the way, overwritten at once
            for layer in [*self.encoder_layers, *self.decoder_layers]:
                layer.self_attn = Int8SelfAttention(layer.self_attn)
            replace_linears(self)
        packed = all(hasattr(linear, "packed") for linear in self.modules() if isinstance(linear, Int8Linear))
        self.encoder_weights = packed_layer_weights(self.encoder_layers, encoder_linears) if packed else None
        self.step_weights = step_arguments(self.decoder_layers, decoder_linears, fp32=False) if packed else None

    def compiled_step(self, rows: int) -> bool:
        """Whether a small step of this many rows runs compiled: where its products go through the packed weights,
        not oneDNN's (ONEDNN_ROWS)."""
        return self.decoder_layers[0].ffn.w1.packed_for(rows)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Decoder states (..., D) -> logits (..., V) through the int8 copy of the embedding."""
        return self.output(h)

    def encode(self, src: torch.Tensor, src_pad_mask: torch.Tensor) -> torch.Tensor:
        """Transformer.encode, the encoder's layers in one TorchScript call (`packed_encoder_layers`) where the batch
        is small: every product through packed weights, and SDPA's attention, as the eager layers take there."""
        B, S = src.shape
        layers = self.encoder_layers
        if explicit_step(B * self.cfg.n_heads * S, S) or not (self.encoder_weights and layers[0].ffn.w1.packed_for(
                B * S) and all(kernel_unchanged(layer.self_attn) for layer in layers)):
            return super().encode(src, src_pad_mask)
        keep = keep_mask(src_pad_mask, False, S, S, src.device)  # (B, 1, 1, S)
        return self.encoder_norm(compiled(packed_encoder_layers)(self.embed_tokens(src), keep, *self.encoder_weights))

def encoder_linears(layer) -> tuple:
    """An int8 EncoderLayer's Int8Linears, in the order `packed_encoder_layer` takes them."""
    return layer.self_attn.qkv_proj, layer.self_attn.out_proj, layer.ffn.w1, layer.ffn.w2


def decoder_linears(layer) -> tuple:
    """An int8 DecoderLayer's Int8Linears, in the order `packed_decoder_layer` takes them."""
    return (layer.self_attn.qkv_proj, layer.self_attn.out_proj, layer.cross_attn.q_proj, layer.cross_attn.out_proj,
            layer.ffn.w1, layer.ffn.w2)


def fp32_decoder_linears(layer) -> tuple:
    """A float DecoderLayer's nn.Linears, in the order `packed_decoder_layer` takes them as `weights`."""
    return (layer.self_attn.q_proj, layer.self_attn.kv_proj, layer.self_attn.out_proj, layer.cross_attn.q_proj,
            layer.cross_attn.out_proj, layer.ffn[0], layer.ffn[2])


def packed_layer_weights(layers, linears, fp32: bool = False) -> tuple:
    """What `packed_encoder_layers` takes of int8 layers besides its inputs: each layer's norms, and the packed weights
    (fp32: the weights) and biases of its `linears(layer)`; eps, heads, pre-norm, dynamic kernel. Gathered once
    (Int8Transformer.encoder_weights, SteppedTransformer.step_weights): a frozen model."""
    per_layer = [linears(layer) for layer in layers]
    norms = [[t for sub in layer.sublayers for t in (sub.norm.weight, sub.norm.bias)] for layer in layers]
    first = layers[0]
    products = [[linear.weight if fp32 else linear.packed for linear in each] for each in per_layer]
    return (norms, first.sublayers[0].norm.eps, products, [[linear.bias for linear in each] for each in per_layer],
            first.self_attn.n_heads, first.sublayers[0].pre_norm, getattr(per_layer[0][0], "kernel", "") == "dynamic")


def step_arguments(layers, linears, fp32: bool) -> tuple:
    """What `packed_decoder_layers` takes besides its inputs (SteppedTransformer.step_weights): `packed_layer_weights`
    with the products as its fp32 `weights` or its int8 `packed` ones, the other None."""
    norms, eps, products, *rest = packed_layer_weights(layers, linears, fp32)
    return (norms, eps, products if fp32 else None, None if fp32 else products, *rest)


def stepped_copy(model: Transformer) -> SteppedTransformer:
    """A float model for decoding on a CPU, its small steps compiled (SteppedTransformer), sharing model's weights."""
    with torch.random.fork_rng(devices=[]):  # the float init that the model's weights replace: no trace left
        stepped = SteppedTransformer(model.cfg)
    stepped.load_state_dict(model.state_dict(), assign=True)  # the very tensors: no second copy of the weights
    stepped.step_weights = step_arguments(stepped.decoder_layers, fp32_decoder_linears, fp32=True)
    return stepped.eval()


def int8_copy(model: Transformer | Ensemble) -> Int8Transformer | Ensemble:
    """An int8 copy of a model, or of each member of an ensemble."""
    if isinstance(model, Ensemble):
        return Ensemble([Int8Transformer(m) for m in model.members])
    return Int8Transformer(model)
