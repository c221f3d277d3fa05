"""Training end to end: the loss falls, `run.py train` writes checkpoints and results, multirun works;
a non-finite loss stops it, a killed run resumes bit-exact, a full disk is one line."""
import csv
import json
import math
import os
from dataclasses import replace
from types import SimpleNamespace
import shutil
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Timer

from seq2seq import Seq2SeqError
from seq2seq.checkpoint import load_checkpoint, load_model
from seq2seq.corpora import DataConfig
from seq2seq.datamodule import TranslationDataModule
from seq2seq.lit_module import BudgetSchedule, OptimConfig, TranslationModule, ValidationClock, linear_decay
from seq2seq.model import ModelConfig, Transformer
from seq2seq.train import train
from tests.conftest import (ROOT, HostSyncs, compose_train, free_port, run_limited, run_py,
                            write_small_enja_mirror)


def test_a_few_steps_lower_the_loss(tiny_cfg):
    L.seed_everything(0)
    datamodule = TranslationDataModule(DataConfig(**tiny_cfg.data), tiny_cfg.data_dir + "/cache", seed=0)
    datamodule.setup()
    tok = datamodule.tokenizer
    model = Transformer(ModelConfig(**tiny_cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id))
    module = TranslationModule(model, tok, OptimConfig(lr=3e-3, betas=(0.9, 0.98), weight_decay=0.0,
                                                       warmup_steps=1, label_smoothing=0.0, max_warmup_share=1.0,
                                                       decay="inverse_sqrt"), None)
    batch = next(iter(datamodule.train_dataloader()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, _ = module.loss(batch, 0.0)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.5 * losses[0]


def tiny_module(tiny_cfg) -> tuple[TranslationDataModule, TranslationModule]:
    """The demo corpus's batches and a fresh tiny model to train on them."""
    datamodule = TranslationDataModule(DataConfig(**tiny_cfg.data), tiny_cfg.data_dir + "/cache", seed=0)
    datamodule.setup()
    tok = datamodule.tokenizer
    model = Transformer(ModelConfig(**tiny_cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id))
    optim = OptimConfig(lr=1e-3, betas=(0.9, 0.98), weight_decay=0.0, warmup_steps=1, label_smoothing=0.1,
                        max_warmup_share=1.0, decay="inverse_sqrt")
    return datamodule, TranslationModule(model, tok, optim, None)


def test_the_training_loss_and_its_gradients_make_no_host_sync(tiny_cfg):
    """Issue #13: on a GPU, a step that reads a value back (int(real.sum()), a boolean index h[real],
    `if not torch.isfinite(loss)`) waits for the GPU at every step. Checked on the CPU at the level of the
    aten ops the step runs; the detector itself is checked on the forms it must catch."""
    datamodule, module = tiny_module(tiny_cfg)
    model, tok, optim = module.model, module.tokenizer, module.optim
    batch = next(iter(datamodule.train_dataloader()))
    with HostSyncs() as syncs:
        loss, _ = module.loss(batch, optim.label_smoothing)
        loss.backward()
    assert syncs.seen == [] and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    real = batch["tgt_out"].ne(tok.pad_id)
    for reads_back in (lambda: int(real.sum()), lambda: batch["tgt_out"][real], lambda: bool(torch.isfinite(loss))):
        with HostSyncs() as syncs:
            reads_back()
        assert syncs.seen


@pytest.mark.slow
def test_training_on_a_gpu_reads_values_back_only_every_log_every_n_steps(tiny_cfg, tmp_path, monkeypatch):
    """Lightning's whole training loop, with the module told that reads wait for the device as on a GPU:
    the aten ops that would sync come from the finite-loss check and the loggers every log_every_n_steps
    steps, not from every step (a prog_bar metric alone is read back at every batch end)."""
    datamodule, _ = tiny_module(tiny_cfg)
    monkeypatch.setattr("seq2seq.lit_module.reading_waits", lambda value: True)
    every, seen = 10, {}
    for steps in (30, 60):
        trainer = L.Trainer(accelerator="cpu", max_steps=steps, log_every_n_steps=every, limit_val_batches=0,
                            enable_checkpointing=False, logger=L.pytorch.loggers.CSVLogger(tmp_path),
                            enable_progress_bar=True, enable_model_summary=False)
        with HostSyncs() as syncs:
            trainer.fit(tiny_module(tiny_cfg)[1], train_dataloaders=datamodule.train_dataloader())
        assert trainer.global_step == steps
        seen[steps] = syncs.seen
    # 30 more steps: the loss check and the loggers' reads at 3 more log steps (start and end add a constant)
    assert len(seen[60]) - len(seen[30]) <= 2 * 30 // every, (seen[30], seen[60])


@pytest.mark.slow
def test_validation_decodes_as_the_validation_config_says(tiny_cfg, tiny_model):
    from seq2seq.config import build_config
    from seq2seq.search import SearchConfig
    from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID

    cfg = compose_train(["model=tiny", "data=demo", "validation.beam_size=3", "+validation.max_len_b=2",
                         f"data_dir={tiny_cfg.data_dir}", "output_dir=x"])
    search = build_config(SearchConfig, cfg.validation, "validation")
    assert (search.beam_size, search.max_len_b, search.alpha) == (3, 2, SearchConfig.alpha)  # the rest: defaults
    with pytest.raises(Seq2SeqError, match="unknown config key validation.max_lenn"):
        build_config(SearchConfig, {"max_lenn": 1}, "validation")
    batch = {"src": torch.tensor([[5, 6, 7, EOS_ID]]), "tgt_in": torch.tensor([[BOS_ID, 5, 6]]),
             "tgt_out": torch.tensor([[5, 6, EOS_ID]]),
             "tgt_real": torch.arange(3), "ids": torch.tensor([0])}
    decoded = []

    class Words:
        def decode(self, hyps):
            decoded.extend(hyps)
            return [" ".join(map(str, h)) for h in hyps]

    for beam in (1, 3):
        optim = OptimConfig(lr=1e-3, betas=(0.9, 0.98), weight_decay=0.0, warmup_steps=1, label_smoothing=0.0,
                            max_warmup_share=1.0, decay="inverse_sqrt")
        module = TranslationModule(tiny_model, Words(), optim, None, search=replace(search, beam_size=beam))
        module.on_validation_epoch_start()
        with torch.no_grad():
            module.validation_step(batch, 0)
        assert len(module.hyps) == 1
    limit = int(search.max_len_a * 4 + search.max_len_b)  # a * (source length with eos) + b, b set to 2 above
    assert len(decoded) == 2 and all(0 < len([t for t in h if t not in (PAD_ID, EOS_ID)]) <= limit for h in decoded)


def test_unknown_command_lists_commands_and_exits_2():
    proc = run_py("trian")
    assert proc.returncode == 2 and "usage: python run.py {train" in proc.stderr


@pytest.mark.slow
def test_train_smoke_end_to_end_writes_checkpoints_and_results(smoke_run):
    out = smoke_run
    assert (out / "checkpoints" / "best.ckpt").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    results = json.loads((out / "results.json").read_text())
    for key in ("test/bleu", "test/chrf", "test/bleu_signature", "val/bleu", "n_params", "train_time_s",
                "train_tokens_per_s"):
        assert results[key] is not None, key
    assert "tok:ja-mecab" in results["test/bleu_signature"]
    assert results["global_step"] == 150 and results["train_tokens_per_s"] > 0
    assert results["validations"] == 2 and 0 < results["validation_time_s"] < results["train_time_s"]
    assert list((out / "csv").rglob("metrics.csv")) and list((out / "tensorboard").rglob("events.*"))
    assert len((out / "test.hyp.ja").read_text().splitlines()) == 200
    # keep_last: the weights of each validation (steps 75 and 150), for averaging
    assert sorted(p.name for p in (out / "checkpoints").glob("step*.ckpt")) == ["step000075.ckpt", "step000150.ckpt"]
    # the checkpoint is self-contained and loads with weights_only=True
    checkpoint = load_checkpoint(out / "checkpoints" / "best.ckpt")
    assert isinstance(checkpoint["seq2seq"]["spm_model"], bytes)
    model, tokenizer, info = load_model(out / "checkpoints" / "best.ckpt")
    assert info.tgt_lang == "ja" and model.cfg.vocab_size == tokenizer.vocab_size


@pytest.mark.slow
def test_resume_from_last_checkpoint_continues_the_step_count(smoke_run, tmp_path, data_dir):
    out = tmp_path / "run"
    shutil.copytree(smoke_run, out)
    proc = run_py("train", "experiment=smoke", "trainer.max_steps=170", "trainer.val_check_interval=75",
                  "trainer.enable_progress_bar=false", f"data_dir={data_dir}", f"hydra.run.dir={out}",
                  f"ckpt_path={out}/checkpoints/last.ckpt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["global_step"] == 170
    # the copied directory's own best checkpoint and its score, not the original directory's
    assert results["best_checkpoint"] == str((out / "checkpoints" / "best.ckpt").resolve())
    assert results["val/bleu"] == json.loads((smoke_run / "results.json").read_text())["val/bleu"]
    # Lightning's lines come once (through Hydra's handlers), without its advert or internal warnings
    output = proc.stdout + proc.stderr
    assert output.count("Restored all states from the checkpoint at") == 1, output[-3000:]
    assert "litlogger" not in output and "LeafSpec" not in output


@pytest.mark.slow
def test_multirun_of_two_smoke_runs_and_its_report(tmp_path, data_dir):
    proc = run_py("train", "-m", "experiment=smoke", "model.d_model=32,64", "trainer.max_steps=20",
                  "trainer.val_check_interval=10", "trainer.enable_progress_bar=false", f"data_dir={data_dir}",
                  f"hydra.sweep.dir={tmp_path}/sweep")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / "sweep" / str(i) / "results.json").read_text()) for i in (0, 1)]
    assert results[0]["n_params"] < results[1]["n_params"]
    report = run_py("report", f"{tmp_path}/sweep")
    assert report.returncode == 0, report.stderr
    lines = report.stdout.splitlines()
    assert lines[0] == ("| job | model.d_model | val/bleu | test/bleu | test/chrf | n_params | train_time_s "
                        "| status |")
    rows = [line.split(" | ") for line in lines[2:]]
    assert sorted(r[1] for r in rows) == ["32", "64"] and all(r[-1] == "done |" for r in rows)
    bleus = [float(r[2]) for r in rows]
    assert bleus == sorted(bleus, reverse=True)
    assert (tmp_path / "sweep" / "report.csv").exists() and (tmp_path / "sweep" / "learning_curves.png").exists()
    assert (tmp_path / "sweep" / "bleu_vs_model.d_model.png").exists()


