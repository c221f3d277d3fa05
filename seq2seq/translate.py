"""`run.py translate`: translation of a file or stdin with beam search, one output line per input line.

The input streams: lines are read, translated and written `chunk_lines` at a time (one at a time when
stdin is a terminal, so each typed line is answered at once), so memory stays flat on any input and
the first translations come out before the last lines are read. A file is checked for invalid UTF-8
before any work; its output is written atomically when the last chunk is done.
"""
import itertools
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from omegaconf import DictConfig
from tqdm import tqdm

from seq2seq import Seq2SeqError
from seq2seq.config import check_choice, check_flag, checkpoints, search_config
from seq2seq.files import check_output, iter_lines, open_output
from seq2seq.search import SearchConfig
from seq2seq.translator import load_translator

HINT = "; pass errors=replace to translate it anyway"
log = logging.getLogger(__name__)


def translate(cfg: DictConfig) -> None:
    search = search_config(cfg)
    check_choice("errors", cfg.errors, ("strict", "replace"))
    check_flag("pretokenized", cfg.pretokenized)
    check_flag("split", cfg.split)
    if cfg.split and search.nbest > 1:
        raise Seq2SeqError("split=true gives one translation per line (its sentences rejoined); use nbest=1")
    if cfg.split and cfg.prefix is not None:
        raise Seq2SeqError("prefix= gives one prefix per line; split=true would split the line but not its prefix")
    if not isinstance(cfg.chunk_lines, int) or cfg.chunk_lines < 1:
        raise Seq2SeqError(f"chunk_lines={cfg.chunk_lines!r}: expected a whole number of at least 1")
    if not isinstance(cfg.devices, int) or cfg.devices < 1:
        raise Seq2SeqError(f"devices={cfg.devices!r}: expected a whole number of at least 1")
    source = str(cfg.input)
    check_output(str(cfg.output), source)
    for path in [p for p in (source, cfg.prefix) if p is not None and p != "-"]:
        for _ in iter_lines(path, cfg.errors, HINT):  # invalid UTF-8 anywhere: one line, before any work
            pass
    if cfg.devices > 1:
        return translate_sharded(cfg, search)
    prefixes = iter_lines(str(cfg.prefix), cfg.errors, HINT) if cfg.prefix is not None else None
    translator = load_translator(cfg.backend, checkpoints(cfg.ckpt), search.device)
    translator.check(search)
    interactive = source == "-" and sys.stdin.isatty()
    chunk_lines = 1 if interactive else cfg.chunk_lines
    bar = tqdm(disable=not cfg.progress or interactive, file=sys.stderr, unit="line")
    with open_output(str(cfg.output)) as out:
        for text in translate_stream(translator, iter_lines(source, cfg.errors, HINT), search, chunk_lines,
                                     cfg.pretokenized, cfg.split, prefixes):
            out.write(text)
            out.flush()
            bar.update(text.count("\n") // (search.nbest if search.nbest > 1 else 1))
    bar.close()


def chunks(lines: Iterable[str], chunk_lines: int,
           prefixes: Iterable[str] | None = None) -> Iterator[tuple[list[str], list[str] | None]]:
    """The input `chunk_lines` lines at a time, each with its prefixes (read alongside) or None; a prefix
    file longer or shorter than the input is an error naming both counts."""
    lines = iter(lines)
    prefixes = iter(prefixes) if prefixes is not None else None
    done = 0
    while chunk := list(itertools.islice(lines, chunk_lines)):
        forced = list(itertools.islice(prefixes, len(chunk))) if prefixes is not None else None
        if forced is not None and len(forced) < len(chunk):
            raise Seq2SeqError(f"prefix= has {done + len(forced)} lines but the input has more: give one per line")
        yield chunk, forced
        done += len(chunk)
    if prefixes is not None and next(prefixes, None) is not None:
        raise Seq2SeqError(f"prefix= has more lines than the input's {done}: give one per line")


def translate_chunk(translator, chunk: list[str], forced: list[str] | None, search: SearchConfig, first: int,
                    pretokenized: bool = False, split: bool = False) -> str:
    """The output text of one chunk whose first line is line `first` + 1 of the input."""
    if split:
        results = [[(t, 0.0)] for t in translator.translate(chunk, search, pretokenized=pretokenized, split=True)]
    else:
        results = translator.translate_nbest(chunk, search, pretokenized=pretokenized, prefixes=forced,
                                             scores=search.nbest > 1)  # printed only with the nbest list
    if search.nbest > 1:
        return "".join(f"{first + i} ||| {hyp} ||| {score:.4f}\n"
                       for i, hyps in enumerate(results, 1) for hyp, score in hyps)
    return "".join(hyps[0][0] + "\n" for hyps in results)


def translate_stream(translator, lines: Iterable[str], search: SearchConfig, chunk_lines: int,
                     pretokenized: bool = False, split: bool = False,
                     prefixes: Iterable[str] | None = None) -> Iterator[str]:
    """The output text of each chunk of `chunk_lines` lines, in order: one line per input line, or
    `nbest` lines `LINE_NUMBER ||| translation ||| score` per input line. `prefixes`: one target
    prefix per line, read alongside."""
    for c, (chunk, forced) in enumerate(chunks(lines, chunk_lines, prefixes)):
        yield translate_chunk(translator, chunk, forced, search, c * chunk_lines, pretokenized, split)


def translate_sharded(cfg: DictConfig, search: SearchConfig) -> None:
    """`devices=N`: N processes (GPUs, or CPU processes with cores/N threads each) started by Lightning
    Fabric. Every process reads the input; chunk c is translated by rank c mod N into its own shard
    file; rank 0 then joins the shards, chunk by chunk, into one output in input order. Any rank's error
    reaches rank 0, which reports it; a failed run leaves no output and no shards."""
    import torch.distributed as dist
    from lightning.fabric import Fabric

    from seq2seq.hardware import resolve_device, share_cpu_budget, this_machine

    if str(cfg.input) == "-":
        raise Seq2SeqError("devices=N reads the input in every process: give input=FILE, not stdin")
    if cfg.backend != "torch":
        raise Seq2SeqError("devices=N runs our decoder (backend=torch); CTranslate2 spreads itself over its devices")
    if search.device not in ("auto", "cpu", "cuda"):
        raise Seq2SeqError(f"device={search.device} with devices={cfg.devices}: each process takes its own GPU; "
                           "give device=cuda (or auto)")
    device = resolve_device(search.device, this_machine())
    if device.type == "cpu":
        share_cpu_budget(cfg.devices)
    try:
        fabric = Fabric(accelerator=device.type, devices=cfg.devices, strategy="ddp")
    except Exception as e:  # Lightning's MisconfigurationException: more GPUs asked for than there are
        raise Seq2SeqError(f"devices={cfg.devices}: {e}") from None
    fabric.launch()
    rank, world = fabric.global_rank, fabric.world_size
    shard_dir = fabric.broadcast(tempfile.mkdtemp(prefix=".translate-shards-", dir=shard_parent(str(cfg.output)))
                                 if rank == 0 else None)
    error, sizes = None, []
    try:
        translator = load_translator(cfg.backend, checkpoints(cfg.ckpt), str(fabric.device))
        prefixes = iter_lines(str(cfg.prefix), cfg.errors, HINT) if cfg.prefix is not None else None
        bar = tqdm(disable=not cfg.progress or rank != 0, file=sys.stderr, unit="line", desc=f"rank 0 of {world}")
        with open(Path(shard_dir, f"{rank}"), "w", encoding="utf-8", newline="") as shard:
            sizes = translate_shard(translator, iter_lines(str(cfg.input), cfg.errors, HINT), shard, search,
                                    cfg.chunk_lines, rank, world, cfg.pretokenized, cfg.split, prefixes, bar.update)
        bar.close()
    except Exception as e:  # every rank must reach the gather below, or the others wait for it forever
        if not isinstance(e, Seq2SeqError):
            log.exception("rank %d failed", rank)
        error = f"{e}" if isinstance(e, Seq2SeqError) else f"rank {rank}: {type(e).__name__}: {e}"
    gathered = [None] * world
    dist.all_gather_object(gathered, (error, sizes))
    if rank != 0:
        return
    try:
        errors = [e for e, _ in gathered if e is not None]
        if errors:
            raise Seq2SeqError(errors[0])
        with open_output(str(cfg.output)) as out:
            merge_shards([Path(shard_dir, f"{r}") for r in range(world)], [s for _, s in gathered], out)
    finally:
        shutil.rmtree(shard_dir, ignore_errors=True)


def shard_parent(output: str) -> str | None:
    """Shards go beside the output (same disk, and shared when the output's folder is); stdout: the temp dir."""
    return None if output == "-" else str(Path(output).resolve().parent)


def translate_shard(translator, lines: Iterable[str], shard, search: SearchConfig, chunk_lines: int, rank: int,
                    world: int, pretokenized: bool = False, split: bool = False,
                    prefixes: Iterable[str] | None = None, progress=lambda n: None) -> list[int]:
    """Translate chunks rank, rank + world, ... into `shard`; the number of output lines of each."""
    sizes = []
    for c, (chunk, forced) in enumerate(chunks(lines, chunk_lines, prefixes)):
        if c % world == rank:
            text = translate_chunk(translator, chunk, forced, search, c * chunk_lines, pretokenized, split)
            shard.write(text)
            sizes.append(text.count("\n"))
            progress(len(chunk))
    return sizes


def merge_shards(paths: list[Path], sizes: list[list[int]], out) -> None:
    """Write the shards' chunks to `out` in input order: chunk c is the next sizes[c mod N] lines of shard
    c mod N (read as bytes, split on \\n only, as every line was written)."""
    shards = [open(path, "rb") for path in paths]
    try:
        for c in range(sum(len(s) for s in sizes)):
            r, k = c % len(shards), c // len(shards)
            out.write(b"".join(itertools.islice(shards[r], sizes[r][k])).decode("utf-8"))
    finally:
        for shard in shards:
            shard.close()
