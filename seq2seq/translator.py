"""Translator: a trained model with its tokenizer, translating lines by batched beam search on the device
and at the precision the machine does best (no Lightning, no Hydra: what a service or a script imports)."""
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from seq2seq import Seq2SeqError
from seq2seq.checkpoint import TextInfo, load_model
from seq2seq.corpora import clean_line
from seq2seq.data import LengthOrderSampler, TokenBatchSampler
from seq2seq.hardware import (AUTOCAST_DTYPE, choose_precision, log_choice, resolve_device, this_machine,
                              use_freed_memory)
from seq2seq.ensemble import Ensemble
from seq2seq.int8 import int8_copy, stepped_copy
from seq2seq.search import SearchConfig, search_batch
from seq2seq.textprep import join_sentences, model_form, natural_form, split_sentences
from seq2seq.tokenizer import EOS_ID, PAD_ID

# Lines are tokenized on one thread, line by line. SentencePiece starts a pool of threads at each call with a list,
# and beside torch's OpenMP threads, which spin on the cores for a while after each parallel op, its threads wait for
# a core: one line took 1.1-2.3 ms (median) that way inside a translate call on 2 cores (a pool of one thread too),
# 3 us as a string (seq2seq/tokenizer.py). A batch takes about a thousand times longer to translate than to tokenize
# (500 lines: 1.8 ms of 1.3-1.8 s), so the pool saves nothing there either.
ENCODE_THREADS = 1


