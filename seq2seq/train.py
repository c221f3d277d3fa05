"""`run.py train`: build tokenizer, data, model, module and Trainer from the config; fit; test; write results.json."""
import json
import logging
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from seq2seq import Seq2SeqError
from seq2seq.checkpoint import TextInfo, load_checkpoint, save_checkpoint
from seq2seq.config import build_config, run_config
from seq2seq.corpora import DataConfig
from seq2seq.datamodule import TranslationDataModule
from seq2seq.files import write_text
from seq2seq.hardware import (share_cpu_budget, this_machine, training_accelerator, training_precision,
                              use_freed_memory)
from seq2seq.lit_module import (MONITOR, BudgetSchedule, OptimConfig, TokenThroughput, TranslationModule,
                                ValidationClock)
from seq2seq.metrics import bleu_tokenize
from seq2seq.model import ModelConfig, Transformer
from seq2seq.search import SearchConfig
from seq2seq.tokenizer import PAD_ID

log = logging.getLogger(__name__)
AUTO_VALIDATION_BATCHES = 2000  # trainer.val_check_interval=auto: at most this many batches between validations


@contextmanager
def own_distributed_state():
    """Leave no process group or rank variables behind, so that the next job of a multirun launches
    its own DDP ranks instead of reusing dead ones (lightning#11300, lightning-hydra-template#393)."""
    environ = dict(os.environ)
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but never leaving a torn file (see `save_checkpoint`)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        save_checkpoint(checkpoint, path)


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that survives a copied or moved run directory.

    Resumed from a checkpoint saved under another directory, Lightning keeps the old best_model_path
    and drops the best score: the test then scored the *old* directory's best.ckpt, and results.json
    had no val/bleu. When the saved files are in this directory too (it was copied or moved), their
    paths are taken as this directory's; otherwise (training on from another run) Lightning's rule stands.
    """

    def load_state_dict(self, state_dict: dict) -> None:
        old, new = state_dict.get("dirpath"), self.dirpath

        def here(path):  # the same file in this run's checkpoint directory
            return str(Path(new) / Path(path).name) if path else path

        if old and new and old != new and Path(here(state_dict.get("best_model_path") or "")).is_file():
            log.info("checkpoints moved from %s to %s: their scores carry over", old, new)
            state_dict = {**state_dict, "dirpath": new, "best_model_path": here(state_dict["best_model_path"]),
                          "kth_best_model_path": here(state_dict.get("kth_best_model_path")),
                          "last_model_path": here(state_dict.get("last_model_path")),
                          "best_k_models": {here(p): v for p, v in state_dict.get("best_k_models", {}).items()}}
        super().load_state_dict(state_dict)


def train(cfg: DictConfig) -> float:
    """Train, keep the best checkpoint by dev BLEU, score it on the test split. Returns best val/bleu."""
    with own_distributed_state():
        return train_job(cfg)


def no_advert(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()  # Lightning's tip to install a cloud logger, on every run


def quiet_lightning() -> None:
    """Lightning's messages once, through Hydra's handlers (the console and the run's train.log): the
    `lightning` package adds a console handler of its own, so every line came twice. Also drops its
    advert and two warnings about its own internals that a user cannot act on."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(no_advert)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message="Precision bf16-mixed is not supported by the model summary")


def quiet_other_ranks() -> None:
    """Under DDP every rank runs this job: only rank 0 logs our progress (each line once in the console
    and run.log); the other ranks still log warnings and errors, which may be their own."""
    if rank_zero_only.rank > 0:  # set from the launcher's RANK / LOCAL_RANK before any rank starts work
        logging.getLogger("seq2seq").setLevel(logging.WARNING)


def train_job(cfg: DictConfig) -> float:
    quiet_lightning()
    quiet_other_ranks()
    # every config group is checked before any work (the tokenizer's vocab_size and pad_id come later)
    data_cfg = build_config(DataConfig, cfg.data, "data")
    model_cfg = build_config(ModelConfig, cfg.model, "model", vocab_size=data_cfg.vocab_size, pad_id=PAD_ID)
    if model_cfg.max_len <= data_cfg.max_len:  # positions for the longest sentence plus its eos/bos
        raise Seq2SeqError(f"model.max_len={model_cfg.max_len} must exceed data.max_len={data_cfg.max_len} "
                           "(the longest training sentence plus its eos)")
    optim_cfg = build_config(OptimConfig, cfg.optim, "optim")
    if optim_cfg.decay == "linear" and not (cfg.trainer.get("max_time") or cfg.trainer.get("max_steps", -1) > 0):
        raise Seq2SeqError("optim.decay=linear decays to zero at the last step: give trainer.max_steps or "
                           "trainer.max_time (or optim.decay=inverse_sqrt)")
    run = run_config(cfg)
    val_search = build_config(SearchConfig, cfg.validation, "validation")
    accelerator = training_accelerator(cfg.trainer.accelerator, cfg.trainer.devices, this_machine())
    L.seed_everything(run.seed, workers=True)
    out = Path(cfg.output_dir)
    datamodule = TranslationDataModule(data_cfg, cache_dir=Path(cfg.data_dir) / "cache", seed=run.seed)
    datamodule.setup("fit")
    tokenizer = datamodule.tokenizer
    model = Transformer(replace(model_cfg, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id))
    text_info = TextInfo(data_cfg.src_lang, data_cfg.tgt_lang, data_cfg.normalize,
                         bleu_tokenize(data_cfg.tgt_lang, data_cfg.pretokenized), asdict(data_cfg))
    references = {split: datamodule.texts[split][1] for split in ("valid", "test")}
    module = TranslationModule(model, tokenizer, optim_cfg, text_info, references, val_search)

    checkpoint = RunCheckpoint(dirpath=out / "checkpoints", filename="best", monitor=MONITOR, mode="max",
                               save_last=True, enable_version_counter=False)
    throughput = TokenThroughput()
    # check_on_train_epoch_end=False: val/bleu exists only after validation, and Lightning 2.6 cannot tell
    # by itself when validation comes by the clock (it reads a val_check_interval it never sets then)
    stop_early = EarlyStopping(MONITOR, mode="max", patience=run.patience, check_on_train_epoch_end=False)
    validations = ValidationClock()
    callbacks = [checkpoint, throughput, validations, stop_early]
    if run.keep_last > 0:  # the newest N validations' weights, for `run.py average`
        callbacks.append(RunCheckpoint(dirpath=out / "checkpoints", filename="step{step:06d}", monitor="step",
                                       mode="max", save_top_k=run.keep_last, save_weights_only=True,
                                       auto_insert_metric_name=False, enable_version_counter=False))
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_cfg["val_check_interval"] == "auto":
        batches = len(datamodule.train_dataloader())
        trainer_cfg["val_check_interval"], trainer_cfg["check_val_every_n_epoch"] = validation_interval(batches)
    trainer_cfg["accelerator"] = accelerator
    trainer_cfg["precision"] = training_precision(trainer_cfg["precision"], trainer_cfg["accelerator"], this_machine(),
                                                model_cfg.d_model)
    if trainer_cfg["accelerator"] == "cpu" and isinstance(trainer_cfg["devices"], int):
        share_cpu_budget(trainer_cfg["devices"])  # DDP ranks on this machine's CPUs
    if trainer_cfg.get("max_time"):
        callbacks.append(BudgetSchedule(optim_cfg.max_warmup_share))
    if trainer_cfg.pop("logger"):
        trainer_cfg["logger"] = [CSVLogger(out, name="csv"), TensorBoardLogger(out, name="tensorboard")]
        callbacks.append(LearningRateMonitor("step"))
    else:
        trainer_cfg["logger"] = False
    try:
        trainer = L.Trainer(**trainer_cfg, default_root_dir=out, callbacks=callbacks, plugins=[AtomicCheckpointIO()])
    except (MisconfigurationException, ValueError, TypeError) as e:  # a trainer key Lightning refuses
        raise Seq2SeqError(f"trainer: {e}") from None

    log.info("machine: %s", this_machine().describe())
    use_freed_memory()  # each step's activations in the memory the step before freed, not fresh pages
    log.info("model: %s parameters", f"{sum(p.numel() for p in model.parameters()):,}")
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path(cfg.ckpt_path, out))
    train_time = time.perf_counter() - start
    if not checkpoint.best_model_path:  # it ended before its first validation (max_steps or max_time inside an epoch)
        score_final_weights(trainer, module, datamodule, checkpoint, out)
    trainer.test(module, datamodule=datamodule, ckpt_path="best")
    if not trainer.is_global_zero:  # under DDP each rank decoded its share of dev/test, gathered; rank 0 reports
        return float(checkpoint.best_model_score or float("nan"))
    return write_results(out, module, checkpoint, throughput, validations, train_time, trainer.global_step)


