"""TranslationDataModule: corpus files -> streamed cleaning and filtering -> joint SentencePiece -> cached
id arrays -> batches.

The training split is never held in memory: one pass over its files decides which pairs to keep and
draws the tokenizer's sample, a second pass encodes the kept pairs chunk by chunk straight into the
memory-mapped token arrays. In both passes the chunks are segmented, cleaned and encoded on
data.prepare_workers processes (one per core by default), in order, so the arrays do not depend on how
many. Memory grows with the corpus only by the offsets, one hash and one flag per pair. The arrays are
cached under a key of the corpus files (path, size, modification time) and the data settings, so a
second run over the same files opens them and starts training at once.
"""
import hashlib
import itertools
import logging
import os
import random
import shutil
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from functools import partial
from itertools import islice
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from seq2seq import Seq2SeqError
from seq2seq.corpora import SPLITS, DataConfig, aligned_lines, clean_line, corpus_files, iter_pairs, segmenter
from seq2seq.data import (ParallelDataset, ResumableDataLoader, TokenArray, TokenArrayWriter,
                          TokenBatchSampler, collate)
from seq2seq.files import atomic_write
from seq2seq.hardware import cpu_budget
from seq2seq.tokenizer import PAD_ID, Tokenizer, train_tokenizer

log = logging.getLogger(__name__)
CHUNK_PAIRS = 20_000  # training pairs prepared at a time: one job of one preparation process
EMPTY, HELD_OUT, CANDIDATE = 0, 1, 2  # what the first pass finds of each training pair


def binarize(lines: list[str], tokenizer: Tokenizer, max_len: int, path: Path) -> TokenArray:
    """Encode `lines` (dev or test) into a TokenArray, truncating to `max_len` ids with a warning."""
    seqs = tokenizer.encode(lines)
    n_long = sum(len(s) > max_len for s in seqs)
    if n_long:
        log.warning("%s: %d lines longer than %d tokens were truncated", path.name, n_long, max_len)
    return TokenArray.build([s[:max_len] for s in seqs], path)


def scan_train(pairs, cfg: DataConfig, held_src: set, held_tgt: set,
               chunk_pairs: int = CHUNK_PAIRS) -> tuple[np.ndarray, list[str]]:
    """First pass over the raw training pairs: which to keep, and the sample the tokenizer learns from.

    Kept: both sides non-empty once segmented and cleaned (`prepared`) and, with data.dedup, neither side
    a dev/test sentence and no earlier pair the same (by a 64-bit hash of the pair). The sample is every
    kept pair's source then every kept pair's target when there are at most data.tokenizer_sample
    candidates, else a uniform sample of that many pairs (reservoir sampling, seed 0), in corpus order.
    The pairs are prepared `chunk_pairs` at a time on data.prepare_workers processes (`in_order`).
    Returns keep (N,) bool and the sample's lines.
    """
    hashes, state = [], []
    reservoir, rng, n_candidates = [], random.Random(0), 0
    for chunk_hashes, chunk_state, candidates in in_order(scan_chunk, numbered(pairs, chunk_pairs), cfg,
                                                          (cfg, held_src, held_tgt, None)):
        hashes.append(chunk_hashes)
        state.append(chunk_state)
        for i, src, tgt in candidates:
            n_candidates += 1
            if len(reservoir) < cfg.tokenizer_sample:
                reservoir.append((i, src, tgt))
            elif (j := rng.randrange(n_candidates)) < cfg.tokenizer_sample:
                reservoir[j] = (i, src, tgt)
    hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.int64)
    state = np.concatenate(state) if state else np.zeros(0, np.int8)
    keep = first_of_duplicates(hashes, state, cfg.dedup)
    sample = sorted((i, src, tgt) for i, src, tgt in reservoir if keep[i])
    log_scan(state, keep, n_candidates, len(sample), cfg.tokenizer_sample)
    return keep, [src for _, src, _ in sample] + [tgt for _, _, tgt in sample]


def numbered(pairs, chunk_pairs: int):
    """(index of the first pair, the next chunk_pairs pairs), ..."""
    pairs, start = iter(pairs), 0
    while chunk := list(islice(pairs, chunk_pairs)):
        yield start, chunk
        start += len(chunk)


_JOB: dict = {}  # what a preparation process holds for its chunks (`start_job`)


def start_job(cfg: DataConfig, held_src: set, held_tgt: set, model_proto: bytes | None, threads: int) -> None:
    _JOB.update(cfg=cfg, segment=segmenter(cfg), held_src=held_src, held_tgt=held_tgt, threads=threads,
                tokenizer=Tokenizer(model_proto) if model_proto else None)


