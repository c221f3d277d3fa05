"""Dispatcher: `python run.py <command> [hydra overrides]`, e.g. `python run.py train experiment=smoke`."""
import functools
import sys
from pathlib import Path

import hydra

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


COMMANDS = {"train": train, "translate": translate, "evaluate": evaluate, "average": average, "visualize": visualize}


def one_line_errors(task):
    """Show a Seq2SeqError (bad corpus, config, checkpoint, input) as one line and exit 1."""
    @functools.wraps(task)
    def wrapped(cfg):
        try:
            return task(cfg)
        except Seq2SeqError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
    return wrapped


FREE_TEXT_KEYS = ("text=", "target=")  # sentences: commas and quotes are text, not Hydra override syntax


def quote_free_text(arg: str) -> str:
    """`text=Hello, world.` -> `text='Hello, world.'` so Hydra takes the sentence as one string."""
    if not arg.startswith(FREE_TEXT_KEYS):
        return arg
    key, value = arg.split("=", 1)
    return f"{key}='" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        given = f"unknown command {sys.argv[1]!r}. " if len(sys.argv) > 1 else ""
        print(f"{given}usage: python run.py {{{'|'.join(COMMANDS)}}} [key=value ...]", file=sys.stderr)
        sys.exit(2)
    command = sys.argv.pop(1)
    sys.argv = [quote_free_text(arg) for arg in sys.argv]
    hydra.main(config_path=CONF_DIR, config_name=command, version_base="1.3")(one_line_errors(COMMANDS[command]))()


if __name__ == "__main__":
    main()