def validation_interval(batches_per_epoch: int) -> tuple[float | int, int | None]:
    """trainer.val_check_interval=auto: once an epoch, or every AUTO_VALIDATION_BATCHES batches when an
    epoch is longer (a large corpus would otherwise wait hours for its first score). Returns Lightning's
    (val_check_interval, check_val_every_n_epoch)."""
    if batches_per_epoch <= AUTO_VALIDATION_BATCHES:
        return 1.0, 1
    log.info("validation every %d batches (an epoch has %d; trainer.val_check_interval=auto)",
             AUTO_VALIDATION_BATCHES, batches_per_epoch)
    return AUTO_VALIDATION_BATCHES, None


def score_final_weights(trainer: L.Trainer, module: TranslationModule, datamodule, checkpoint: ModelCheckpoint,
                        out: Path) -> None:
    """Validate the final weights and keep them as best.ckpt: no run ends without a scored checkpoint."""
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    path = out / "checkpoints" / "best.ckpt"
    # set first: the checkpoint carries this callback's state, which trainer.test restores from it
    checkpoint.best_model_path, checkpoint.best_model_score = str(path), torch.tensor(metrics[MONITOR])
    trainer.save_checkpoint(path)  # every rank calls it; rank 0 writes (atomically, AtomicCheckpointIO)
    log.info("no validation during training: the final weights scored val/bleu %.2f, saved as %s",
             metrics[MONITOR], path)