class Translator:
    """A trained model with its tokenizer: `Translator.from_checkpoint(path).translate("I like tea.")`.

    Text: a model trained on a pre-tokenized corpus (small_parallel_enja) reads its input lowercased and
    word-segmented and writes natural text back (seq2seq/textprep.py), unless pretokenized=True says the
    lines are in that form already (then the output stays in it too). The model sits on `device` (`auto`:
    the CUDA GPU when there is one, else the CPU); a translate call with another `device=` moves it there.
    `precision` is decided per call (`auto`: seq2seq/hardware.py); int8 decodes with an int8 copy of the
    model, made at its first use and kept, and fp32 on a CPU with a SteppedTransformer that shares the model's
    weights (its small steps compiled: seq2seq/int8.py). `model` may be an Ensemble (seq2seq/ensemble.py):
    `Translator.from_checkpoint([a, b])`.
    """

    def __init__(self, model, tokenizer, info: TextInfo, device: str = SearchConfig.device):
        self.tokenizer, self.info = tokenizer, info
        self.device = resolve_device(device, this_machine())
        self.model = model.eval().to(self.device)
        self.int8_model = None  # int8_copy(model), made when first asked for
        self.stepped_model = None  # stepped_copy(model) for fp32 on a CPU, made when first asked for
        self.pretokenized = info.pretokenized
        self.max_len = model.cfg.max_len  # positions the model has

    @classmethod
    def from_checkpoint(cls, path: str | Path | list, device: str = SearchConfig.device) -> "Translator":
        """One checkpoint, or a list of them: an ensemble, whose members must share tokenizer and text."""
        if not isinstance(path, (list, tuple)):
            return cls(*load_model(path), device=device)
        if not path:
            raise Seq2SeqError("ckpt=[]: an ensemble needs at least one checkpoint")
        members = [load_model(p) for p in path]
        _, tokenizer, info = members[0]
        for p, (_, other_tokenizer, other_info) in zip(path[1:], members[1:]):
            if other_tokenizer.model_proto != tokenizer.model_proto:
                raise Seq2SeqError(f"{p}: its tokenizer differs from {path[0]}'s; an ensemble's members must share one")
            if (other_info.src_lang, other_info.tgt_lang, other_info.pretokenized) != \
                    (info.src_lang, info.tgt_lang, info.pretokenized):
                raise Seq2SeqError(f"{p}: translates {other_info.src_lang}->{other_info.tgt_lang} "
                                   f"(pretokenized={other_info.pretokenized}), unlike {path[0]}")
        return cls(Ensemble([model for model, _, _ in members]), tokenizer, info, device=device)

    @contextmanager
    def decoding(self, search: SearchConfig):
        """The model to decode with, inside the autocast its precision asks for: on `search.device` (`auto`:
        where the model is), at `search.precision` (`auto`: what this device does fastest, logged once).
        Without autocast, inside inference mode: autograd off, and no version counters or views tracked (1.07-1.25x
        one sentence at a time in fp32 and int8). Not under autocast, whose cache of the weights cast to bf16
        inference mode turns off (0.83-0.91x)."""
        if search.device != "auto":
            self.device = resolve_device(search.device, this_machine())
            self.model.to(self.device)
        precision, reason = choose_precision(search.precision, self.device.type, training=False,
                                             machine=this_machine(), d_model=self.model.cfg.d_model)
        log_choice(f"decoding precision {precision}: {reason}")
        use_freed_memory()  # each batch's buffers in the memory the one before freed, not fresh pages
        if precision in AUTOCAST_DTYPE:
            with torch.autocast(self.device.type, dtype=AUTOCAST_DTYPE[precision]):
                yield self.model
            return
        model = self.model
        if precision == "int8":
            model = self.int8_model = self.int8_model or int8_copy(self.model)  # before inference mode: reusable
        elif self.device.type == "cpu" and not isinstance(self.model, Ensemble):  # fp32: small steps compiled
            model = self.stepped_model = self.stepped_model or stepped_copy(self.model)
        with torch.inference_mode():
            yield model

    def check(self, search: SearchConfig) -> None:
        """Refuse a device or precision this machine cannot give before any line is read: one line, not an
        error after a progress bar has started (int8: the int8 copy is made here, once)."""
        with self.decoding(search):
            pass

    def prepare(self, lines: list[str], pretokenized: bool = False, side: str = "src") -> list[str]:
        """What the model reads: each line cleaned as training did and, for raw text and a model trained on
        a pre-tokenized corpus, lowercased and word-segmented like that corpus (`side`: src text, the lines, or tgt
        text, the prefixes). Anything but a list of str is a TypeError naming the item (`check_texts`)."""
        check_texts("lines" if side == "src" else "prefixes", lines)
        lines = [clean_line(line, self.info.normalize) for line in lines]
        if self.pretokenized and not pretokenized:
            lines = [model_form(line, getattr(self.info, f"{side}_lang")) for line in lines]
        return lines

    def finish(self, hypothesis: str, pretokenized: bool = False) -> str:
        """What the reader gets: the model's output, made natural where the input was raw."""
        return natural_form(hypothesis, self.info.tgt_lang) if self.pretokenized and not pretokenized else hypothesis

    def encode(self, lines: list[str]) -> list[list[int]]:
        """Encode prepared lines and cut those the model cannot take (with a warning naming them)."""
        ids = self.tokenizer.encode(lines, threads=ENCODE_THREADS)
        limit = self.max_len - 1  # room for eos
        for lineno, seq in enumerate(ids, 1):
            if len(seq) > limit:
                print(f"warning: line {lineno}: {len(seq)} tokens, truncated to {limit}", file=sys.stderr)
        return [seq[:limit] for seq in ids]

    def translate(self, lines: str | list[str], search: SearchConfig | None = None, progress: bool = False,
                  pretokenized: bool = False, split: bool = False, **settings) -> str | list[str]:
        """The best translation of a line (a str in, a str out), or of each line of a list.

        `search` and/or SearchConfig's fields by name (`beam_size=1`, `alpha=1.0`, `precision="32"`,
        `device="cpu"`, ...), which override it; `pretokenized` as in the class docstring. `split`: a
        line may hold several sentences (a paragraph); each is translated alone and the line rejoined.
        """
        single = isinstance(lines, str)
        lines = [lines] if single else lines
        if split:
            best = self.translate_sentences(lines, search, progress, pretokenized, **settings)
        else:
            best = [hyps[0][0] for hyps in self.translate_nbest(lines, search, progress, pretokenized, scores=False,
                                                                 **settings)]
        return best[0] if single else best

    def best_ids(self, src_ids: list[int], search: SearchConfig) -> list[int]:
        """The target ids (no bos/eos) `translate` gives for one sentence's source ids, at the same settings:
        what `visualize` and `explain` draw when no target is given."""
        with self.decoding(search) as model:
            src = pad_batch([src_ids]).to(next(model.parameters()).device)
            return search_batch(model, src, search, scores=False)[0][0][0]

    def prefix_ids(self, prefixes: list[str] | None, n: int, pretokenized: bool) -> list[list[int]] | None:
        if prefixes is None:
            return None
        prefixes = self.prepare(prefixes, pretokenized, "tgt")
        if len(prefixes) != n:
            raise Seq2SeqError(f"{len(prefixes)} prefixes for {n} lines: give one per line (an empty one for none)")
        return [seq[:self.max_len - 2] for seq in self.tokenizer.encode(prefixes, threads=ENCODE_THREADS)]

    def translate_sentences(self, lines: list[str], *args, **settings) -> list[str]:
        """Each line split into sentences, all sentences translated as one batch, each line rejoined."""
        check_texts("lines", lines)  # before the splitting reads them
        sentences = [split_sentences(line, self.info.src_lang) for line in lines]
        flat = self.translate_nbest([s for line in sentences for s in line], *args, scores=False, **settings)
        out, at = [], 0
        for line in sentences:
            out.append(join_sentences([hyps[0][0] for hyps in flat[at:at + len(line)]], self.info.tgt_lang))
            at += len(line)
        return out

    def translate_nbest(self, lines: list[str], search: SearchConfig | None = None, progress: bool = False,
                        pretokenized: bool = False, prefixes: list[str] | None = None, scores: bool = True,
                        **settings) -> list[list[tuple[str, float]]]:
        """For each line, its nbest (translation, score), best first. An empty line gives [("", 0.0)].
        `prefixes`: one target text per line that its translations must begin with ("" for none).
        `scores=False`: every score is 0 where greedy search would compute it only for them (`search_batch`)."""
        search = replace(search or SearchConfig(), **settings)
        ids = self.encode(self.prepare(lines, pretokenized))
        forced = self.prefix_ids(prefixes, len(lines), pretokenized)
        sizes = np.array([len(s) + 1 for s in ids])
        out: list = [[("", 0.0)] for _ in lines]
        todo = [i for i, s in enumerate(ids) if s]
        batches = TokenBatchSampler(LengthOrderSampler(sizes[todo], shuffle=False, seed=0),
                                    max(search.max_tokens, int(sizes.max(initial=1))), ranks=False)
        bar = tqdm(total=len(todo), disable=not progress, file=sys.stderr, unit="line")
        with self.decoding(search) as model:
            for batch in batches:
                rows = [todo[i] for i in batch]
                src = pad_batch([ids[r] for r in rows]).to(next(model.parameters()).device)
                prefix = pad_prefix([forced[r] for r in rows], src.device) if forced else None
                hyps = search_batch(model, src, search, prefix, scores)
                for r, sentence_hyps in zip(rows, hyps):
                    texts = self.tokenizer.decode([h for h, _ in sentence_hyps])
                    out[r] = [(self.finish(t, pretokenized), s) for t, (_, s) in zip(texts, sentence_hyps)]
                bar.update(len(rows))
        bar.close()
        return out


