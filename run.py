"""Dispatcher: `python run.py <command> [hydra overrides]`, e.g. `python run.py train experiment=smoke`."""
import functools
import json
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf.errors import OmegaConfBaseException

from seq2seq import Seq2SeqError

CONF_DIR = str(Path(__file__).resolve().parent / "conf")


def train(cfg):
    from seq2seq.train import train

    return train(cfg)


def translate(cfg):
    from seq2seq.translate import translate

    return translate(cfg)


def evaluate(cfg):
    from seq2seq.evaluate import evaluate

    return evaluate(cfg)


def average(cfg):
    from seq2seq.checkpoint import average_checkpoints

    average_checkpoints(list(cfg.ckpts), cfg.output)


def visualize(cfg):
    from seq2seq.visualize import visualize

    visualize(cfg)


def explain(cfg):
    from seq2seq.explain_page import explain

    explain(cfg)


def serve(cfg):
    from seq2seq.serve import serve

    serve(cfg)


def export(cfg):
    from seq2seq.export import export

    export(cfg)


def machine(cfg):
    from seq2seq.config import check_flag
    from seq2seq.hardware import machine_command

    check_flag("peaks", cfg.peaks)
    if cfg.ckpt is None:
        d_model = cfg.model.d_model
    else:
        from seq2seq.checkpoint import load_checkpoint

        d_model = load_checkpoint(cfg.ckpt)["seq2seq"]["model_config"]["d_model"]
    machine_command(d_model, cfg.peaks)


COMMANDS = {"train": train, "translate": translate, "evaluate": evaluate, "average": average, "visualize": visualize,
            "explain": explain, "serve": serve, "export": export, "machine": machine}


def report(argv: list[str]) -> None:
    from seq2seq.report import report

    report(argv)


PLAIN_COMMANDS = {"report": report}  # commands that take plain arguments instead of a Hydra config
FAILED_JOBS: list[str] = []  # one message per failed job of a multirun sweep


def remember_job() -> None:
    """Record this Hydra job's own overrides and directory for the DDP processes Lightning starts.

    Lightning restarts the script with the original argv (lightning#11300): under multirun that
    would be the whole sweep, in the wrong directory. The restarted ranks read this instead.
    """
    job = HydraConfig.get()
    os.environ["SEQ2SEQ_JOB"] = json.dumps({"overrides": list(job.overrides.task),
                                            "output_dir": job.runtime.output_dir})


def fit_threads() -> None:
    """No more torch threads than the CPUs this process may use (a container's quota: seq2seq/hardware.py)."""
    from seq2seq.hardware import fit_threads_to_cpu_budget

    fit_threads_to_cpu_budget()


def record_failure(message: str) -> None:
    """Leave error.txt in the job's own directory, so `run.py report` shows the run as failed."""
    job_dir = Path(HydraConfig.get().runtime.output_dir)
    if job_dir.resolve() == Path.cwd().resolve():  # translate/evaluate/...: no run directory of their own
        return
    try:
        (job_dir / "error.txt").write_text(message + "\n")
    except OSError:
        pass


def one_line_errors(task):
    """Show a Seq2SeqError (bad corpus, config, checkpoint, input) as one line and exit 1."""
    @functools.wraps(task)
    def wrapped(cfg):
        remember_job()
        fit_threads()
        try:
            return task(cfg)
        except (Seq2SeqError, OSError, OmegaConfBaseException) as e:  # OSError: a full disk (names the file)
            e = one_line(e) if isinstance(e, OmegaConfBaseException) else e  # e.g. a missing mandatory value
            record_failure(str(e))
            print(f"error: {e}", file=sys.stderr)
            if HydraConfig.get().mode != RunMode.MULTIRUN:
                sys.exit(1)
            FAILED_JOBS.append(str(e))  # let the sweep's other jobs run; exit 1 at the end
            return float("nan")
        except Exception as e:
            record_failure(f"{type(e).__name__}: {e}")
            raise
    return wrapped


FREE_TEXT_KEYS = ("text=", "target=")  # sentences: commas and quotes are text, not Hydra override syntax


def quote_free_text(arg: str) -> str:
    """`text=Hello, world.` -> `text='Hello, world.'` so Hydra takes the sentence as one string."""
    if not arg.startswith(FREE_TEXT_KEYS):
        return arg
    key, value = arg.split("=", 1)
    return f"{key}='" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def one_line(e: Exception) -> str:
    """Hydra's and OmegaConf's multi-line messages (with their cause) as one line."""
    messages = [str(e)] + ([str(e.__cause__)] if e.__cause__ and str(e.__cause__) not in str(e) else [])
    details = ("full_key:", "object_type=", "reference_type=", "Config search path:", "provider=")
    return " ".join(line.strip() for message in messages for line in message.splitlines()
                    if line.strip() and not line.strip().startswith(details))


def register_dataclass_defaults(command: str) -> None:
    """SearchConfig's defaults become Hydra's `search` config, which conf/translate.yaml, evaluate.yaml,
    visualize.yaml and serve.yaml merge at their root: the defaults live in the dataclass alone, and the
    Python API (`Translator.translate`) shares them. For `serve`, ServeLimits' become `serve_limits` the
    same way (imported only then: it brings FastAPI)."""
    from dataclasses import asdict

    from hydra.core.config_store import ConfigStore

    from seq2seq.search import SearchConfig

    ConfigStore.instance().store(name="search", node=asdict(SearchConfig()))
    if command == "serve":
        from seq2seq.serve import ServeLimits

        ConfigStore.instance().store(name="serve_limits", node=asdict(ServeLimits()))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in PLAIN_COMMANDS:
        try:
            PLAIN_COMMANDS[sys.argv[1]](sys.argv[2:])
        except Seq2SeqError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        return
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        command = sys.argv.pop(1)
        # Lightning's DDP launcher restarts this script with sys.argv as Hydra left it (no command): tell it
        os.environ["SEQ2SEQ_COMMAND"] = command
    elif os.environ.get("SEQ2SEQ_COMMAND") in COMMANDS and os.environ.get("LOCAL_RANK") and "SEQ2SEQ_JOB" in os.environ:
        command = os.environ["SEQ2SEQ_COMMAND"]  # a DDP rank > 0: rerun exactly the parent's job
        job = json.loads(os.environ["SEQ2SEQ_JOB"])
        sys.argv = [sys.argv[0], *job["overrides"], f"hydra.run.dir={job['output_dir']}", "hydra.output_subdir=null"]
    else:
        given = f"unknown command {sys.argv[1]!r}. " if len(sys.argv) > 1 else ""
        print(f"{given}usage: python run.py {{{'|'.join(COMMANDS)}}} [key=value ...]\n"
              f"       python run.py report SWEEP_DIR", file=sys.stderr)
        sys.exit(2)
    sys.argv = [quote_free_text(arg) for arg in sys.argv]
    register_dataclass_defaults(command)
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors to us instead of printing them over lines
    try:
        hydra.main(config_path=CONF_DIR, config_name=command, version_base="1.3")(one_line_errors(COMMANDS[command]))()
    except (HydraException, OmegaConfBaseException) as e:  # a misspelled key, a bad override, a missing value
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # Hydra could not create the run directory or write its config there
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if FAILED_JOBS:
        print(f"error: {len(FAILED_JOBS)} job(s) of the sweep failed (see their error.txt)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
