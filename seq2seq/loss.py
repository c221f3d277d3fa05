"""Label-smoothed cross-entropy fused with the output projection, computed in row chunks.

`F.cross_entropy(h @ E^T, y)` materializes (N, V) logits, their fp32 copy, log-probabilities and
a gradient of the same size: on a CPU those fresh 100 MB buffers cost more than the matmul
(measured: half of a d_model 256 training step). Here each chunk of rows gets its logits, loss
and logit gradient in one cache-sized buffer, which is turned straight into the gradients of
h and E; nothing (N, V) is ever allocated. Same value and gradients as F.cross_entropy.

The passes over each chunk are the fewest found: one exp a logit (log-sum-exp is taken from the softmax's own
sum), and the label smoothing's mean logit and its constant share of the gradient come from D-wide dot
products and a correction after the matmuls, not from passes over (n, V).
"""
import torch

from seq2seq.hardware import rows_per_block

CPU_CHUNK_ROWS = 256  # rows per chunk on a CPU: a (rows, V) buffer that stays in its cache


class FusedProjectionCrossEntropy(torch.autograd.Function):
    """loss = mean_i [(1 - eps) * NLL_i + eps * mean_v(-log p_iv)],  logits = h @ weight^T."""

    @staticmethod
    def forward(ctx, h, weight, target, label_smoothing: float, chunk_rows: int):
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        with torch.autocast(device, enabled=False):
            h_c, w_c = h.to(dtype), weight.to(dtype)  # (N, D), (V, D) in the matmul dtype
            acc = torch.promote_types(dtype, torch.float32)  # softmax and sums: at least fp32
            N, V = h.size(0), weight.size(0)
            eps = label_smoothing
            need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
            grad_h = torch.empty_like(h, dtype=acc) if need_grad else None
            grad_w = torch.zeros_like(weight, dtype=acc) if need_grad else None
            total = torch.zeros((), dtype=acc, device=h.device)
            mean_w = w_c.to(acc).mean(dim=0)  # (D,): mean_v(logits) = h . mean_v(W), with no pass over (n, V)
            for start in range(0, N, chunk_rows):
                rows = slice(start, start + chunk_rows)
                h_n = h_c[rows]  # (n, D)
                logits = (h_n @ w_c.t()).to(acc)  # (n, V)
                tgt = target[rows, None]  # (n, 1)
                m = logits.amax(dim=-1, keepdim=True)  # (n, 1)
                logit_t = logits.gather(1, tgt)
                e = logits.sub_(m).exp_()  # (n, V) exp(logits - m): the softmax's numerator, its one exp
                s = e.sum(dim=-1, keepdim=True)  # (n, 1)
                lse = m + s.log()
                nll, smooth = lse - logit_t, lse - (h_n.to(acc) * mean_w).sum(dim=-1, keepdim=True)
                total += ((1 - eps) * nll + eps * smooth).sum()
                if need_grad:
                    # d loss_i / d logits = softmax - (1 - eps) onehot(target) - eps / V. The constant goes into the
                    # matmuls' results, as a correction of rank 1, and costs no pass over (n, V); 1/N after the
                    # matmuls: in fp16, values of order p / N would underflow (1 / N of 1e-5 is below its smallest)
                    p = e.mul_(s.reciprocal()).scatter_add_(1, tgt, torch.full_like(s, eps - 1)).to(dtype)
                    grad_h[rows] = (p @ w_c).to(acc).sub_(eps * mean_w)
                    grad_w += p.t() @ h_n
            if need_grad:
                grad_w -= (eps / V) * h.to(acc).sum(dim=0)
        if need_grad:
            ctx.save_for_backward(grad_h.div_(N), grad_w.div_(N))
        ctx.dtypes = (h.dtype, weight.dtype)
        return total / N

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (grad_h * grad_loss).to(h_dtype), (grad_w * grad_loss).to(w_dtype), None, None, None


def projection_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                             label_smoothing: float = 0.0, chunk_rows: int | None = None) -> torch.Tensor:
    """Mean label-smoothed cross-entropy of logits h @ weight^T against target.

    Args: h (N, D) decoder states of real target positions; weight (V, D) output embedding;
    target (N,) token ids; chunk_rows: rows at a time (default: CPU_CHUNK_ROWS on a CPU; on a GPU, which
    has no cache to keep them in and pays kernel launches per chunk, as many as `rows_per_block` allows).
    Returns a scalar.
    """
    chunk_rows = chunk_rows or rows_per_block(h.device, weight.size(0), CPU_CHUNK_ROWS)
    return FusedProjectionCrossEntropy.apply(h, weight, target, label_smoothing, chunk_rows)