@pytest.mark.slow
def test_a_failed_sweep_job_does_not_stop_the_others_and_shows_in_the_report(tmp_path, data_dir):
    proc = run_py("train", "-m", "experiment=smoke", "model.n_heads=3,4", "trainer.max_steps=5",
                  "trainer.val_check_interval=5", "trainer.enable_progress_bar=false", f"data_dir={data_dir}",
                  f"hydra.sweep.dir={tmp_path}/sweep")
    assert proc.returncode == 1
    assert "error: bad model config: model.d_model=64 is not divisible by model.n_heads=3" in proc.stderr
    assert (tmp_path / "sweep" / "1" / "results.json").exists()
    report = run_py("report", f"{tmp_path}/sweep").stdout.splitlines()
    assert report[2].startswith("| 1 | 4 |") and report[3].startswith("| 0 | 3 |")
    assert "failed: bad model config" in report[3]


@pytest.mark.slow
def test_smoke_run_learns_the_demo_task(tmp_path, data_dir):
    """A tiny model must learn the template grammar: a BLEU that guessing cannot reach."""
    out = tmp_path / "run"
    proc = run_py("train", "experiment=smoke", "trainer.enable_progress_bar=false", f"data_dir={data_dir}",
                  f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["test/bleu"] > 60, results


@pytest.mark.slow
def test_ddp_on_cpu_with_two_processes(tmp_path, data_dir):
    """trainer=ddp with gloo: Lightning restarts run.py for rank 1, which must find its command again."""
    out = tmp_path / "run"
    proc = run_py("train", "experiment=smoke", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                  "trainer.precision=32", "trainer.max_steps=20", "trainer.val_check_interval=10",
                  "trainer.enable_progress_bar=false", f"data_dir={data_dir}", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output
    assert json.loads((out / "results.json").read_text())["global_step"] == 20
    # each rank decoded half of the test batches; gathered, every sentence has its translation, in order
    n_test = len((data_dir / "demo" / "test.en").read_text().splitlines())
    assert len((out / "test.hyp.ja").read_text().splitlines()) == n_test
    assert output.count("[seq2seq.train][INFO] - results: {") == 1  # rank 0 alone reports
    assert output.count("[seq2seq.train][INFO] - machine: ") == 1  # and alone logs progress (quiet_other_ranks)
    assert output.count("[seq2seq.datamodule][INFO] - corpus demo") == 1


@pytest.mark.slow
def test_two_nodes_on_loopback_train_as_one_process_accumulating_two_batches(tmp_path, data_dir):
    """trainer.num_nodes=2, one process per "node", started as a cluster would start them: gloo over
    loopback, with Lightning's own environment variables (MASTER_ADDR, MASTER_PORT, NODE_RANK, LOCAL_RANK).
    Rank r trains on batches r, r + 2, ... and DDP averages the two gradients; one process accumulating
    2 batches per step averages the same two. With dropout off (each process draws its own masks) the
    two runs end at the same loss."""
    common = ["experiment=smoke", "trainer.accelerator=cpu", "trainer.precision=32", "trainer.max_steps=10",
              "trainer.val_check_interval=1000", "model.dropout=0", "keep_last=0", "trainer.enable_progress_bar=false",
              f"data_dir={data_dir}"]
    run_py("train", *common, "trainer.max_steps=1", f"hydra.run.dir={tmp_path}/prepare")  # the data cache, once
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "LOCAL_RANK": "0"}
    nodes = [subprocess.Popen([sys.executable, "run.py", "train", *common, "trainer=ddp", "trainer.devices=1",
                               "trainer.num_nodes=2", f"hydra.run.dir={tmp_path}/nodes"], cwd=ROOT,  # one shared dir
                              env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=900)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[1][-3000:] + outputs[0][-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    single = run_py("train", *common, "trainer.accumulate_grad_batches=2", f"hydra.run.dir={tmp_path}/single")
    assert single.returncode == 0, single.stderr[-3000:]
    two_nodes, one = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("nodes", "single"))
    assert two_nodes["global_step"] == one["global_step"] == 10
    assert abs(two_nodes["test/loss"] - one["test/loss"]) < 1e-4, (two_nodes["test/loss"], one["test/loss"])
    assert sum("[seq2seq.train][INFO] - results: {" in output for output in outputs) == 1  # rank 0 alone reports
    half = run_py("train", *common, f"hydra.run.dir={tmp_path}/half")  # one batch a step: not the same training
    assert half.returncode == 0, half.stderr[-3000:]
    assert abs(json.loads((tmp_path / "half" / "results.json").read_text())["test/loss"] - one["test/loss"]) > 1e-3


@pytest.mark.slow
def test_multirun_with_ddp(tmp_path, data_dir):
    """Each sweep job's DDP ranks train that job, in its directory (not the whole sweep again)."""
    proc = run_py("train", "-m", "experiment=smoke", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                  "trainer.precision=32", "trainer.max_steps=10", "trainer.val_check_interval=10",
                  "trainer.enable_progress_bar=false", "model.d_model=32,64", f"data_dir={data_dir}",
                  f"hydra.sweep.dir={tmp_path}/sweep")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / "sweep" / str(i) / "results.json").read_text()) for i in (0, 1)]
    assert results[0]["n_params"] < results[1]["n_params"]
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["0", "1"]


