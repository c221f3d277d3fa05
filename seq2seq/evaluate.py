"""`run.py evaluate`: translate a test set with beam search and score it with sacrebleu BLEU and chrF."""
import json
from dataclasses import asdict
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from seq2seq import Seq2SeqError
from seq2seq.corpora import DataConfig, clean_corpus, clean_line, load_corpus, read_parallel
from seq2seq.checkpoint import TextInfo
from seq2seq.config import check_flag, checkpoints, search_config
from seq2seq.files import check_output, write_output
from seq2seq.metrics import bleu_tokenize, corpus_scores
from seq2seq.textprep import natural_form
from seq2seq.translator import Translator


def test_set(cfg: DictConfig, info: TextInfo) -> tuple[list[str], list[str]]:
    """(sources, references): the given files, or the checkpoint's own corpus's test split."""
    if (cfg.src is None) != (cfg.ref is None):
        raise Seq2SeqError("give both src=FILE and ref=FILE, or neither (the training corpus's test split)")
    if cfg.src is not None:
        src, ref = read_parallel(cfg.src, cfg.ref)
        return src, [clean_line(r, info.normalize) for r in ref]  # references cleaned as in validation
    data_cfg = DataConfig.stored(info.data_config)
    return clean_corpus({"test": load_corpus(data_cfg)["test"]}, data_cfg.normalize)["test"]


def hypotheses_path(cfg: DictConfig, tgt_lang: str) -> Path:
    """output=, else <ckpt>.<split>.hyp.<lang> beside the checkpoint (dev.en -> best.ckpt.dev.hyp.ja).

    In a sweep (`evaluate -m alpha=0.6,2.0`) each job writes into its own directory under
    hydra.sweep.dir instead, so that one setting's hypotheses and report do not overwrite another's.
    """
    if cfg.output:
        return Path(cfg.output)
    ckpt = checkpoints(cfg.ckpt)
    first = Path(ckpt[0] if isinstance(ckpt, list) else ckpt)  # an ensemble's files go beside its first member
    model = f"ensemble{len(ckpt)}" if isinstance(ckpt, list) else first.name
    name = f"{model}.{'test' if cfg.src is None else Path(cfg.src).stem}.hyp.{tgt_lang}"
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().runtime.output_dir) / name
    return first.with_name(name)


def scores_of(hyps: list[str], refs: list[str], translator: Translator, pretokenized: bool) -> dict:
    """BLEU and chrF as the text stands, and for a model trained on pre-tokenized text also on what a
    reader gets: the corpus-convention score (tok:none on segmented text, comparable with published
    numbers) and the natural one (detokenized text with sacrebleu's tokenizer for the target language)."""
    tgt_lang, natural_tokenize = translator.info.tgt_lang, bleu_tokenize(translator.info.tgt_lang, False)
    if not translator.pretokenized:
        return corpus_scores(hyps, refs, translator.info.bleu_tokenize)
    if not pretokenized:  # natural output against references as people write them
        return corpus_scores(hyps, refs, natural_tokenize)
    scores = corpus_scores(hyps, refs, "none")
    scores["natural"] = corpus_scores([natural_form(h, tgt_lang) for h in hyps],
                                      [natural_form(r, tgt_lang) for r in refs], natural_tokenize)
    return scores


def evaluate(cfg: DictConfig) -> dict:
    search = search_config(cfg)
    check_flag("pretokenized", cfg.pretokenized)
    translator = Translator.from_checkpoint(checkpoints(cfg.ckpt), device=search.device)
    translator.check(search)
    pretokenized = cfg.src is None or cfg.pretokenized  # the corpus's own test split is in its own form
    hyp_path = hypotheses_path(cfg, translator.info.tgt_lang)
    check_output(str(hyp_path))
    src, refs = test_set(cfg, translator.info)
    hyps = translator.translate(src, search, progress=cfg.progress, pretokenized=pretokenized)
    scores = scores_of(hyps, refs, translator, pretokenized)
    write_output(str(hyp_path), "".join(h + "\n" for h in hyps))
    report = {**scores, "sentences": len(src), "pretokenized_input": pretokenized, "search": asdict(search),
              "checkpoint": checkpoints(cfg.ckpt), "hypotheses": str(hyp_path)}
    write_output(str(hyp_path) + ".json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"BLEU {scores['bleu']:.2f}  chrF {scores['chrf']:.2f}  "
          f"({len(src)} sentences, beam {search.beam_size}, alpha {search.alpha})")
    print(scores["bleu_signature"])
    if "natural" in scores:
        natural = scores["natural"]
        print(f"natural text (detokenized): BLEU {natural['bleu']:.2f}  chrF {natural['chrf']:.2f}  "
              f"{natural['bleu_signature']}")
    return report