def check_texts(name: str, texts) -> None:
    """A TypeError naming the first item of `texts` that is not a str (or `texts` itself, not a list of them; any
    sized iterable will do: a tuple, a NumPy array or a pandas Series of str)."""
    if isinstance(texts, (str, bytes)) or not (hasattr(texts, "__len__") and hasattr(texts, "__iter__")):
        raise TypeError(f"{name}: expected a list of str, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}]: expected a str, got {type(text).__name__}")


def pad_prefix(prefixes: list[list[int]], device) -> torch.Tensor:
    """Target prefixes padded with -1 (no more forced tokens): (B, P)."""
    out = torch.full((len(prefixes), max(1, max(len(p) for p in prefixes))), -1, dtype=torch.long)
    for b, p in enumerate(prefixes):
        out[b, :len(p)] = torch.tensor(p, dtype=torch.long)
    return out.to(device)


def pad_batch(seqs: list[list[int]]) -> torch.Tensor:
    """Source ids + eos, padded: (B, S)."""
    src = torch.full((len(seqs), max(len(s) for s in seqs) + 1), PAD_ID, dtype=torch.long)
    for b, s in enumerate(seqs):
        src[b, :len(s) + 1] = torch.tensor(s + [EOS_ID])
    return src


class CTranslate2Translator(Translator):
    """A model exported by `run.py export format=ctranslate2`, decoded by CTranslate2, with the same text
    preparation, sentence splitting and naturalizing as Translator (`translate backend=ctranslate2`).

    Search settings map to CTranslate2's: precision (compute_type; auto is CTranslate2's own), beam_size,
    nbest (num_hypotheses), min_len, max_len_b (+ the source length times max_len_a, as a cap for the whole
    batch), sample/temperature/top_k/seed. Its length penalty differs from our GNMT alpha, so beam outputs
    can differ; greedy output is the same.
    """

    def __init__(self, model_dir: str | Path, device: str = "auto"):
        import json

        import ctranslate2

        from seq2seq.tokenizer import Tokenizer

        model_dir = Path(model_dir)
        if not (model_dir / "model.bin").is_file() or not (model_dir / "seq2seq.json").is_file():
            raise Seq2SeqError(f"{model_dir}: not a CTranslate2 export (run.py export format=ctranslate2 writes one)")
        meta = json.loads((model_dir / "seq2seq.json").read_text(encoding="utf-8"))
        self.tokenizer, self.info = Tokenizer((model_dir / "spm.model").read_bytes()), TextInfo(**meta["text_info"])
        self.pretokenized, self.max_len = self.info.pretokenized, meta["max_len"]
        self.device, self.model_dir = resolve_device(device, this_machine()), model_dir
        self.ct2: dict[str, ctranslate2.Translator] = {}  # by compute type, loaded at first use

    def runtime(self, precision: str):
        """CTranslate2 at `precision` (auto: CTranslate2's own choice for this machine)."""
        import ctranslate2

        compute_type = {"auto": "auto", "32": "float32", "bf16": "bfloat16", "16": "float16", "int8": "int8"}[precision]
        if compute_type not in self.ct2:
            try:
                self.ct2[compute_type] = ctranslate2.Translator(str(self.model_dir), device=self.device.type,
                                                                compute_type=compute_type)
            except ValueError as e:  # a compute type this device does not run (bf16 or float16 on this CPU)
                raise Seq2SeqError(f"precision={precision} on {self.device.type}: CTranslate2: {e}") from None
        return self.ct2[compute_type]

    def check(self, search: SearchConfig) -> None:
        self.runtime(search.precision)

    def translate_nbest(self, lines: list[str], search: SearchConfig | None = None, progress: bool = False,
                        pretokenized: bool = False, prefixes: list[str] | None = None, scores: bool = True,
                        **settings) -> list[list[tuple[str, float]]]:
        search = replace(search or SearchConfig(), **settings)
        ids = self.encode(self.prepare(lines, pretokenized))
        forced = self.prefix_ids(prefixes, len(lines), pretokenized)
        todo = [i for i, s in enumerate(ids) if s]
        out: list = [[("", 0.0)] for _ in lines]
        longest = max((len(ids[i]) + 1 for i in todo), default=1)
        if search.sample:
            import ctranslate2

            ctranslate2.set_random_seed(search.seed)
        results = self.runtime(search.precision).translate_batch(
            [self.tokenizer.pieces(ids[i]) + ["</s>"] for i in todo], max_batch_size=search.max_tokens,
            batch_type="tokens", beam_size=1 if search.sample else search.beam_size, num_hypotheses=search.nbest,
            return_scores=scores, min_decoding_length=search.min_len,
            # eos not counted
            max_decoding_length=min(int(search.max_len_a * longest + search.max_len_b), self.max_len - 1),
            sampling_topk=(search.top_k or 0) if search.sample else 1, sampling_topp=search.top_p,
            sampling_temperature=search.temperature,
            target_prefix=[self.tokenizer.pieces(forced[i]) for i in todo] if forced else None)
        for i, result in zip(todo, results):
            texts = [self.tokenizer.sp.decode_pieces(hyp) for hyp in result.hypotheses]
            out[i] = [(self.finish(t, pretokenized), s) for t, s in zip(texts, result.scores or [0.0] * len(texts))]
        return out


def load_translator(backend: str, ckpt: str | list[str], device: str) -> Translator:
    """`backend=torch`: our decoder on a checkpoint (a list: an ensemble); `ctranslate2`: CTranslate2 on an
    exported directory."""
    if backend not in ("torch", "ctranslate2"):
        raise Seq2SeqError(f"backend={backend!r}: expected one of torch, ctranslate2")
    if backend == "torch":
        return Translator.from_checkpoint(ckpt, device=device)
    if isinstance(ckpt, list):
        raise Seq2SeqError("backend=ctranslate2 takes one exported directory; "
                           "an ensemble (ckpt=[...]) needs backend=torch")
    try:
        return CTranslate2Translator(ckpt, device=device)
    except ImportError:
        raise Seq2SeqError("backend=ctranslate2 needs the ctranslate2 package: pip install -e '.[export]'") from None
