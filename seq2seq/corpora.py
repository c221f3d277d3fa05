"""Obtains parallel corpora as raw text lines (download, local mirror, or generated) and cleans them.

Corpora: `small_enja` (the 50k-pair benchmark), `tatoeba` (raw tab-separated pairs),
`files` (any aligned text files) and `demo` (the project's own generated corpus).
"""
import hashlib
import logging
import shutil
import unicodedata
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, fields
from functools import partial
from itertools import zip_longest
from pathlib import Path

from seq2seq import Seq2SeqError
from seq2seq.demo_corpus import generate_pairs
from seq2seq.files import atomic_write, iter_lines, read_lines, write_text

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
SMALL_ENJA_FILES = {"train": "train", "valid": "dev", "test": "test"}
SMALL_ENJA_LINES = {"train": 50_000, "valid": 500, "test": 500}


@dataclass
class DataConfig:
    """The `data` config group. Keys a corpus does not use stay None."""

    corpus: str  # small_enja | tatoeba | tsv | files | demo
    dir: str  # where the corpus files live (downloaded or generated into)
    src_lang: str
    tgt_lang: str
    pretokenized: bool  # text is already word-segmented: BLEU uses tokenize="none"
    normalize: bool  # apply Unicode NFKC when cleaning
    vocab_size: int
    max_len: int  # training pairs with a side longer than this many tokens are dropped
    max_tokens: int  # token budget of one batch (padded, longer side)
    num_workers: int  # DataLoader worker processes
    prepare_workers: int  # processes that segment, clean and encode the training split; 0: one per core
    dedup: bool  # drop duplicate training pairs and those sharing a side with dev/test
    segmentation: str  # pre-tokenized Japanese: as the corpus has it ("corpus") or re-segmented by "mecab"
    tokenizer_sample: int  # SentencePiece learns from at most this many training pairs (a uniform sample)
    url: str | None = None
    valid_percent: float | None = None  # tatoeba, tsv: share of source sentences held out (by hash)
    test_percent: float | None = None
    columns: list[str] | None = None  # tatoeba, tsv: what each tab-separated column holds (en, ja, score, ...)
    min_score: float | None = None  # tsv: pairs whose score column is below this are dropped
    train_tsv: str | None = None  # tsv: the pairs; valid_tsv/test_tsv, or held out from train_tsv by hash
    valid_tsv: str | None = None
    test_tsv: str | None = None
    parts: dict[str, dict] | None = None  # combined: {name: a data preset's keys}; dev and test are the first's
    n_train: int | None = None  # demo: corpus sizes
    n_valid: int | None = None
    n_test: int | None = None
    train_src: str | None = None  # files: one aligned pair of paths per split
    train_tgt: str | None = None
    valid_src: str | None = None
    valid_tgt: str | None = None
    test_src: str | None = None
    test_tgt: str | None = None

    @classmethod
    def stored(cls, values: dict) -> "DataConfig":
        """The DataConfig a checkpoint carries, from whichever version wrote it: a key it lacks was not in
        use then (dedup: off), a key this version does not know is ignored."""
        known = {f.name for f in fields(cls)}
        defaults = {"dedup": False, "segmentation": "corpus", "tokenizer_sample": 2 ** 62,  # as it was: all pairs
                    "prepare_workers": 0}
        return cls(**{**defaults, **{k: v for k, v in values.items() if k in known}})

    def __post_init__(self):
        for name in ("vocab_size", "max_len", "max_tokens", "tokenizer_sample"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}={getattr(self, name)} must be at least 1")
        if self.prepare_workers < 0:
            raise ValueError(f"data.prepare_workers={self.prepare_workers} must be 0 (one per core) or more")
        if self.segmentation not in ("corpus", "mecab"):
            raise ValueError(f"data.segmentation={self.segmentation!r}: expected corpus or mecab")
        if self.segmentation == "mecab" and not self.pretokenized:
            raise ValueError("data.segmentation=mecab re-segments a pre-tokenized corpus; this one is raw text "
                             "(data.pretokenized=false)")
        if self.max_tokens <= self.max_len:  # a sentence of max_len tokens plus its eos must fit in a batch
            raise ValueError(f"data.max_tokens={self.max_tokens} is smaller than one sentence of "
                             f"data.max_len={self.max_len} tokens (+ eos); raise max_tokens or lower max_len")


def clean_line(line: str, nfkc: bool) -> str:
    """NFKC (optional), then trim and collapse whitespace: what training and translation both see."""
    if nfkc:
        line = unicodedata.normalize("NFKC", line)
    return " ".join(line.split())


def read_parallel(src_path: str | Path, tgt_path: str | Path) -> tuple[list[str], list[str]]:
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise Seq2SeqError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}: "
                           "line N of one must translate line N of the other")
    return src, tgt


