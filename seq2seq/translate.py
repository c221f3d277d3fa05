"""`run.py translate`: translation of a file or stdin with beam search, one output line per input line.

The input streams: lines are read, translated and written `chunk_lines` at a time (one at a time when
stdin is a terminal, so each typed line is answered at once), so memory stays flat on any input and
the first translations come out before the last lines are read. A file is checked for invalid UTF-8
before any work; its output is written atomically when the last chunk is done.
"""
import itertools
import sys
from collections.abc import Iterable, Iterator

from omegaconf import DictConfig
from tqdm import tqdm

from seq2seq import Seq2SeqError
from seq2seq.config import check_choice, check_flag, checkpoints, search_config
from seq2seq.files import check_output, iter_lines, open_output
from seq2seq.search import SearchConfig
from seq2seq.translator import load_translator

HINT = "; pass errors=replace to translate it anyway"


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
    source = str(cfg.input)
    check_output(str(cfg.output), source)
    for path in [p for p in (source, cfg.prefix) if p is not None and p != "-"]:
        for _ in iter_lines(path, cfg.errors, HINT):  # invalid UTF-8 anywhere: one line, before any work
            pass
    prefixes = iter_lines(str(cfg.prefix), cfg.errors, HINT) if cfg.prefix is not None else None
    translator = load_translator(cfg.backend, checkpoints(cfg.ckpt), search.device)
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


def translate_stream(translator, lines: Iterable[str], search: SearchConfig, chunk_lines: int,
                     pretokenized: bool = False, split: bool = False,
                     prefixes: Iterable[str] | None = None) -> Iterator[str]:
    """The output text of each chunk of `chunk_lines` lines, in order: one line per input line, or
    `nbest` lines `LINE_NUMBER ||| translation ||| score` per input line. `prefixes`: one target
    prefix per line, read alongside."""
    lines = iter(lines)
    prefixes = iter(prefixes) if prefixes is not None else None
    done = 0
    while chunk := list(itertools.islice(lines, chunk_lines)):
        forced = list(itertools.islice(prefixes, len(chunk))) if prefixes is not None else None
        if forced is not None and len(forced) < len(chunk):
            raise Seq2SeqError(f"prefix= has {done + len(forced)} lines but the input has more: give one per line")
        if split:
            results = [[(t, 0.0)] for t in translator.translate(chunk, search, pretokenized=pretokenized, split=True)]
        else:
            results = translator.translate_nbest(chunk, search, pretokenized=pretokenized, prefixes=forced)
        if search.nbest > 1:
            yield "".join(f"{done + i} ||| {hyp} ||| {score:.4f}\n"
                          for i, hyps in enumerate(results, 1) for hyp, score in hyps)
        else:
            yield "".join(hyps[0][0] + "\n" for hyps in results)
        done += len(chunk)
    if prefixes is not None and next(prefixes, None) is not None:
        raise Seq2SeqError(f"prefix= has more lines than the input's {done}: give one per line")
