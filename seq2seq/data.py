"""Token-id arrays, token-budget batches and padding: what training and translation share (no Lightning;
the corpus preparation and the LightningDataModule are in datamodule.py)."""
import itertools
import shutil
from array import array
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from seq2seq import Seq2SeqError
from seq2seq.files import atomic_write
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID


class TokenArray:
    """Variable-length id sequences stored flat (`tokens`) with `offsets`; memory-mapped from disk."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray):
        self.tokens, self.offsets = tokens, offsets
        self.lengths = np.diff(offsets)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @classmethod
    def build(cls, seqs: list[list[int]], path: Path) -> "TokenArray":
        """Write `seqs` as `path.tokens.npy` + `path.offsets.npy` (atomically) and map them back."""
        writer = TokenArrayWriter(path)
        writer.append(seqs)
        return writer.close()

    @classmethod
    def load(cls, path: Path) -> "TokenArray":
        return cls(np.load(path.with_name(f"{path.name}.tokens.npy"), mmap_mode="r"),
                   np.load(path.with_name(f"{path.name}.offsets.npy")))

    @staticmethod
    def exists(path: Path) -> bool:
        return path.with_name(f"{path.name}.offsets.npy").exists()


class TokenArrayWriter:
    """Builds a TokenArray's files from sequences appended chunk by chunk, holding only the offsets in
    memory: the tokens go to disk as they come (`path.tokens.npy`, `path.offsets.npy`, like `build`)."""

    def __init__(self, path: Path):
        self.path, self.offsets = path, array("q", [0])
        self.raw = open(path.with_name(f"{path.name}.tokens.raw"), "wb")

    def append(self, seqs: list[list[int]]) -> None:
        self.append_flat(np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int32),
                         np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs)))

    def append_flat(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Sequences given as their tokens end to end and their lengths."""
        self.offsets.extend((self.offsets[-1] + np.cumsum(lengths)).tolist())
        tokens.astype(np.int32, copy=False).tofile(self.raw)

    def close(self) -> TokenArray:
        """Write the .npy files (a header, then the raw tokens copied over) and map them back."""
        self.raw.close()
        raw = self.path.with_name(f"{self.path.name}.tokens.raw")
        with open(raw, "rb") as src, atomic_write(self.path.with_name(f"{self.path.name}.tokens.npy"), "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.dtype(np.int32).str, "fortran_order": False,
                                                     "shape": (self.offsets[-1],)})
            shutil.copyfileobj(src, f, 1 << 24)
        raw.unlink()
        with atomic_write(self.path.with_name(f"{self.path.name}.offsets.npy"), "wb") as f:
            np.save(f, np.frombuffer(self.offsets, dtype=np.int64))
        return TokenArray.load(self.path)


class ParallelDataset(Dataset):
    """Pairs of id arrays; item i is (i, src ids, tgt ids) without bos/eos."""

    def __init__(self, src: TokenArray, tgt: TokenArray):
        self.src, self.tgt = src, tgt

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int):
        return i, self.src[i], self.tgt[i]

    @property
    def sizes(self) -> np.ndarray:
        """Padded width each pair needs: the longer side plus its eos (source) or bos (target)."""
        return np.maximum(self.src.lengths, self.tgt.lengths) + 1

    def sampler(self, shuffle: bool, seed: int) -> "LengthOrderSampler":
        """Pairs by size, then by source length, then by target length."""
        return LengthOrderSampler(self.sizes, shuffle, seed, ties=(self.src.lengths, self.tgt.lengths))


class LengthOrderSampler(Sampler[int]):
    """Indices sorted by size, then by each of `ties` (source and target lengths): pairs that share a
    size also share their widths on each side, so a batch pads little on either (small_parallel_enja:
    97% of the padded tokens real, against 84% sorted by size alone). Equal keys come in a new random
    order each epoch when shuffling."""

    def __init__(self, sizes: np.ndarray, shuffle: bool, seed: int, ties: tuple[np.ndarray, ...] = ()):
        self.sizes, self.shuffle, self.seed, self.epoch = sizes, shuffle, seed, 0
        self.ties = ties

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of each epoch (as `batch_sampler.sampler.set_epoch`)."""
        self.epoch = epoch

    def rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def order(self) -> np.ndarray:
        """This epoch's indices, by size, then by each of `ties`. (N,) int64"""
        order = self.rng().permutation(len(self.sizes)) if self.shuffle else np.arange(len(self.sizes))
        keys = [key[order] for key in reversed(self.ties)] + [self.sizes[order]]  # lexsort: last key first
        return order[np.lexsort(keys)]

    def __iter__(self):
        return iter(self.order().tolist())

    def __len__(self) -> int:
        return len(self.sizes)


