"""TranslationModule: label-smoothed loss, AdamW with warmup then inverse-sqrt or linear decay, and validation
decoding with BLEU/chrF logging. Holds no model code: the model is the plain Transformer.
"""
import logging
import math
import time
from dataclasses import asdict, dataclass

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer

from seq2seq import Seq2SeqError
from seq2seq.checkpoint import TextInfo
from seq2seq.loss import projection_cross_entropy
from seq2seq.metrics import corpus_scores
from seq2seq.model import Transformer
from seq2seq.search import SearchConfig, search_batch
from seq2seq.tokenizer import Tokenizer

MONITOR = "val/bleu"  # the checkpoint callback and early stopping watch this
SPLIT_OF_STAGE = {"val": "valid", "test": "test"}
log = logging.getLogger(__name__)


DECAYS = ("inverse_sqrt", "linear")  # optim.decay: the learning rate after the warmup


@dataclass
class OptimConfig:
    lr: float  # peak learning rate, reached after warmup_steps
    betas: tuple[float, float]
    weight_decay: float
    warmup_steps: int
    label_smoothing: float
    max_warmup_share: float  # with trainer.max_time: warmup takes at most this share of the steps the time buys
    decay: str  # after the warmup: inverse_sqrt, or linear (to zero at the last step)

    def __post_init__(self):
        if self.decay not in DECAYS:
            raise ValueError(f"decay={self.decay!r}: expected one of {', '.join(DECAYS)}")


def inverse_sqrt(step: int, warmup_steps: int) -> float:
    """LR multiplier: linear warmup to 1 at warmup_steps, then decay by sqrt(warmup_steps / step)."""
    step = max(step, 1)
    return min(step / warmup_steps, math.sqrt(warmup_steps / step))


def linear_decay(step: int, warmup_steps: int, total_steps: int | None) -> float:
    """LR multiplier: linear warmup to 1 at warmup_steps, then linear decay to 0 at total_steps (None: not
    known yet, held at 1). A fixed budget of steps is spent best this way (Li et al., 2020, "Budgeted
    training"): the weights settle as the learning rate reaches zero, where inverse-sqrt leaves them moving."""
    step = max(step, 1)
    if step < warmup_steps or total_steps is None:
        return min(step / warmup_steps, 1.0)
    return max(0.0, (total_steps - step) / max(total_steps - warmup_steps, 1))


def reading_waits(value: torch.Tensor) -> bool:
    """Does reading `value` on the host wait for its device? On a GPU it waits for every kernel queued
    before it, so the CPU stops running ahead (one such read per step idles the GPU at each step's start)."""
    return value.device.type != "cpu"