def resume_path(ckpt_path: str | None, out: Path) -> str | None:
    """`last` means this run directory's last.ckpt (none yet: start fresh); a path is checked before use."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        last = out / "checkpoints" / "last.ckpt"
        if not last.exists():
            log.warning("ckpt_path=last: no %s yet, starting from scratch", last)
            return None
        ckpt_path = str(last)
    load_checkpoint(ckpt_path)  # a torn or foreign file: one line naming it, before any work
    return ckpt_path


def write_results(out: Path, module: TranslationModule, checkpoint: ModelCheckpoint,
                  throughput: TokenThroughput, validations: ValidationClock, train_time: float,
                  global_step: int) -> float:
    test = dict(module.test_results)
    hyps = test.pop("hypotheses", [])
    tgt_lang = module.text_info.tgt_lang
    write_text(out / f"test.hyp.{tgt_lang}", "".join(h + "\n" for h in hyps))
    best = checkpoint.best_model_score
    results = {**test, "val/bleu": float(best) if best is not None else None,
               "best_checkpoint": checkpoint.best_model_path or None,
               "n_params": sum(p.numel() for p in module.model.parameters()),
               "train_time_s": round(train_time, 1), "train_tokens_per_s": round(throughput.tokens_per_s, 1),
               "train_tokens": throughput.tokens, "global_step": global_step,
               "validations": validations.count, "validation_time_s": round(validations.seconds, 1)}
    if validations.count:
        log.info("validation: %d validations took %.1f s of the %.1f s of training (%.0f%%; dev decoding, scoring "
                 "and checkpoint writes)", validations.count, validations.seconds, train_time,
                 100 * validations.seconds / max(train_time, 1e-9))
    write_text(out / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")  # report's "done"
    log.info("results: %s", json.dumps({k: v for k, v in results.items() if "signature" not in k}))
    return results["val/bleu"] if results["val/bleu"] is not None else float("nan")