@pytest.mark.slow
def test_every_experiment_preset_runs_one_step_under_multirun(tmp_path, data_dir):
    write_small_enja_mirror(tmp_path / "mirror")
    tatoeba = data_dir / "tatoeba"  # the Tatoeba presets find their pairs in place and fetch nothing
    tatoeba.mkdir(exist_ok=True)
    (tatoeba / "pairs.tsv").write_text("".join(f"Sentence {i}.\t文{i}です。\n" for i in range(3000)))
    proc = run_py("train", "-m", "experiment=glob(*)", "trainer=debug", "model=tiny", "data.vocab_size=400",
                  f"++data.url={tmp_path}/mirror", f"++data.parts.small_enja.url={tmp_path}/mirror",
                  f"data_dir={data_dir}", f"hydra.sweep.dir={tmp_path}/sweep")
    assert proc.returncode == 0, proc.stderr[-3000:]
    presets = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
    assert len(list((tmp_path / "sweep").glob("*/results.json"))) == len(presets) >= 5


@pytest.mark.slow
def test_joblib_launcher_and_optuna_search(tmp_path, data_dir):
    """The parallel local launcher and the Optuna search both drive `train` (pip install -e .[sweep])."""
    common = ["experiment=smoke", "trainer.max_steps=10", "trainer.val_check_interval=10",
              "trainer.enable_progress_bar=false", f"data_dir={data_dir}"]
    proc = run_py("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "model.d_model=32,64", *common,
                  f"hydra.sweep.dir={tmp_path}/joblib")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "joblib").glob("*/results.json"))) == 2
    proc = run_py("train", "hparams_search=optuna", "hydra.sweeper.n_trials=2", *common,
                  f"hydra.sweep.dir={tmp_path}/optuna")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "optuna").glob("*/results.json"))) == 2
    assert "best_value" in (tmp_path / "optuna" / "optimization_results.yaml").read_text()


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradients_are_clipped_with_the_fused_optimizer(algorithm):
    """Lightning will not clip for a fused optimizer under bf16-mixed; the module clips itself."""
    model = Transformer(ModelConfig(vocab_size=50, pad_id=0, d_model=16, n_heads=2, d_ff=32, n_enc_layers=1,
                                    n_dec_layers=1, dropout=0.0, pre_norm=True, max_len=16))
    optim = OptimConfig(lr=1e-3, betas=(0.9, 0.98), weight_decay=0.0, warmup_steps=1, label_smoothing=0.0,
                        max_warmup_share=1.0, decay="inverse_sqrt")
    module = TranslationModule(model, None, optim, None)
    optimizer = module.configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"]
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    module.configure_gradient_clipping(optimizer, 0.5, algorithm)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    if algorithm == "norm":
        torch.testing.assert_close(grads.norm(), torch.tensor(0.5))
    else:
        assert torch.equal(grads, torch.full_like(grads, 0.5))


