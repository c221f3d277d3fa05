"""Turns cleaned text into cached token-id arrays, batches them by token budget, pads; TranslationDataModule."""
import hashlib
import logging
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from seq2seq import Seq2SeqError
from seq2seq.corpora import SPLITS, DataConfig, clean_corpus, load_corpus
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, train_tokenizer

log = logging.getLogger(__name__)


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
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in seqs], out=offsets[1:])
        tokens = np.fromiter((i for s in seqs for i in s), dtype=np.int32, count=int(offsets[-1]))
        for name, array in (("tokens", tokens), ("offsets", offsets)):
            tmp = path.with_name(f"{path.name}.{name}.tmp.npy")
            np.save(tmp, array)
            tmp.replace(path.with_name(f"{path.name}.{name}.npy"))
        return cls.load(path)

    @classmethod
    def load(cls, path: Path) -> "TokenArray":
        return cls(np.load(path.with_name(f"{path.name}.tokens.npy"), mmap_mode="r"),
                   np.load(path.with_name(f"{path.name}.offsets.npy")))

    @staticmethod
    def exists(path: Path) -> bool:
        return path.with_name(f"{path.name}.offsets.npy").exists()


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


class LengthOrderSampler(Sampler[int]):
    """Indices sorted by size; equal sizes come in a new random order each epoch when shuffling."""

    def __init__(self, sizes: np.ndarray, shuffle: bool, seed: int):
        self.sizes, self.shuffle, self.seed, self.epoch = sizes, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of each epoch (as `batch_sampler.sampler.set_epoch`)."""
        self.epoch = epoch

    def rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def __iter__(self):
        order = self.rng().permutation(len(self.sizes)) if self.shuffle else np.arange(len(self.sizes))
        return iter(order[np.argsort(self.sizes[order], kind="stable")].tolist())

    def __len__(self) -> int:
        return len(self.sizes)


class TokenBatchSampler(Sampler[list[int]]):
    """Cuts the length-sorted order into batches of at most `max_tokens` padded tokens.

    Sorting first means each batch holds similar lengths (little padding); with shuffling on, the
    batch order is shuffled too. Under torch.distributed each rank takes every world_size-th batch.
    """

    def __init__(self, sampler: LengthOrderSampler, max_tokens: int):
        self.sampler, self.max_tokens = sampler, max_tokens  # Lightning calls sampler.set_epoch
        self.start = 0  # batches of this epoch to skip (a resumed run; see ResumableDataLoader)
        if len(sampler.sizes) and sampler.sizes.max() > max_tokens:
            raise Seq2SeqError(f"data.max_tokens={max_tokens} is smaller than one sentence "
                               f"({sampler.sizes.max()} tokens): raise data.max_tokens or lower data.max_len")

    def batches(self) -> list[list[int]]:
        batches, batch, width = [], [], 0
        for i in self.sampler:
            new_width = max(width, self.sampler.sizes[i])
            if batch and (len(batch) + 1) * new_width > self.max_tokens:
                batches.append(batch)
                batch, new_width = [], self.sampler.sizes[i]
            batch.append(i)
            width = new_width
        if batch:
            batches.append(batch)
        if self.sampler.shuffle:
            self.sampler.rng().shuffle(batches)
            if dist.is_available() and dist.is_initialized():
                world, rank = dist.get_world_size(), dist.get_rank()
                batches = batches[rank:len(batches) // world * world:world]
        return batches

    def __iter__(self):
        return iter(self.batches()[self.start:])

    def __len__(self) -> int:
        return len(self.batches())


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


def binarize(lines: list[str], tokenizer: Tokenizer, max_len: int, path: Path) -> TokenArray:
    """Encode and cache `lines`, truncating to `max_len` ids (only valid/test can be too long here)."""
    if TokenArray.exists(path):
        return TokenArray.load(path)
    seqs = tokenizer.encode(lines)
    n_long = sum(len(s) > max_len for s in seqs)
    if n_long:
        log.warning("%s: %d lines longer than %d tokens were truncated", path.name, n_long, max_len)
    return TokenArray.build([s[:max_len] for s in seqs], path)


def drop_long_pairs(src, tgt, tokenizer: Tokenizer, max_len: int):
    src_ids, tgt_ids = tokenizer.encode(src), tokenizer.encode(tgt)
    keep = [i for i in range(len(src)) if len(src_ids[i]) <= max_len and len(tgt_ids[i]) <= max_len]
    if len(keep) < len(src):
        log.info("train: dropped %d of %d pairs over max_len=%d tokens", len(src) - len(keep), len(src), max_len)
    return [src[i] for i in keep], [tgt[i] for i in keep]


class TranslationDataModule(L.LightningDataModule):
    """Corpus -> cleaning -> joint SentencePiece -> cached id arrays -> token-budget batches.

    After `setup()`: `tokenizer`, `datasets[split]` and `texts[split]` = (src lines, tgt lines),
    cleaned; the validation/test target lines are the BLEU references.
    """

    def __init__(self, cfg: DataConfig, cache_dir: str | Path, seed: int):
        super().__init__()
        self.cfg, self.cache_dir, self.seed = cfg, Path(cache_dir), seed
        self.tokenizer: Tokenizer | None = None
        self.datasets: dict[str, ParallelDataset] = {}
        self.texts: dict[str, tuple[list[str], list[str]]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return
        cfg = self.cfg
        self.texts = clean_corpus(load_corpus(cfg), nfkc=cfg.normalize)
        train_src, train_tgt = self.texts["train"]
        self.tokenizer = train_tokenizer(train_src + train_tgt, cfg.vocab_size, self.cache_dir)
        self.texts["train"] = drop_long_pairs(train_src, train_tgt, self.tokenizer, cfg.max_len)
        key = corpus_key(self.texts, self.tokenizer, cfg.max_len)
        for split in SPLITS:
            src, tgt = self.texts[split]
            prefix = self.cache_dir / f"{cfg.corpus}-{key}" / split
            prefix.parent.mkdir(parents=True, exist_ok=True)
            self.datasets[split] = ParallelDataset(
                binarize(src, self.tokenizer, cfg.max_len, prefix.with_name(f"{split}.src")),
                binarize(tgt, self.tokenizer, cfg.max_len, prefix.with_name(f"{split}.tgt")))
        log.info("corpus %s %s->%s: %s pairs; vocab %d", cfg.corpus, cfg.src_lang, cfg.tgt_lang,
                 ", ".join(f"{s} {len(self.datasets[s])}" for s in SPLITS), self.tokenizer.vocab_size)

    def dataloader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.datasets[split]
        sampler = TokenBatchSampler(LengthOrderSampler(dataset.sizes, shuffle, self.seed), self.cfg.max_tokens)
        loader = ResumableDataLoader if shuffle else DataLoader
        # its own generator: starting an iterator must not draw from the global RNG that dropout uses,
        # or a resumed run (which starts one more iterator) would see other dropout masks than an unbroken one
        return loader(dataset, batch_sampler=sampler, collate_fn=partial(collate, pad_id=PAD_ID),
                      num_workers=self.cfg.num_workers, persistent_workers=self.cfg.num_workers > 0,
                      generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("valid", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test", shuffle=False)


def corpus_key(texts, tokenizer: Tokenizer, max_len: int) -> str:
    """Hash of everything the id arrays depend on: the cleaned text, the tokenizer, the length limit."""
    digest = hashlib.sha256(tokenizer.model_proto + str(max_len).encode())
    for split in SPLITS:
        for side in texts[split]:
            digest.update("\n".join(side).encode() + b"\0")
    return digest.hexdigest()[:16]
