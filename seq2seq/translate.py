"""`run.py translate`: batch translation of a file or stdin with beam search, one output line per input line."""
from omegaconf import DictConfig

from seq2seq import Seq2SeqError
from seq2seq.config import check_choice, check_flag, search_config
from seq2seq.files import check_output, read_lines, write_output
from seq2seq.translator import Translator


def translate(cfg: DictConfig) -> None:
    search = search_config(cfg)
    check_choice("errors", cfg.errors, ("strict", "replace"))
    check_flag("pretokenized", cfg.pretokenized)
    check_flag("split", cfg.split)
    check_output(str(cfg.output), str(cfg.input))
    lines = read_lines(str(cfg.input), cfg.errors, hint="; pass errors=replace to translate it anyway")
    translator = Translator.from_checkpoint(cfg.ckpt, device=search.device)
    if cfg.split:
        if search.nbest > 1:
            raise Seq2SeqError("split=true gives one translation per line (its sentences rejoined); use nbest=1")
        results = [[(line, 0.0)] for line in translator.translate(lines, search, progress=cfg.progress,
                                                                  pretokenized=cfg.pretokenized, split=True)]
    else:
        results = translator.translate_nbest(lines, search, progress=cfg.progress, pretokenized=cfg.pretokenized)
    if search.nbest > 1:
        text = "".join(f"{i} ||| {hyp} ||| {score:.4f}\n" for i, hyps in enumerate(results, 1) for hyp, score in hyps)
    else:
        text = "".join(hyps[0][0] + "\n" for hyps in results)
    write_output(str(cfg.output), text)
