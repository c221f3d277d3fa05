"""The joint SentencePiece model: trained on the training split, cached, serialized into checkpoints.

This is the only place that knows the special ids (pad, unk, bos, eos).
"""
import hashlib
import io
from pathlib import Path

import sentencepiece as spm

from seq2seq import Seq2SeqError
from seq2seq.files import atomic_write

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# SentencePiece's encode or decode of a list starts a pool of threads at each call, even of one thread: 0.1-0.2 ms a
# call on an idle 2-core EPYC, 1.1-1.5 ms inside a translate call (torch's OpenMP threads spin on the cores), where
# one string takes 3 us. Decoding each sentence's translations with one call had spent 80 of a greedy translate's
# 910 ms over 500 lines. So one thread means line by line, here.


class Tokenizer:
    """A unigram SentencePiece model shared by source and target (one vocabulary, one embedding)."""

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, lines: list[str], threads: int = -1) -> list[list[int]]:
        """Ids of each line, encoded on `threads` threads (-1: SentencePiece's choice, every core; 1: line by line)."""
        if threads == 1:
            return [self.sp.encode(line) for line in lines]
        return self.sp.encode(lines, num_threads=threads)

    def decode(self, ids: list[list[int]]) -> list[str]:
        """Ids to text; stops at the first eos and drops pad/bos, so raw search output can go in."""
        return [self.sp.decode(_strip_special(seq)) for seq in ids]  # line by line: no pool of threads

    def pieces(self, ids: list[int]) -> list[str]:
        """The SentencePiece pieces of `ids`, e.g. ['▁my', '▁father'] (▁ marks a word start)."""
        return [self.sp.id_to_piece(i) for i in ids]


def _strip_special(ids: list[int]) -> list[int]:
    out = []
    for i in ids:
        if i == EOS_ID:
            break
        if i not in (PAD_ID, BOS_ID):
            out.append(i)
    return out


def train_tokenizer(lines: list[str], vocab_size: int, cache_dir: Path) -> Tokenizer:
    """Train (or reuse from `cache_dir`) a unigram model with byte fallback on `lines`.

    The cache key hashes the training text and every setting, so any change retrains.
    """
    settings = dict(
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=0.9995,  # covers the common kanji; byte fallback catches the rest
        byte_fallback=True,  # any character survives as UTF-8 bytes instead of becoming <unk>
        split_digits=True,
        normalization_rule_name="identity",  # text is NFKC-cleaned once, in corpora.clean_line
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        hard_vocab_limit=False,  # a tiny corpus may not fill vocab_size
        input_sentence_size=2_000_000, shuffle_input_sentence=True,
        num_threads=2, minloglevel=2,
    )
    digest = hashlib.sha256(repr(sorted(settings.items())).encode())
    for line in lines:
        digest.update(line.encode() + b"\n")
    path = Path(cache_dir) / f"spm-{digest.hexdigest()[:16]}.model"
    if path.exists():
        return Tokenizer(path.read_bytes())
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, **settings)
    except RuntimeError as e:  # e.g. a vocab_size below the corpus's character count + 256 byte pieces
        raise Seq2SeqError(f"SentencePiece training failed (data.vocab_size={vocab_size}): "
                           f"{str(e).split('] ')[-1]}") from None
    with atomic_write(path, "wb") as f:
        f.write(model.getvalue())
    return Tokenizer(model.getvalue())