def test_linear_decay_warms_up_then_reaches_zero_at_the_last_step():
    factors = [linear_decay(step, warmup_steps=10, total_steps=110) for step in range(1, 121)]
    assert factors[:10] == pytest.approx([s / 10 for s in range(1, 11)])  # warmup to 1 at step 10
    assert all(a > b for a, b in zip(factors[9:109], factors[10:110]))  # then strictly down ...
    assert factors[59] == pytest.approx(0.5) and factors[109] == 0.0 and set(factors[110:]) == {0.0}  # ... to 0
    assert linear_decay(500, warmup_steps=10, total_steps=None) == 1.0  # the end not known yet: held at the peak


def schedule_module(decay: str) -> TranslationModule:
    model = Transformer(ModelConfig(vocab_size=50, pad_id=0, d_model=16, n_heads=2, d_ff=32, n_enc_layers=1,
                                    n_dec_layers=1, dropout=0.0, pre_norm=True, max_len=16))
    return TranslationModule(model, None, OptimConfig(lr=1e-3, betas=(0.9, 0.98), weight_decay=0.0, warmup_steps=100,
                                                      label_smoothing=0.0, max_warmup_share=0.2, decay=decay), None)


@pytest.mark.parametrize("decay", ["inverse_sqrt", "linear"])
def test_the_time_budget_fits_the_schedule_to_the_steps_it_buys(decay):
    """30 probe steps of 1 s with 270 s left: 300 steps in all, so a 60-step warmup (20%); for decay=linear
    the end at step 300, moved after a validation to what the time left buys at the speed so far."""
    module, timer = schedule_module(decay), Timer(duration="00:00:10:00")
    trainer = SimpleNamespace(callbacks=[timer], global_step=0, estimated_stepping_batches=math.inf,
                              sanity_checking=False, strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj))
    timer.time_remaining = lambda: 270.0
    budget = BudgetSchedule(max_share=0.2, probe_steps=30)
    for step in range(1, 31):
        trainer.global_step = step
        budget.seconds += 1.0
        budget.start = time.perf_counter()
        budget.on_train_batch_end(trainer, module, None, None, step)
    assert module.warmup_steps == 60
    assert module.total_steps == (300 if decay == "linear" else None)
    trainer.global_step, timer.time_elapsed, timer.time_remaining = 100, lambda stage: 200.0, lambda: 100.0
    budget.on_validation_end(trainer, module)  # 2 s a step with validation: 50 steps more
    assert module.total_steps == (150 if decay == "linear" else None)
    trainer.estimated_stepping_batches = 120  # a step or epoch limit that comes first ends the decay there
    budget.on_validation_end(trainer, module)
    assert module.total_steps == (120 if decay == "linear" else None)