def prepared(pair: tuple[str, str]) -> tuple[str, str]:
    """A raw pair as the model trains on it: segmented (data.segmentation), then cleaned."""
    src, tgt = _JOB["segment"](pair)
    return clean_line(src, _JOB["cfg"].normalize), clean_line(tgt, _JOB["cfg"].normalize)


def pair_hash(src: str, tgt: str) -> int:
    """64 bits of BLAKE2b: the same in every process (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(f"{len(src)}:{src}{tgt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def scan_chunk(job: tuple[int, list]) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str, str]]]:
    """One chunk of the first pass: each pair's hash and state, and the candidates (index, src, tgt)."""
    start, pairs = job
    hashes, state, candidates = np.zeros(len(pairs), np.int64), np.zeros(len(pairs), np.int8), []
    for k, pair in enumerate(pairs):
        src, tgt = prepared(pair)
        hashes[k] = pair_hash(src, tgt)
        if not (src and tgt):
            state[k] = EMPTY
        elif _JOB["cfg"].dedup and (src in _JOB["held_src"] or tgt in _JOB["held_tgt"]):
            state[k] = HELD_OUT
        else:
            state[k] = CANDIDATE
            candidates.append((start + k, src, tgt))
    return hashes, state, candidates


def encode_chunk(pairs: list[tuple[str, str]]) -> tuple[list[np.ndarray], int]:
    """One chunk of the second pass: the pairs prepared and encoded, those with a side over data.max_len
    tokens dropped. Returns [src tokens, src lengths, tgt tokens, tgt lengths] and the number dropped."""
    kept = [prepared(pair) for pair in pairs]
    src_ids, tgt_ids = (_JOB["tokenizer"].encode([p[side] for p in kept], _JOB["threads"]) for side in (0, 1))
    max_len = _JOB["cfg"].max_len
    fits = [k for k in range(len(kept)) if len(src_ids[k]) <= max_len and len(tgt_ids[k]) <= max_len]
    arrays = []
    for ids in (src_ids, tgt_ids):
        arrays += [np.fromiter((t for k in fits for t in ids[k]), np.int32),
                   np.fromiter((len(ids[k]) for k in fits), np.int64, len(fits))]
    return arrays, len(kept) - len(fits)


def preparation_workers(cfg: DataConfig) -> int:
    """data.prepare_workers, or one per CPU this process may use (a container's quota included)."""
    return cfg.prepare_workers or cpu_budget()


def in_order(fn, jobs, cfg: DataConfig, job_args: tuple):
    """fn(job) for each job, in order, on data.prepare_workers processes (each set up by start_job), at most
    two jobs per process ahead of the caller, so that memory stays flat. A single job, or one worker,
    runs in this process: small corpora start no processes."""
    jobs = iter(jobs)
    first = list(islice(jobs, 2))
    workers = preparation_workers(cfg)
    if workers == 1 or len(first) < 2:
        start_job(*job_args, -1)  # SentencePiece encodes on every core
        try:
            yield from map(fn, itertools.chain(first, jobs))
        finally:
            _JOB.clear()
        return
    log.info("preparing the training split on %d processes (data.prepare_workers=%d)", workers, cfg.prepare_workers)
    pool = ProcessPoolExecutor(workers, initializer=start_job, initargs=(*job_args, 1))  # a core each
    try:
        pending = deque()
        for job in itertools.chain(first, jobs):
            pending.append(pool.submit(fn, job))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def first_of_duplicates(hashes: np.ndarray, state: np.ndarray, dedup: bool) -> np.ndarray:
    """(N,) True for the candidates to train on: with dedup, only the first of identical non-empty pairs."""
    keep = state == CANDIDATE
    if dedup:
        non_empty = np.flatnonzero(state != EMPTY)
        first = np.zeros(len(state), dtype=bool)
        first[non_empty[np.unique(hashes[non_empty], return_index=True)[1]]] = True
        keep &= first
    if not keep.any():
        raise Seq2SeqError("the training split has no pair left with both sides non-empty and no dev/test sentence")
    return keep


def log_scan(state: np.ndarray, keep: np.ndarray, n_candidates: int, n_sample: int, cap: int) -> None:
    n = len(state)
    log.info("train: %d pairs; dropped %d with an empty side, %d sharing a side with dev/test, %d duplicates",
             n, int((state == EMPTY).sum()), int((state == HELD_OUT).sum()), n_candidates - int(keep.sum()))
    if n_candidates > cap:
        log.info("tokenizer: trained on a sample of %d of %d pairs (data.tokenizer_sample)", n_sample, n_candidates)