def batch_starts(sorted_sizes: np.ndarray, max_tokens: int) -> np.ndarray:
    """Where each batch starts in a size-sorted order: batches as long as (count x widest) fits max_tokens.

    Sorted, a batch's widest pair is its last, so the batch from a ends before the first k with
    (k - a + 1) * size[k] > max_tokens; (k - a + 1) * size[k] only grows with k, so that k is found in a
    window of max_tokens // size[a] + 1 pairs. One numpy step per batch, none per pair. (B,) int64
    """
    starts, a, n = [], 0, len(sorted_sizes)
    while a < n:
        window = sorted_sizes[a:a + max_tokens // max(int(sorted_sizes[a]), 1) + 1]
        fits = np.arange(1, len(window) + 1) * window <= max_tokens
        starts.append(a)
        a += max(int(np.argmin(fits)) if not fits.all() else len(window), 1)
    return np.array(starts, dtype=np.int64)


class TokenBatchSampler(Sampler[list[int]]):
    """Cuts the length-sorted order into batches of at most `max_tokens` padded tokens.

    Sorting first means each batch holds similar lengths (little padding); with shuffling on, the
    batch order is shuffled too. Under torch.distributed each rank takes every world_size-th batch: in
    training the same number on every rank (the last few dropped), in validation every batch once;
    `ranks=False` keeps every batch on every rank (a Translator decodes all the lines it is given).
    Batches are numpy index arrays (8 bytes a pair), and their number is counted once: it is the same
    every epoch, as the sizes are.
    """

    def __init__(self, sampler: LengthOrderSampler, max_tokens: int, ranks: bool = True):
        self.sampler, self.max_tokens = sampler, max_tokens  # Lightning calls sampler.set_epoch
        self.ranks = ranks and dist.is_available()  # deal the batches to the ranks of torch.distributed
        self.start = 0  # batches of this epoch to skip (a resumed run; see ResumableDataLoader)
        if len(sampler.sizes) and sampler.sizes.max() > max_tokens:
            raise Seq2SeqError(f"data.max_tokens={max_tokens} is smaller than one sentence "
                               f"({sampler.sizes.max()} tokens): raise data.max_tokens or lower data.max_len")
        self.n_batches = len(batch_starts(np.sort(sampler.sizes), max_tokens))

    def batches(self) -> list[np.ndarray]:
        order = self.sampler.order()
        if not len(order):
            return []  # (np.split would give one empty batch)
        batches = np.split(order, batch_starts(self.sampler.sizes[order], self.max_tokens)[1:])
        if self.sampler.shuffle:
            self.sampler.rng().shuffle(batches)
        if self.ranks and dist.is_initialized():
            world, rank = dist.get_world_size(), dist.get_rank()
            end = len(batches) // world * world if self.sampler.shuffle else len(batches)
            batches = batches[rank:end:world]
        return batches

    def __iter__(self):
        return (batch.tolist() for batch in self.batches()[self.start:])

    def __len__(self) -> int:
        if self.ranks and dist.is_initialized():
            world, rank = dist.get_world_size(), dist.get_rank()
            return self.n_batches // world if self.sampler.shuffle else len(range(rank, self.n_batches, world))
        return self.n_batches


class ResumableDataLoader(DataLoader):
    """A DataLoader that can continue mid-epoch: Lightning stores `state_dict()` (the epoch and how many
    of its batches were handed out) in each checkpoint and gives it back through `load_state_dict` on
    resume; the token-budget batches are then dealt from that point of the same shuffled order.

    Lightning fetches no batch ahead from a loader with a length, so batches handed out = batches trained.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.yielded, self.resume_at = 0, 0

    def __iter__(self):
        self.yielded, self.resume_at = self.resume_at, 0
        self.batch_sampler.start = self.yielded
        for batch in super().__iter__():
            self.yielded += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.batch_sampler.sampler.epoch, "consumed": self.yielded}

    def load_state_dict(self, state: dict) -> None:
        # Lightning starts the resumed iterator before its set_epoch call, so the epoch comes from here
        self.batch_sampler.sampler.set_epoch(state["epoch"])
        self.resume_at = state["consumed"]


def collate(samples, pad_id: int = PAD_ID) -> dict[str, torch.Tensor]:
    """Pad one batch: src gets eos; tgt_in = bos + tgt; tgt_out = tgt + eos (the labels)."""
    ids, srcs, tgts = zip(*samples)
    B, S, T = len(ids), max(len(s) for s in srcs) + 1, max(len(t) for t in tgts) + 1
    src = np.full((B, S), pad_id, dtype=np.int64)
    tgt_in = np.full((B, T), pad_id, dtype=np.int64)
    tgt_out = np.full((B, T), pad_id, dtype=np.int64)
    for b, (s, t) in enumerate(zip(srcs, tgts)):
        src[b, :len(s)], src[b, len(s)] = s, EOS_ID
        tgt_in[b, 0], tgt_in[b, 1:len(t) + 1] = BOS_ID, t
        tgt_out[b, :len(t)], tgt_out[b, len(t)] = t, EOS_ID
    n_tokens = sum(len(s) + len(t) for s, t in zip(srcs, tgts)) + 2 * B  # real tokens, eos included
    tgt_real = np.flatnonzero(tgt_out != pad_id)  # (N,) real target positions of the flattened (B*T) labels
    return {"ids": torch.tensor(ids), "src": torch.from_numpy(src), "tgt_in": torch.from_numpy(tgt_in),
            "tgt_out": torch.from_numpy(tgt_out), "tgt_real": torch.from_numpy(tgt_real), "n_tokens": n_tokens}