@pytest.mark.parametrize("elapsed, steps, warmup", [
    (160.0, 75, 41),  # 4 s a step since the probe's 1 s (throttled, or other jobs): 75 steps in all; ends next step
    (32.5, 369, 74),  # faster than the probe's first steps: 369 steps in all, 20% of them
])
def test_a_validation_during_the_warmup_refits_it_to_the_speed_since(elapsed, steps, warmup):
    """The probe (30 steps of 1 s, 270 s left) sets a 60-step warmup; at a validation at step 40 the time
    spent says the budget buys `steps` in all: the warmup becomes 20% of them (at least to the next step,
    at most optim.warmup_steps=100), and a validation after the warmup changes it no more."""
    module, timer = schedule_module("inverse_sqrt"), Timer(duration="00:00:10:00")
    trainer = SimpleNamespace(callbacks=[timer], global_step=0, estimated_stepping_batches=math.inf,
                              sanity_checking=False, strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj))
    timer.time_remaining = lambda: 270.0
    budget = BudgetSchedule(max_share=0.2, probe_steps=30)
    budget.seconds, budget.start, trainer.global_step = 30.0, time.perf_counter(), 30  # 30 steps of 1 s
    budget.on_train_batch_end(trainer, module, None, None, 30)
    assert module.warmup_steps == 60
    trainer.global_step, timer.time_elapsed, timer.time_remaining = 40, lambda stage: elapsed, lambda: 300.0 - elapsed
    budget.on_validation_end(trainer, module)
    assert round(40 + (300.0 - elapsed) / (elapsed / 40)) == steps and module.warmup_steps == warmup
    trainer.global_step, timer.time_elapsed, timer.time_remaining = warmup + 10, lambda stage: 290.0, lambda: 10.0
    budget.on_validation_end(trainer, module)
    assert module.warmup_steps == warmup


