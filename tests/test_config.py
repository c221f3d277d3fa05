"""Every config group option composes with train.yaml and builds the objects it configures."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from seq2seq import Seq2SeqError
from seq2seq.corpora import DataConfig
from seq2seq.lit_module import OptimConfig
from seq2seq.model import ModelConfig
from seq2seq.config import build_config
from tests.conftest import CONF_DIR, compose_train, run_py

GROUP_OPTIONS = [(group.name, option.stem) for group in sorted(Path(CONF_DIR).iterdir())
                 if group.is_dir() and group.name != "hydra" for option in sorted(group.glob("[!_]*.yaml"))]


@pytest.mark.parametrize("group,option", GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_config_option_composes_and_builds(group, option, tmp_path):
    overrides = [f"{group}={option}", f"data_dir={tmp_path}", f"output_dir={tmp_path}"]
    if group == "data" and option == "files":
        overrides += [f"data.{s}_{side}=x" for s in ("train", "valid", "test") for side in ("src", "tgt")]
    if group == "data" and option == "tsv":
        overrides += ["data.train_tsv=x"]
    cfg = compose_train(overrides)
    OmegaConf.resolve(cfg)
    build_config(ModelConfig, cfg.model, "model", vocab_size=100, pad_id=0)
    build_config(DataConfig, cfg.data, "data")
    build_config(OptimConfig, cfg.optim, "optim")
    assert set(cfg.trainer) >= {"accelerator", "devices", "precision", "logger"}


def test_misspelled_model_key_is_one_line_naming_it(tmp_path):
    cfg = compose_train([f"output_dir={tmp_path}", "+model.n_head=4"])
    with pytest.raises(Seq2SeqError, match=r"unknown config key model\.n_head \(known: .*n_heads"):
        build_config(ModelConfig, cfg.model, "model", vocab_size=100, pad_id=0)


def test_heads_must_divide_d_model(tmp_path):
    cfg = compose_train([f"output_dir={tmp_path}", "model.d_model=100", "model.n_heads=3"])
    with pytest.raises(Seq2SeqError, match=r"model\.d_model=100 is not divisible by model\.n_heads=3"):
        build_config(ModelConfig, cfg.model, "model", vocab_size=100, pad_id=0)


@pytest.mark.slow
@pytest.mark.parametrize("override,names", [  # our own messages in full; Hydra's by what they must name
    ("model.d_modle=3", ["model.d_modle"]),
    ("model.d_model=abc", ["error: model.d_model='abc': expected int"]),
    ("model.dropout=1.5", ["error: bad model config: model.dropout=1.5 must be in [0, 1)"]),
    ("model=huge", ["model/huge", "base small tiny"]),
    ("optim.lr=[", ["'['"]),
    ("data.max_tokens=50",
     ["error: bad data config: data.max_tokens=50 is smaller than one sentence of data.max_len=64"]),
    ("model.max_len=64", ["error: model.max_len=64 must exceed data.max_len=64"]),
    ("patience=abc", ["error: patience='abc': expected int"]),
    ("keep_last=-1", ["error: bad run config: keep_last=-1 must not be negative"]),
    ("trainer.accelerator=mps", ["error: trainer.accelerator=mps: expected one of auto, cpu, gpu, cuda"]),
    ("+trainer.foo=1", ["error: trainer: ", "'foo'"]),  # a key Lightning's Trainer refuses
])
def test_bad_config_on_the_command_line_is_one_line_before_any_work(override, names, tmp_path):
    proc = run_py("train", "experiment=smoke", override, f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 1
    line = proc.stderr.strip()
    assert line.startswith("error: ") and len(line.splitlines()) == 1, proc.stderr
    assert all(name in line for name in names), line
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_a_gpu_the_machine_lacks_is_one_line(tmp_path):
    """trainer=gpu without a CUDA GPU, or more GPUs than there are: Lightning would stop with a traceback."""
    proc = run_py("train", "experiment=smoke", "trainer=gpu", "trainer.devices=99", f"hydra.run.dir={tmp_path}/run")
    gpus = torch.cuda.device_count()
    expected = (f"error: trainer.devices=99: only {gpus} CUDA GPU(s) here" if torch.cuda.is_available()
                else f"error: trainer.accelerator=gpu: this machine has no CUDA GPU that torch {torch.__version__} "
                     "can use; use trainer=auto or trainer=cpu")
    assert proc.returncode == 1 and proc.stderr.strip() == expected
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_missing_mandatory_value_is_one_line(tmp_path):
    proc = run_py("translate", input="")
    assert proc.returncode == 1 and proc.stderr.strip() == "error: Missing mandatory value: ckpt"
    cfg = compose_train(["data=tsv", f"data_dir={tmp_path}", f"output_dir={tmp_path}"])  # train_tsv: ???
    with pytest.raises(Seq2SeqError, match=r"^data.train_tsv is not set: give it on the command line"):
        build_config(DataConfig, cfg.data, "data")


@pytest.mark.slow
@pytest.mark.parametrize("command,override,message", [
    ("translate", "beam_size=abc", "error: beam_size='abc': expected int"),
    ("translate", "nbest=9", "error: bad search config: nbest=9 exceeds beam_size=5"),
    ("evaluate", "alpha=-1", "error: bad search config: alpha=-1 must not be negative"),
    ("visualize", "precision=fp16",
     "error: bad search config: precision=fp16: expected one of auto, 32, bf16, 16, int8"),
    ("visualize", "format=txt", "error: format='txt': expected one of files, text"),
    ("translate", "split=maybe", "error: split='maybe': expected true or false"),
])
def test_bad_search_settings_are_one_line_before_the_checkpoint_is_read(command, override, message, tmp_path):
    """The search defaults come from SearchConfig (run.py hands them to Hydra); a bad value is caught
    before any work: the checkpoint named here does not even exist."""
    extra = ["text=hello"] if command == "visualize" else []
    proc = run_py(command, f"ckpt={tmp_path}/missing.ckpt", *extra, override, input="hello\n")
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith(message) and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_task_keys_are_checked():
    from seq2seq.config import RunConfig, check_choice, check_flag

    with pytest.raises(Seq2SeqError, match="^format='txt': expected one of files, text$"):
        check_choice("format", "txt", ("files", "text"))
    with pytest.raises(Seq2SeqError, match="^split='yes': expected true or false$"):
        check_flag("split", "yes")
    check_flag("split", False)
    with pytest.raises(Seq2SeqError, match="seed='x': expected int"):
        build_config(RunConfig, {"seed": "x", "keep_last": 5, "patience": 10}, "run", top_level=True)


def test_the_slurm_launcher_preset_takes_nodes_and_gpus_from_the_trainer():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm_ddp", "trainer=ddp", "trainer.num_nodes=3",
                                          "trainer.devices=4"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (3, 4, 4)


HOUR_PRESETS = [p.stem for p in sorted((Path(CONF_DIR) / "experiment").glob("*.yaml")) if p.stem != "smoke"]


@pytest.mark.parametrize("preset", HOUR_PRESETS)
def test_the_hour_presets_are_limited_by_the_hour_alone(preset, tmp_path):
    """No epoch or step limit that a fast machine reaches first: 100 epochs of small_enja are 10,500 steps, and
    a GPU makes them well within the hour (the schedule's end, BudgetSchedule.capped, would move there too)."""
    cfg = compose_train([f"experiment={preset}", f"output_dir={tmp_path}"])
    assert cfg.trainer.max_time == "00:01:00:00"
    assert cfg.trainer.max_epochs == -1 and cfg.trainer.max_steps == -1
