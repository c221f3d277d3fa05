"""data=combined: every raw pair the project can read as one corpus, its pre-tokenized parts made raw."""
import logging
import unicodedata
from contextlib import ExitStack
from pathlib import Path

from seq2seq import Seq2SeqError
from seq2seq.corpora import SPLITS, DataConfig, aligned_lines, corpus_files, mark_written, stamp_path
from seq2seq.files import atomic_write, iter_lines

log = logging.getLogger(__name__)


def combined_files(cfg: DataConfig) -> dict[str, tuple[Path, Path]]:
    """data=combined: the training pairs of every part (data.parts) as one raw corpus in data.dir; dev and
    test are the first part's (Tatoeba's), so scores compare with a model trained on that part alone.

    A pre-tokenized part (small_parallel_enja) is made raw first (`raw_form`): Japanese words joined,
    English detokenized and truecased by a model learned from the raw parts' English. No test sentence
    is trained on: a training pair goes when either side, compared without case, spaces or punctuation
    (`canonical`), is a dev or test sentence of any part (Tatoeba and small_parallel_enja share about a
    quarter of their sentences, written differently).
    """
    if not cfg.parts:
        raise Seq2SeqError("data.parts is empty: data=combined needs the corpora to combine")
    parts = {name: part_config(cfg, name, values) for name, values in cfg.parts.items()}
    files = {name: corpus_files(part) for name, part in parts.items()}
    root = Path(cfg.dir)
    out = {split: (root / f"{split}.{cfg.src_lang}", root / f"{split}.{cfg.tgt_lang}") for split in SPLITS}
    stamp = stamp_path(root / "combined", (cfg.src_lang, cfg.tgt_lang, sorted(cfg.parts.items())),
                       [(f"{name} {split}", path) for name, part_files in files.items()
                        for split, pair in part_files.items() for path in pair])
    if stamp.exists():
        return out
    held = {canonical(line) for part_files in files.values() for split in ("valid", "test")
            for path in part_files[split] for line in iter_lines(path)}
    truecaser = learned_truecaser([files[name]["train"][(cfg.src_lang, cfg.tgt_lang).index("en")]
                                   for name, part in parts.items() if not part.pretokenized and "en" in
                                   (cfg.src_lang, cfg.tgt_lang)])
    first = next(iter(parts))
    with ExitStack() as stack:
        writers = {split: [stack.enter_context(atomic_write(path)) for path in pair] for split, pair in out.items()}
        for name, part in parts.items():
            for split in SPLITS if name == first else ("train",):
                kept = n_held = 0
                for pair in aligned_lines(*files[name][split]):
                    if part.pretokenized:
                        pair = tuple(raw_form(line, lang, truecaser) for line, lang in zip(pair, (cfg.src_lang,
                                                                                                   cfg.tgt_lang)))
                    if split == "train" and (canonical(pair[0]) in held or canonical(pair[1]) in held):
                        n_held += 1
                        continue
                    for writer, line in zip(writers[split], pair):
                        writer.write(line + "\n")
                    kept += 1
                log.info("combined: %s %s: %d pairs%s", name, split, kept,
                         f", {n_held} dropped as a dev/test sentence of a part" if n_held else "")
    mark_written(stamp)
    return out


def part_config(cfg: DataConfig, name: str, values: dict) -> DataConfig:
    """One part of data=combined, in the combined corpus's direction."""
    from seq2seq.config import build_config

    values = {**values, "src_lang": cfg.src_lang, "tgt_lang": cfg.tgt_lang}
    return build_config(DataConfig, values, f"data.parts.{name}")


def canonical(line: str) -> str:
    """A sentence as a held-out check compares it: NFKC, lowercased, letters and digits only."""
    return "".join(ch for ch in unicodedata.normalize("NFKC", line).lower() if ch.isalnum())


def learned_truecaser(sources: list[tuple[Path, ...]] | list[Path]):
    """A MosesTruecaser (sacremoses) learned from raw English files: each word's most frequent casing."""
    from sacremoses import MosesTruecaser

    from seq2seq.textprep import moses

    if not sources:
        return None
    tokenizer, _ = moses("en")
    truecaser = MosesTruecaser()
    truecaser.train([tokenizer.tokenize(line, escape=False) for path in sources for line in iter_lines(path)],
                    save_to=None, processes=1)
    return truecaser


def raw_form(line: str, lang: str, truecaser=None) -> str:
    """A pre-tokenized, lowercased line as people write it: truecased (English, when a truecaser is
    given), then made natural (`natural_form`: words joined or detokenized, sentence start capitalized)."""
    from seq2seq.textprep import natural_form

    if lang == "en" and truecaser is not None:
        line = truecaser.truecase(line, return_str=True)
    return natural_form(line, lang)