def test_the_validation_clock_runs_from_each_validation_during_fit_until_training_resumes(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    clock = ValidationClock()

    def validation(fn, sanity=False, seconds=0.0, then="batch"):
        trainer = SimpleNamespace(sanity_checking=sanity, state=SimpleNamespace(fn=fn))
        clock.on_validation_start(trainer, None)
        now[0] += seconds  # decoding, scoring, checkpoints
        clock.on_train_batch_start(trainer, None, None, 0) if then == "batch" else clock.on_train_end(trainer, None)
        now[0] += 100.0  # training steps

    validation("fit", sanity=True, seconds=1.0)  # Lightning's sanity check: not a validation of the run
    validation("fit", seconds=2.0)
    validation("validate", seconds=4.0)  # trainer.validate() after fit (score_final_weights)
    validation("fit", seconds=3.0, then="end")  # the last one: early stopping ended training
    assert (clock.count, clock.seconds) == (2, 5.0)


def test_linear_decay_without_an_end_is_a_config_error(tmp_path, data_dir):
    cfg = compose_train(["experiment=smoke", "optim.decay=linear", "trainer.max_steps=-1", f"data_dir={data_dir}",
                         f"output_dir={tmp_path}"])
    with pytest.raises(Seq2SeqError, match="optim.decay=linear .* give trainer.max_steps or trainer.max_time"):
        train(cfg)
    cfg = compose_train(["experiment=smoke", "optim.decay=cosine", f"data_dir={data_dir}", f"output_dir={tmp_path}"])
    with pytest.raises(Seq2SeqError, match="decay='cosine': expected one of inverse_sqrt, linear"):
        train(cfg)


@pytest.mark.slow
def test_under_a_time_budget_an_epoch_limit_that_comes_first_ends_the_linear_decay(tmp_path, data_dir):
    """A real run: 3 epochs of the demo corpus end it long before its 60 s would; the learning rate reaches zero
    at that last step, as logged at each validation, not at the step the time would have bought."""
    proc = run_py("train", "experiment=smoke", f"data_dir={data_dir}", f"hydra.run.dir={tmp_path}",
                  "trainer.max_steps=-1",
                  "trainer.max_time=00:00:01:00", "trainer.max_epochs=3", "optim.decay=linear",
                  "trainer.val_check_interval=40", "trainer.enable_progress_bar=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    last_step = json.loads((tmp_path / "results.json").read_text())["global_step"]
    ends = [int(line.rsplit(" ", 1)[1]) for line in (proc.stdout + proc.stderr).splitlines()
            if "the learning rate reaches zero at step" in line]
    assert len(ends) >= 3 and set(ends) == {last_step}, (ends, last_step)
    with open(next((tmp_path / "csv").glob("*/metrics.csv"))) as f:
        logged = [(int(row["step"]), float(row["lr-AdamW/pg1"])) for row in csv.DictReader(f) if row["lr-AdamW/pg1"]]
    step, lr = logged[-1]
    warmup, peak = 100, 3e-3  # experiment=smoke's
    assert lr == pytest.approx(peak * (last_step - step) / (last_step - warmup), abs=0.02 * peak)  # a line to zero


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_checkpoints(tmp_path, data_dir, monkeypatch):
    cfg = compose_train(["experiment=smoke", f"data_dir={data_dir}", f"output_dir={tmp_path}",
                         "trainer.max_steps=60", "trainer.val_check_interval=20", "trainer.enable_progress_bar=false"])
    real_loss = TranslationModule.loss

    def poisoned(self, batch, label_smoothing):
        loss, n = real_loss(self, batch, label_smoothing)
        return (loss * float("nan") if self.training and self.global_step >= 30 else loss), n

    monkeypatch.setattr(TranslationModule, "loss", poisoned)
    with pytest.raises(Seq2SeqError, match="non-finite training loss at step 30 "):
        train(cfg)
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 20
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values())


def last_validation(run_dir) -> tuple[int, float]:
    """(step, val/loss) of the last validation in the newest CSV log of a run."""
    newest = max((run_dir / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    rows = [r for r in csv.DictReader(open(newest / "metrics.csv")) if r.get("val/loss")]
    return int(rows[-1]["step"]), float(rows[-1]["val/loss"])


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_validation_loss(tmp_path, data_dir):
    """SIGKILL mid-epoch, rerun with ckpt_path=last: the run ends at the same step with the same
    validation loss as an uninterrupted run. Weights, optimizer, LR schedule, data position and the
    dropout RNG all come back, and CPU kernels with the same thread count are deterministic, so the
    two losses are equal; the 1e-6 relative tolerance only allows for printing/parsing the CSV."""


    args = ["train", "experiment=smoke", "trainer.precision=32", "trainer.max_steps=75",
            "trainer.val_check_interval=25", "trainer.enable_progress_bar=false", f"data_dir={data_dir}"]
    straight = run_py(*args, f"hydra.run.dir={tmp_path}/a")
    assert straight.returncode == 0, straight.stderr[-2000:]

    proc = subprocess.Popen([sys.executable, "run.py", *args, f"hydra.run.dir={tmp_path}/b"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "b" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:  # the first validation's checkpoint
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(last)["global_step"]
    assert 25 <= killed_at < 75

    resumed = run_py(*args, f"hydra.run.dir={tmp_path}/b", "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    step_a, loss_a = last_validation(tmp_path / "a")
    step_b, loss_b = last_validation(tmp_path / "b")
    assert step_a == step_b == 74
    assert loss_a == pytest.approx(loss_b, rel=1e-6), (loss_a, loss_b, killed_at)


@pytest.mark.slow
def test_train_on_a_full_disk_or_an_unwritable_run_dir_is_one_line(tmp_path, data_dir):
    args = ["train", "experiment=smoke", "trainer.max_steps=30", "trainer.val_check_interval=20",
            "trainer.enable_progress_bar=false", f"data_dir={data_dir}"]
    corpus = {p: p.read_bytes() for p in (data_dir / "demo").iterdir() if p.is_file()}
    proc = run_limited([*args, f"hydra.run.dir={tmp_path}/run"], 200_000)  # logs fit, checkpoints do not
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path}/run/checkpoints/") and "cannot write" in last, last
    assert not list((tmp_path / "run" / "checkpoints").glob("*"))  # no torn checkpoint
    assert {p: p.read_bytes() for p in (data_dir / "demo").iterdir() if p.is_file()} == corpus

    (tmp_path / "a_file").write_text("")
    proc = run_py(*args, f"hydra.run.dir={tmp_path}/a_file/run")
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: [Errno 20] Not a directory: '{tmp_path}/a_file/run'"


@pytest.mark.slow
def test_a_run_that_ends_before_its_first_validation_still_scores_and_keeps_a_checkpoint(tmp_path, data_dir):
    """max_steps inside the first epoch with validation once per epoch: validated at the end, best.ckpt kept."""
    proc = run_py("train", "experiment=smoke", "trainer.max_steps=20", "trainer.val_check_interval=1.0",
                  "trainer.check_val_every_n_epoch=1", "trainer.enable_progress_bar=false", f"data_dir={data_dir}",
                  f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["val/bleu"] is not None and results["best_checkpoint"] == str(tmp_path / "checkpoints" / "best.ckpt")
    assert load_checkpoint(tmp_path / "checkpoints" / "best.ckpt")["global_step"] == 20


def test_automatic_validation_interval_is_each_epoch_or_every_2000_batches_of_a_long_one():
    from seq2seq.train import validation_interval

    assert validation_interval(350) == (1.0, 1)  # small_parallel_enja: ~350 batches an epoch
    assert validation_interval(2000) == (1.0, 1)
    assert validation_interval(26_000) == (2000, None)  # 4M pairs: the first score after 2,000, not 26,000