class TranslationModule(L.LightningModule):
    """Trains `model`; validation and test decode greedily and score against the cleaned references."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, optim: OptimConfig, text_info: TextInfo | None,
                 references: dict[str, list[str]] | None = None, search: SearchConfig | None = None):
        super().__init__()
        self.model, self.tokenizer, self.optim = model, tokenizer, optim
        self.text_info = text_info  # direction, cleaning, BLEU tokenization: saved in checkpoints
        self.references = references or {}  # {"valid": lines, "test": lines}: the cleaned BLEU references
        self.search = search or SearchConfig(beam_size=1)  # how validation and test decode (train.yaml: validation)
        self.hyps: list[tuple[int, str]] = []
        self.loss_sum, self.token_count = 0.0, 0
        self.test_results: dict = {}
        self.warmup_steps = optim.warmup_steps  # BudgetSchedule may shorten it; saved in checkpoints
        self.total_steps: int | None = None  # where decay=linear reaches zero: trainer.max_steps, or BudgetSchedule's
        self.finite: torch.Tensor | None = None  # were all training losses so far finite? (on the device)

    def loss(self, batch: dict, label_smoothing: float) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy over the real target tokens (padding never reaches the output layer)."""
        src, tgt_out = batch["src"], batch["tgt_out"]
        src_pad_mask = self.model.pad_mask(src)
        h = self.model.decode(batch["tgt_in"], self.model.encode(src, src_pad_mask), src_pad_mask)  # (B, T, D)
        # only the N real target positions reach the output layer; collate listed them, so that picking
        # them needs no device-to-host sync (a boolean index would wait for the GPU to count them)
        real = batch["tgt_real"]  # (N,) positions in the flattened (B*T) target
        loss = projection_cross_entropy(h.flatten(0, 1).index_select(0, real), self.model.embed.weight,
                                        tgt_out.flatten().index_select(0, real), label_smoothing)
        return loss, len(real)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, n_tokens = self.loss(batch, self.optim.label_smoothing)
        self.finite = torch.isfinite(loss) if self.finite is None else self.finite & torch.isfinite(loss)
        # On a CPU, stop before the optimizer step spreads a non-finite loss into the weights. On a GPU,
        # reading the flag waits for the step to finish: read it every log_every_n_steps steps and before
        # each validation (so that no checkpoint is written from such weights).
        waits = reading_waits(loss)
        if not waits or self.global_step % self.trainer.log_every_n_steps == 0:
            self.stop_unless_finite()
        # Lightning reads every prog_bar value back at the end of every batch, shown or not: on a GPU the
        # loss goes to the loggers alone (every log_every_n_steps steps)
        self.log("train/loss", loss, prog_bar=not waits, batch_size=n_tokens)
        return loss

    def stop_unless_finite(self) -> None:
        if self.finite is not None and not bool(self.finite):
            raise Seq2SeqError(f"non-finite training loss at step {self.global_step} or shortly before; stopped. "
                               "Checkpoints written so far are intact; lower optim.lr or check the data")

    def on_validation_epoch_start(self) -> None:
        self.stop_unless_finite()
        self.hyps, self.loss_sum, self.token_count = [], 0.0, 0

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, n_tokens = self.loss(batch, label_smoothing=0.0)  # plain NLL, so exp(loss) is perplexity
        self.loss_sum += float(loss) * n_tokens
        self.token_count += n_tokens
        src = batch["src"]
        hyps = [nbest[0][0] for nbest in search_batch(self.model, src, self.search, scores=False)]
        self.hyps.extend(zip(batch["ids"].tolist(), self.tokenizer.decode(hyps)))

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        self.log_scores("val")

    def on_test_epoch_end(self) -> None:
        self.test_results = self.log_scores("test")

    def gather_ranks(self) -> None:
        """Under DDP each rank decoded its share of the dev/test batches: every rank gets all of them."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        shares = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(shares, (self.hyps, self.loss_sum, self.token_count))
        self.hyps = [pair for hyps, _, _ in shares for pair in hyps]
        self.loss_sum, self.token_count = sum(s[1] for s in shares), sum(s[2] for s in shares)

    def log_scores(self, stage: str) -> dict:
        """Loss, perplexity, BLEU and chrF over what this epoch decoded (all of it, or a sanity-check slice)."""
        self.gather_ranks()
        self.hyps.sort()
        refs = self.references[SPLIT_OF_STAGE[stage]]
        hyps = [h for _, h in self.hyps]
        scores = corpus_scores(hyps, [refs[i] for i, _ in self.hyps], self.text_info.bleu_tokenize)
        loss = self.loss_sum / max(self.token_count, 1)
        metrics = {f"{stage}/loss": loss, f"{stage}/ppl": math.exp(min(loss, 50)),
                   f"{stage}/bleu": scores["bleu"], f"{stage}/chrf": scores["chrf"]}
        self.log_dict(metrics, prog_bar=stage == "val")
        return {**metrics, f"{stage}/bleu_signature": scores["bleu_signature"],
                f"{stage}/chrf_signature": scores["chrf_signature"], "hypotheses": hyps}

    def configure_optimizers(self):
        # no weight decay on biases and LayerNorm gains (the 1-D parameters)
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": self.optim.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=self.optim.lr, betas=tuple(self.optim.betas), fused=self.fused_adamw)
        if self.optim.decay == "linear" and self.total_steps is None and self._trainer is not None \
                and self._trainer.max_steps > 0:
            self.total_steps = self._trainer.max_steps  # under trainer.max_time, BudgetSchedule may end it sooner
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_factor(self, step: int) -> float:
        """The schedule's multiplier of optim.lr at `step` (read each step: BudgetSchedule may change it)."""
        if self.optim.decay == "linear":
            return linear_decay(step, self.warmup_steps, self.total_steps)
        return inverse_sqrt(step, self.warmup_steps)

    @property
    def fused_adamw(self) -> bool:
        """AdamW as one fused kernel over all parameters (CPU: 26 -> 5 ms a step for model=small), except
        under a float16 gradient scaler, which unscales inside a fused step and so rules out clipping."""
        precision = str(self._trainer.precision) if self._trainer is not None else ""
        return self.device.type in ("cpu", "cuda") and not precision.startswith("16")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning's mixed-precision plugin refuses to clip for any fused optimizer, because under a float16
        # scaler the gradients would still be scaled here. With bf16 there is no scaler: clip as it would.
        if gradient_clip_val and optimizer.defaults.get("fused"):
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Make the checkpoint self-contained: `translate` needs nothing but this file."""
        checkpoint["seq2seq"] = {"model_config": asdict(self.model.cfg),
                                 "spm_model": self.tokenizer.model_proto,
                                 "data": asdict(self.text_info)}
        checkpoint["torch_rng_state"] = torch.get_rng_state()  # dropout masks continue as if never stopped
        if self.device.type == "cuda":
            checkpoint["cuda_rng_state"] = torch.cuda.get_rng_state(self.device)
        checkpoint["warmup_steps"] = self.warmup_steps
        checkpoint["total_steps"] = self.total_steps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])
        if "cuda_rng_state" in checkpoint and torch.cuda.is_available():
            torch.cuda.set_rng_state(checkpoint["cuda_rng_state"].cpu())  # the current device: this rank's GPU
        self.warmup_steps = checkpoint.get("warmup_steps", self.warmup_steps)
        self.total_steps = checkpoint.get("total_steps", self.total_steps)


class TokenThroughput(L.Callback):
    """Real (non-pad) source+target tokens per second of training steps; logged as train/tokens_per_s."""

    def __init__(self):
        self.tokens, self.seconds, self.start = 0, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds += time.perf_counter() - self.start
        self.tokens += batch["n_tokens"]
        pl_module.log("train/tokens_per_s", self.tokens_per_s, batch_size=1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


class ValidationClock(L.Callback):
    """Seconds that validations take during training, each from its start until training resumes (the next
    batch, or the end of training): decoding dev, scoring it and writing the checkpoints. A run's share of
    them says whether validating every epoch suits this machine: 4% of small_enja's epoch on a 2-core CPU,
    more wherever steps are fast and the validation's greedy decoding and checkpoint writes are not."""

    def __init__(self):
        self.seconds, self.count, self.start = 0.0, 0, None

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":  # not trainer.validate()
            self.start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.stop()

    def on_train_end(self, trainer, pl_module) -> None:
        self.stop()

    def stop(self) -> None:
        if self.start is not None:
            self.seconds += time.perf_counter() - self.start
            self.count += 1
            self.start = None


