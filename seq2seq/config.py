"""From Hydra's config to our dataclasses: `build_config` checks every key's name, type and range and
turns a mistake into one line naming the key."""
import types
import typing
from dataclasses import dataclass, fields

from omegaconf import DictConfig, OmegaConf

from seq2seq import Seq2SeqError
from seq2seq.search import SearchConfig

SCALAR_TYPES = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}  # an int is a fine float


def has_type(value, annotation) -> bool:
    """Does a config value fit a config dataclass field's annotation (int, float, str | None, tuple[...])?"""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for option in options:
        if value is None and option is type(None):
            return True
        if typing.get_origin(option) in (tuple, list) and isinstance(value, (list, tuple)):
            return True
        if dict in (option, typing.get_origin(option)) and isinstance(value, dict):
            return True
        if option in SCALAR_TYPES and isinstance(value, SCALAR_TYPES[option]) \
                and (option is bool or not isinstance(value, bool)):
            return True
    return False


def build_config(cls, cfg: DictConfig | dict, group: str, top_level: bool = False, **derived):
    """`cls(**cfg)`, turning a misspelled, missing, mistyped or impossible key into one line naming it.

    Messages name keys as the command line spells them: `model.d_model=...`, or `beam_size=...` for the
    `top_level` keys that a command's config merges at its root (the search settings).
    """
    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    prefix = "" if top_level else f"{group}."
    known = {f.name: f.type for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        settable = ", ".join(sorted(set(known) - set(derived)))
        raise Seq2SeqError(f"unknown config key {prefix}{unknown[0]} (known: {settable})")
    for name, value in values.items():
        if value == "???":  # OmegaConf's mark for a value the preset leaves to the command line
            raise Seq2SeqError(f"{prefix}{name} is not set: give it on the command line ({prefix}{name}=...)")
        if not has_type(value, known[name]):
            expected = getattr(known[name], "__name__", str(known[name]))
            raise Seq2SeqError(f"{prefix}{name}={value!r}: expected {expected}")
    try:
        return cls(**values, **derived)
    except (TypeError, ValueError) as e:
        raise Seq2SeqError(f"bad {group} config: {e}") from None


def search_config(cfg: DictConfig) -> SearchConfig:
    """The search settings of a translate/evaluate/visualize command line, checked (one line if wrong)."""
    return build_config(SearchConfig, {f.name: cfg[f.name] for f in fields(SearchConfig)}, "search", top_level=True)


def checkpoints(value) -> str | list[str]:
    """`ckpt=PATH`, or `ckpt=[a.ckpt,b.ckpt]` (an ensemble: seq2seq/ensemble.py) as a list of paths."""
    return [str(path) for path in value] if OmegaConf.is_list(value) else str(value)


def check_flag(key: str, value) -> None:
    """A task's true/false key (Hydra reads `key=yes` as a string): one line if it is not a bool."""
    if not isinstance(value, bool):
        raise Seq2SeqError(f"{key}={value!r}: expected true or false")


def check_choice(key: str, value, choices: tuple) -> None:
    """A task's key with a few possible values: one line naming them if it is none of them."""
    if value not in choices:
        raise Seq2SeqError(f"{key}={value!r}: expected one of {', '.join(map(str, choices))}")


@dataclass
class RunConfig:
    """The top-level numbers of `run.py train` (conf/train.yaml), checked like the groups' keys."""

    seed: int
    keep_last: int  # also keep the weights of the last N validations, for `run.py average`
    patience: int  # early stopping: validations without a better val/bleu

    def __post_init__(self):
        for name in ("keep_last", "patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must not be negative")


def run_config(cfg: DictConfig) -> RunConfig:
    return build_config(RunConfig, {f.name: cfg[f.name] for f in fields(RunConfig)}, "run", top_level=True)
