"""TranslationDataModule: corpus -> cleaning -> joint SentencePiece -> cached id arrays -> batches."""
import hashlib
import logging
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from seq2seq.corpora import SPLITS, DataConfig, clean_corpus, drop_overlap, load_corpus
from seq2seq.data import (LengthOrderSampler, ParallelDataset, ResumableDataLoader, TokenArray, TokenBatchSampler,
                          collate)
from seq2seq.tokenizer import PAD_ID, Tokenizer, train_tokenizer

log = logging.getLogger(__name__)


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
        if cfg.dedup:
            self.texts["train"] = drop_overlap(self.texts)
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
