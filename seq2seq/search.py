"""Decoding: greedy search over the plain Transformer (beam search and a KV cache: issue #3)."""
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
    for _ in range(max_output_len(src_pad_mask, model, max_len_a, max_len_b)):
        logits = model.project(model.decode(ys, memory, src_pad_mask)[:, -1])  # (B, V)
        next_token = logits.argmax(-1).masked_fill(finished, PAD_ID)  # (B,)
        ys = torch.cat([ys, next_token[:, None]], dim=1)
        finished |= next_token.eq(EOS_ID)
        if finished.all():
            break
    return ys[:, 1:]