class BudgetSchedule(L.Callback):
    """Under a time budget (trainer.max_time), fit the learning-rate schedule to the steps the budget buys:
    the warmup is cut to `optim.max_warmup_share` of them, estimated from the speed of the first
    `probe_steps` steps; with decay=linear, the decay ends at the budget's last step. Both are re-estimated
    after each validation from the time spent so far (validation included) and the time left, the warmup
    while it lasts: a machine whose speed changes after the probe (a laptop that throttles once warm, other
    jobs on a shared server) keeps its warmup near the share, where the probe alone made it 39% of the
    steps in a run slowed by other work after its probe.

    Why: a schedule fixed in steps suits one machine. The 60-minute en->ja recipe's 1,000 warmup steps were
    18% of the 5,495 steps an AMX CPU makes in the hour, and 93% of the 1,071 an AVX2 CPU makes in fp32.
    The module saves warmup_steps and total_steps in checkpoints, so a resumed run continues the same schedule.
    """

    def __init__(self, max_share: float, probe_steps: int = 30):
        self.max_share, self.probe_steps = max_share, probe_steps
        self.seconds, self.start = 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds += time.perf_counter() - self.start
        if trainer.global_step != self.probe_steps:
            return
        steps = self.probe_steps + self.timer(trainer).time_remaining() / (self.seconds / self.probe_steps)
        steps = trainer.strategy.broadcast(steps)  # rank 0's clock: under DDP every rank keeps one schedule
        warmup = max(1, min(pl_module.warmup_steps, round(self.max_share * steps)))
        log.info("the time budget buys about %d steps at %.2f s/step: warmup %d steps (optim.warmup_steps=%d)",
                 steps, self.seconds / self.probe_steps, warmup, pl_module.warmup_steps)
        pl_module.warmup_steps = warmup
        if pl_module.optim.decay == "linear":
            pl_module.total_steps = self.capped(trainer, round(steps))

    def on_validation_end(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if trainer.sanity_checking or step <= self.probe_steps:
            return
        timer = self.timer(trainer)
        per_step = timer.time_elapsed("train") / step  # validation's share of the time included
        steps = trainer.strategy.broadcast(round(step + timer.time_remaining() / per_step))  # rank 0's clock
        if step < pl_module.warmup_steps:
            self.refit_warmup(step, steps, pl_module)
        if pl_module.optim.decay == "linear":
            pl_module.total_steps = self.capped(trainer, max(step + 1, steps))
            log.info("step %d: the time left buys about %d steps more; the learning rate reaches zero at step %d",
                     step, pl_module.total_steps - step, pl_module.total_steps)

    def refit_warmup(self, step: int, steps: int, pl_module) -> None:
        """Still warming up at `step`, with about `steps` in all now: the warmup becomes max_share of them
        (at most optim.warmup_steps; ending at the next step at the earliest)."""
        warmup = max(step + 1, min(pl_module.optim.warmup_steps, round(self.max_share * steps)))
        if warmup != pl_module.warmup_steps:
            log.info("step %d: the time budget now buys about %d steps: warmup %d steps (was %d)",
                     step, steps, warmup, pl_module.warmup_steps)
            pl_module.warmup_steps = warmup

    @staticmethod
    def capped(trainer, steps: int) -> int:
        """The step limits (trainer.max_steps, or trainer.max_epochs times the batches an epoch has) end the run
        first where they come before the time does."""
        limit = trainer.estimated_stepping_batches  # inf where neither limits the run
        return steps if math.isinf(limit) else min(steps, int(limit))

    @staticmethod
    def timer(trainer) -> Timer:
        return next(c for c in trainer.callbacks if isinstance(c, Timer))