def encode_train(pairs, keep: np.ndarray, cfg: DataConfig, tokenizer: Tokenizer, path: Path,
                 chunk_pairs: int = CHUNK_PAIRS) -> ParallelDataset:
    """Second pass: the kept raw pairs prepared and encoded `chunk_pairs` at a time (on data.prepare_workers
    processes) into the id arrays at `path`, dropping pairs with a side longer than data.max_len tokens."""
    src_out, tgt_out = TokenArrayWriter(path / "train.src"), TokenArrayWriter(path / "train.tgt")
    kept = (pair for i, pair in enumerate(pairs) if keep[i])
    n_long = 0
    jobs = (chunk for _, chunk in numbered(kept, chunk_pairs))
    for (src_tokens, src_lengths, tgt_tokens, tgt_lengths), dropped in in_order(
            encode_chunk, jobs, cfg, (cfg, set(), set(), tokenizer.model_proto)):
        src_out.append_flat(src_tokens, src_lengths)
        tgt_out.append_flat(tgt_tokens, tgt_lengths)
        n_long += dropped
    if n_long:
        log.info("train: dropped %d of %d pairs over max_len=%d tokens", n_long, int(keep.sum()), cfg.max_len)
    return ParallelDataset(src_out.close(), tgt_out.close())


def cache_key(cfg: DataConfig, files: dict[str, tuple[Path, Path]]) -> str:
    """What the prepared arrays depend on: each corpus file (path, size, modification time) and the data
    settings (all but the batching ones)."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("max_tokens", "num_workers", "prepare_workers")}
    digest = hashlib.sha256(repr(sorted(settings.items())).encode() + b"format 3")
    for split in SPLITS:
        for path in files[split]:
            stat = Path(path).stat()
            digest.update(f"{Path(path).resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:16]


class TranslationDataModule(L.LightningDataModule):
    """Corpus files -> streamed cleaning and filtering -> joint SentencePiece -> cached id arrays ->
    token-budget batches.

    After `setup()`: `tokenizer`, `datasets[split]`, and `texts[split]` = (src lines, tgt lines), cleaned,
    for valid and test only (their targets are the BLEU references).
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
        cfg, files = self.cfg, corpus_files(self.cfg)
        for split in ("valid", "test"):  # in memory: the BLEU references and the held-out sentences
            pairs = [(clean_line(s, cfg.normalize), clean_line(t, cfg.normalize))
                     for s, t in iter_pairs(*files[split], cfg)]
            self.texts[split] = ([s for s, _ in pairs], [t for _, t in pairs])
        path = self.cache_dir / f"{cfg.corpus}-{cache_key(cfg, files)}"
        if not path.is_dir():
            self.prepare(files, path)
        self.tokenizer = Tokenizer((path / "spm.model").read_bytes())
        self.datasets = {split: ParallelDataset(*(TokenArray.load(path / f"{split}.{side}") for side in ("src", "tgt")))
                         for split in SPLITS}
        log.info("corpus %s %s->%s: %s pairs; vocab %d (%s)", cfg.corpus, cfg.src_lang, cfg.tgt_lang,
                 ", ".join(f"{s} {len(self.datasets[s])}" for s in SPLITS), self.tokenizer.vocab_size, path)

    def prepare(self, files: dict[str, tuple[Path, Path]], path: Path) -> None:
        """Build the cache directory `path`: written under a temporary name, then renamed into place, so
        that it exists only when complete (another process that got there first wins)."""
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            self.prepare_into(files, tmp)
        except BaseException:  # a bad line, a full disk, Ctrl-C: no half-built directory is left behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            tmp.rename(path)
        except OSError:  # prepared by another process meanwhile: use theirs
            if not path.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)

    def prepare_into(self, files: dict[str, tuple[Path, Path]], tmp: Path) -> None:
        cfg = self.cfg
        held_src, held_tgt = (set(self.texts["valid"][i] + self.texts["test"][i]) for i in (0, 1))
        keep, sample = scan_train(aligned_lines(*files["train"]), cfg, held_src, held_tgt)
        tokenizer = train_tokenizer(sample, cfg.vocab_size, self.cache_dir)
        del sample
        encode_train(aligned_lines(*files["train"]), keep, cfg, tokenizer, tmp)
        for split in ("valid", "test"):
            for side, lines in zip(("src", "tgt"), self.texts[split]):
                binarize(lines, tokenizer, cfg.max_len, tmp / f"{split}.{side}")
        with atomic_write(tmp / "spm.model", "wb") as f:
            f.write(tokenizer.model_proto)

    def dataloader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.datasets[split]
        sampler = TokenBatchSampler(dataset.sampler(shuffle, self.seed), self.cfg.max_tokens)
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