USER_AGENT = {"User-Agent": "seq2seq (English-Japanese NMT toolkit; corpus download)"}


def fetch(url: str, dest: Path) -> None:
    """Copy `url` (http(s)://, file:// or a plain path) to `dest`, atomically. The request names this
    project: some corpus hosts refuse urllib's own "Python-urllib" agent with 403."""
    if "://" not in url:
        url = Path(url).resolve().as_uri()
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=USER_AGENT), timeout=60)
    except (OSError, ValueError) as e:
        raise Seq2SeqError(f"could not fetch {url}: {getattr(e, 'reason', None) or e}") from None
    with response, atomic_write(dest, "wb") as f:
        shutil.copyfileobj(response, f)


def load_corpus(cfg: DataConfig) -> dict[str, tuple[list[str], list[str]]]:
    """Raw (src lines, tgt lines) of each split, in memory (the dev and test splits for BLEU, tests);
    training streams its pairs instead (`corpus_files`, `iter_pairs`)."""
    corpus = {}
    for split, (src_path, tgt_path) in corpus_files(cfg).items():
        pairs = list(iter_pairs(src_path, tgt_path, cfg))
        corpus[split] = ([s for s, _ in pairs], [t for _, t in pairs])
    return corpus


def corpus_files(cfg: DataConfig) -> dict[str, tuple[Path, Path]]:
    """Each split's aligned (source file, target file), fetched, split or generated first if needed."""
    if cfg.corpus == "small_enja":
        return small_enja_files(cfg)
    if cfg.corpus == "tatoeba":
        return tsv_files(cfg, {"train": tatoeba_tsv(cfg)})
    if cfg.corpus == "tsv":
        return tsv_files(cfg, {split: Path(getattr(cfg, f"{split}_tsv")) for split in SPLITS
                               if getattr(cfg, f"{split}_tsv") or split == "train" and _required(cfg, "train_tsv")})
    if cfg.corpus == "files":
        return {split: (Path(_required(cfg, f"{split}_src")), Path(_required(cfg, f"{split}_tgt"))) for split in SPLITS}
    if cfg.corpus == "demo":
        return demo_files(cfg)
    if cfg.corpus == "combined":
        from seq2seq.combined import combined_files  # it reads its parts through corpus_files

        return combined_files(cfg)
    raise Seq2SeqError(f"data.corpus={cfg.corpus!r}: expected small_enja, tatoeba, tsv, files, combined or demo")


