"""An ensemble: several models that share one tokenizer, searched as one model (`ckpt=[a.ckpt,b.ckpt]`).

At every decoding step the members' log-probabilities are averaged, log P(y) = 1/M sum_m log P_m(y)
(the search renormalizes this over the vocabulary). Greedy and beam search see one model: its memory
and its decoder state are the members' side by side, and its cache is every member's layers in turn.
"""
from dataclasses import replace

import torch
from torch import nn

from seq2seq.model import Transformer


class Ensemble(nn.Module):
    """Transformers that read and write the same vocabulary, decoded together."""

    def __init__(self, members: list[Transformer]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.cfg = replace(members[0].cfg, max_len=min(m.cfg.max_len for m in members))  # what all can take
        self.widths = [m.cfg.d_model for m in members]  # each member's share of a memory or a decoder state

    @property
    def decoder_layers(self) -> list[nn.Module]:
        """Every member's decoder layers, one after another: the search keeps one cache dict per layer."""
        return [layer for m in self.members for layer in m.decoder_layers]

    def pad_mask(self, ids: torch.Tensor) -> torch.Tensor:
        return self.members[0].pad_mask(ids)

    def encode(self, src: torch.Tensor, src_pad_mask: torch.Tensor) -> torch.Tensor:
        """src (B, S) -> the members' memories side by side (B, S, sum of d_model)."""
        return torch.cat([m.encode(src, src_pad_mask) for m in self.members], dim=-1)

    def decode_step(self, tgt_in: torch.Tensor, memory: torch.Tensor, src_pad_mask: torch.Tensor,
                    cache: list[dict]) -> torch.Tensor:
        """Each member's newest decoder state (Transformer.decode_step), side by side: (N, sum of d_model)."""
        states, first = [], 0
        for m, m_memory in zip(self.members, memory.split(self.widths, dim=-1)):
            layers = len(m.decoder_layers)
            states.append(m.decode_step(tgt_in, m_memory, src_pad_mask, cache[first:first + layers]))
            first += layers
        return torch.cat(states, dim=-1)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Decoder states (N, sum of d_model) -> the members' mean log-probabilities (N, V), in fp32."""
        parts = h.split(self.widths, dim=-1)
        return torch.stack([m.project(part).float().log_softmax(-1) for m, part in zip(self.members, parts)]).mean(0)