def iter_pairs(src_path: Path, tgt_path: Path, cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """The (source line, target line) pairs of two aligned files, one at a time; with
    data.segmentation=mecab the Japanese side segmented again (`mecab_segmented`)."""
    segment = segmenter(cfg)
    for pair in aligned_lines(src_path, tgt_path):
        yield segment(pair)


def aligned_lines(src_path: Path, tgt_path: Path) -> Iterator[tuple[str, str]]:
    """The line pairs of two aligned files as they are; files of different lengths are an error."""
    for lineno, pair in enumerate(zip_longest(iter_lines(src_path), iter_lines(tgt_path)), 1):
        if None in pair:
            longer, shorter = (src_path, tgt_path) if pair[1] is None else (tgt_path, src_path)
            raise Seq2SeqError(f"{shorter} has {lineno - 1} lines but {longer} has more: "
                               "line N of one must translate line N of the other")
        yield pair


def segmenter(cfg: DataConfig):
    """What data.segmentation does to a raw pair: nothing, or MeCab on its Japanese side."""
    langs = (cfg.src_lang, cfg.tgt_lang)
    if cfg.segmentation == "mecab" and "ja" in langs:
        return partial(mecab_segmented, side=langs.index("ja"))
    return lambda pair: pair


def mecab_segmented(pair: tuple[str, str], side: int) -> tuple[str, str]:
    """The pair with its Japanese side (0: source, 1: target) joined and segmented again by MeCab, the
    segmenter `translate` applies to raw Japanese input (small_parallel_enja was segmented by KyTea, and
    a model that reads KyTea's words loses 3 BLEU on MeCab's: docs/results.md)."""
    from seq2seq.textprep import model_form, natural_form

    japanese = model_form(natural_form(pair[side], "ja"), "ja")
    return (japanese, pair[1]) if side == 0 else (pair[0], japanese)


def _required(cfg: DataConfig, key: str) -> str:
    value = getattr(cfg, key)
    if not value:
        raise Seq2SeqError(f"data.{key} is not set: data={cfg.corpus} needs it")
    return value


def small_enja_files(cfg: DataConfig) -> dict[str, tuple[Path, Path]]:
    """small_parallel_enja's {train,dev,test}.{en,ja} in data.dir, fetched from data.url if missing."""
    root = Path(cfg.dir)
    for split, name in SMALL_ENJA_FILES.items():
        for lang in (cfg.src_lang, cfg.tgt_lang):
            path = root / f"{name}.{lang}"
            if not path.exists():
                log.info("fetching %s/%s.%s", cfg.url, name, lang)
                try:
                    fetch(f"{cfg.url.rstrip('/')}/{name}.{lang}", path)
                except Seq2SeqError as e:
                    raise Seq2SeqError(
                        f"{e}. Put small_parallel_enja's {{train,dev,test}}.{{en,ja}} in {root}/, or point "
                        "data.url at a copy (data.url=file:///path/to/small_parallel_enja); "
                        "`experiment=smoke` runs offline on the demo corpus") from None
            n = count_lines(path)
            if n != SMALL_ENJA_LINES[split]:
                raise Seq2SeqError(f"{path} has {n} lines, small_parallel_enja's {name} split has "
                                   f"{SMALL_ENJA_LINES[split]}: delete the file to fetch it again")
    return {split: (root / f"{name}.{cfg.src_lang}", root / f"{name}.{cfg.tgt_lang}")
            for split, name in SMALL_ENJA_FILES.items()}


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        data = f.read()
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def tatoeba_tsv(cfg: DataConfig) -> Path:
    """data.dir/pairs.tsv, fetched from data.url (a .tsv, or the manythings jpn-eng.zip) if missing."""
    path = Path(cfg.dir) / "pairs.tsv"
    if not path.exists():
        log.info("fetching %s", cfg.url)
        try:
            fetch_tatoeba(cfg.url, path)
        except Seq2SeqError as e:
            raise Seq2SeqError(f"{e}. Put the tab-separated pairs in {path}, or point data.url at a copy "
                               "(data.url=file:///path/to/pairs.tsv or jpn-eng.zip)") from None
    return path


def stamp_path(prefix: Path, settings: tuple, sources: list[tuple[str, Path]]) -> Path:
    """`prefix`-KEY: the file that marks corpus files written from these settings and sources (each source
    named by its label, path, size and modification time), so that they are written once."""
    key = hashlib.sha256(repr(settings).encode())
    for label, path in sources:
        key.update(f"{label}\0{Path(path).resolve()}\0{path.stat().st_size}\0{path.stat().st_mtime_ns}".encode())
    return prefix.with_name(f"{prefix.name}-{key.hexdigest()[:16]}")


def mark_written(stamp: Path) -> None:
    """The files `stamp` stands for are complete: it replaces the stamps of earlier settings."""
    for old in stamp.parent.glob(f"{stamp.name.rsplit('-', 1)[0]}-*"):
        old.unlink()
    stamp.touch()


def tsv_files(cfg: DataConfig, sources: dict[str, Path]) -> dict[str, tuple[Path, Path]]:
    """Tab-separated pairs (`data.columns` names each column: a language, `score`, or anything else)
    as aligned {train,valid,test}.{src,tgt} files in data.dir, written once per sources and settings.

    A split without a file of its own is cut from train's pairs by a hash of the first language
    column (tatoeba: the English sentence), so all the translations of one sentence go to one split
    and none of them is both trained on and tested. With `score` among the columns and data.min_score
    set, pairs scored below it are dropped (JParaCrawl, WikiMatrix).
    """
    root = Path(cfg.dir)
    files = {split: (root / f"{split}.{cfg.src_lang}", root / f"{split}.{cfg.tgt_lang}") for split in SPLITS}
    stamp = stamp_path(root / "split", (cfg.columns, cfg.min_score, cfg.valid_percent, cfg.test_percent,
                                        cfg.src_lang, cfg.tgt_lang), sorted(sources.items()))
    if stamp.exists():
        return files
    with ExitStack() as stack:  # each split's pairs go straight to its two files
        out = {split: (stack.enter_context(atomic_write(src)), stack.enter_context(atomic_write(tgt)))
               for split, (src, tgt) in files.items()}
        missing = [split for split in SPLITS if split not in sources]  # cut from train's pairs
        for split, source in sources.items():
            for src, tgt, held_out in tsv_pairs(source, cfg, cut_into=missing if split == "train" else []):
                out[held_out or split][0].write(src + "\n")
                out[held_out or split][1].write(tgt + "\n")
    mark_written(stamp)
    return files


def tsv_pairs(path: Path, cfg: DataConfig, cut_into: list[str]) -> Iterator[tuple[str, str, str | None]]:
    """(source, target, the split of `cut_into` (valid, test) it is held out for, or None) for each pair of
    a tab-separated file that passes data.min_score."""
    columns = list(cfg.columns or ())
    for lang in (cfg.src_lang, cfg.tgt_lang):
        if lang not in columns:
            raise Seq2SeqError(f"data.columns={columns}: no column holds {lang}; name each column, e.g. [en, ja]")
    first = next(c for c in columns if c in (cfg.src_lang, cfg.tgt_lang))
    at = {name: columns.index(name) for name in (cfg.src_lang, cfg.tgt_lang, first, "score") if name in columns}
    n_low = 0
    for lineno, line in enumerate(iter_lines(path), 1):
        fields = line.split("\t")
        if len(fields) <= max(at.values()):
            raise Seq2SeqError(f"{path}:{lineno}: {len(fields)} tab-separated column(s) where data.columns "
                               f"names {len(columns)} ({', '.join(columns)})")
        if "score" in at and cfg.min_score is not None:
            try:
                score = float(fields[at["score"]])
            except ValueError:
                raise Seq2SeqError(f"{path}:{lineno}: score column: {fields[at['score']]!r} is not a number") from None
            if score < cfg.min_score:
                n_low += 1
                continue
        held_out = None
        if cut_into:
            bucket = int(hashlib.md5(fields[at[first]].strip().encode()).hexdigest(), 16) % 10_000 / 100
            held_out = ("test" if bucket < cfg.test_percent
                        else "valid" if bucket < cfg.test_percent + cfg.valid_percent else None)
            held_out = held_out if held_out in cut_into else None
        yield fields[at[cfg.src_lang]], fields[at[cfg.tgt_lang]], held_out
    if n_low:
        log.info("%s: dropped %d pairs scored below data.min_score=%s", path, n_low, cfg.min_score)


def fetch_tatoeba(url: str, dest: Path) -> None:
    """The manythings `jpn-eng.zip` holds `jpn.txt`; a plain .tsv/.txt URL is copied as it is."""
    if not url.endswith(".zip"):
        fetch(url, dest)
        return
    archive = dest.with_suffix(".zip")
    fetch(url, archive)
    with zipfile.ZipFile(archive) as zf:
        member = next((n for n in zf.namelist() if n.endswith("jpn.txt")), None)
        if member is None:
            raise Seq2SeqError(f"{archive}: no jpn.txt inside")
        dest.write_bytes(zf.read(member))


def demo_files(cfg: DataConfig) -> dict[str, tuple[Path, Path]]:
    """The demo corpus, generated into data.dir once (so it can be read and translated)."""
    root = Path(cfg.dir)
    sizes = {"train": cfg.n_train, "valid": cfg.n_valid, "test": cfg.n_test}
    stamp = root / f"sizes-{sizes['train']}-{sizes['valid']}-{sizes['test']}"
    if not stamp.exists():
        held_out = generate_pairs(sizes["valid"] + sizes["test"], seed=1)
        pairs = {"valid": held_out[:sizes["valid"]], "test": held_out[sizes["valid"]:],
                 "train": generate_pairs(sizes["train"], seed=0, exclude={en for en, _ in held_out})}
        root.mkdir(parents=True, exist_ok=True)
        for split, split_pairs in pairs.items():
            for i, lang in enumerate(("en", "ja")):
                write_text(root / f"{split}.{lang}", "".join(p[i] + "\n" for p in split_pairs))
        stamp.touch()
    return {split: (root / f"{split}.{cfg.src_lang}", root / f"{split}.{cfg.tgt_lang}") for split in SPLITS}


def load_demo(cfg: DataConfig) -> dict[str, tuple[list[str], list[str]]]:
    return {split: read_parallel(*paths) for split, paths in demo_files(cfg).items()}


def clean_corpus(corpus: dict[str, tuple[list[str], list[str]]], nfkc: bool):
    """Clean every line; drop training pairs with an empty side (validation/test keep every line).

    Validation/test references are cleaned like the training targets, so BLEU measures translation
    rather than full-width vs half-width forms (with NFKC on, the model writes `?` for `？`).
    """
    cleaned = {}
    for split, (src, tgt) in corpus.items():
        src_clean = [clean_line(s, nfkc) for s in src]
        tgt_clean = [clean_line(t, nfkc) for t in tgt]
        if split == "train":
            keep = [i for i in range(len(src)) if src_clean[i] and tgt_clean[i]]
            if not keep:
                raise Seq2SeqError("the training split has no pair with both sides non-empty")
            if len(keep) < len(src):
                log.info("train: dropped %d of %d pairs with an empty side", len(src) - len(keep), len(src))
            src_clean, tgt_clean = [src_clean[i] for i in keep], [tgt_clean[i] for i in keep]
        cleaned[split] = (src_clean, tgt_clean)
    return cleaned
