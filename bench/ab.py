"""In-process A/B: one function of seq2seq (or several) as a git revision has it (A) against the working tree (B),
timed on a training step or a decoding pass, in alternating rounds inside one process, and given as ratios.

On a shared or virtual machine two runs of the same code differ by 5-15% (docs/benchmarks.md), more than most
changes gain. In one process, with A and B swapped in turn on the same model, data and warm caches, the
machine's drift lands on both: the median of the per-round ratios, and their range, say whether a change pays.

    python bench/ab.py seq2seq.loss:FusedProjectionCrossEntropy.forward --task train --data-url DIR [--rev HEAD]
    python bench/ab.py seq2seq.search:top_next_tokens --task decode --ckpt CKPT --src FILE [--beam-size 5]
    python bench/ab.py seq2seq.int8:Int8Linear.forward seq2seq.int8:Int8Linear.scaled --task decode ... --forced-len 20
    python bench/ab.py seq2seq.search:greedy_search --task decode ... --beam-size 1 --batch-lines 1 --lines 64

A change that spans functions names each of them: they are swapped together. Each is swapped where seq2seq looks
it up: on its class or module, and in every seq2seq module that imported it by name. A method that the revision's
class does not define is A as the class inherits it (`seq2seq.int8:Int8Transformer.decode_step --rev a7d486a~1`).
A ratio above 1 means the working tree is faster. Decoding also says on how many lines A and B wrote the same
translation, and how far apart their scores came; `--forced-len L` decodes every line for exactly L steps
(bench/decode.py's forced cases).
"""
import argparse
import importlib
import linecache
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import train as train_bench  # noqa: E402  (bench/train.py: its batches, model and optimizer step)
from decode import forced_ours  # noqa: E402  (bench/decode.py: the settings of its forced-length cases)

from seq2seq import Seq2SeqError  # noqa: E402
from seq2seq.hardware import choose_precision, machine_report, this_machine  # noqa: E402


class ABError(Exception):
    """A target or revision that cannot be compared: one line for the user."""


def module_at_revision(module_name: str, rev: str) -> types.ModuleType:
    """The module's source as `rev` has it, run as a module of its own; its imports are the working tree's."""
    path = module_name.replace(".", "/") + ".py"
    shown = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True)
    if shown.returncode:
        raise ABError(f"{rev}:{path}: {shown.stderr.strip() or 'not in git'}")
    module = types.ModuleType(f"{module_name}@{rev}")
    sys.modules[module.__name__] = module  # dataclasses look their module up here
    filename = f"{rev}:{path}"
    # inspect reads the source from here: TorchScript compiles from it (int8's `compiled` runs eager without it)
    linecache.cache[filename] = (len(shown.stdout), None, shown.stdout.splitlines(keepends=True), filename)
    exec(compile(shown.stdout, filename, "exec"), module.__dict__)
    return module


def owner_and_name(module: types.ModuleType, qualname: str) -> tuple[object, str]:
    """The class or module that holds `qualname` ("f" or "Class.method"), and the attribute's name."""
    *outer, name = qualname.split(".")
    owner = module
    for part in outer:
        owner = getattr(owner, part, None)
    if owner is None or name not in vars(owner):
        raise ABError(f"{module.__name__} has no {qualname}")
    return owner, name


def bound_to_class(method: types.FunctionType, owner: type) -> types.FunctionType:
    """The revision's method with its zero-argument super() looking up the live class: it was compiled in a class
    of the revision's own module, of which the live objects are no instance."""
    if "__class__" not in method.__code__.co_freevars:
        return method
    cells = [types.CellType(owner) if var == "__class__" else cell
             for var, cell in zip(method.__code__.co_freevars, method.__closure__)]
    rebound = types.FunctionType(method.__code__, method.__globals__, method.__name__, method.__defaults__,
                                 tuple(cells))
    rebound.__kwdefaults__, rebound.__qualname__ = method.__kwdefaults__, method.__qualname__
    return rebound


def swapper(target: str, rev: str):
    """A function impl("A" | "B") that puts that version of `target` ("module:qualname") in place."""
    module_name, _, qualname = target.partition(":")
    if not qualname:
        raise ABError(f"{target}: expected MODULE:FUNCTION, e.g. seq2seq.search:top_next_tokens")
    try:
        live = importlib.import_module(module_name)
    except ImportError as e:
        raise ABError(f"{target}: {e}") from None
    owner, name = owner_and_name(live, qualname)
    old_module = module_at_revision(module_name, rev)
    try:
        old_owner, _ = owner_and_name(old_module, qualname)
        old = vars(old_owner)[name]  # as stored: a staticmethod stays one
    except ABError:
        if not isinstance(owner, type):
            raise
        old = None  # a method the revision's class does not define: A is what the class inherits
    if isinstance(owner, type) and isinstance(old, types.FunctionType):
        old = bound_to_class(old, owner)
    versions = {"A": old, "B": vars(owner)[name]}
    # and the seq2seq modules that did `from module import name` hold the same object under the same name
    holders = [owner] + [m for m in list(sys.modules.values()) if m is not None and m is not owner
                         and m.__name__.startswith("seq2seq") and vars(m).get(name) is versions["B"]]

    def impl(which: str) -> None:
        for holder in holders:
            if versions[which] is not None:
                setattr(holder, name, versions[which])
            elif name in vars(holder):
                delattr(holder, name)
    return impl


def train_pass(args):
    """A callable that runs `args.steps` training steps and returns (seconds, None), and the tokens it trains."""
    torch.manual_seed(0)
    cfg, tokenizer, warmup, batches = train_bench.load_batches(args)
    precision, why = choose_precision(args.precision, torch.device(args.device).type, training=True,
                                      machine=this_machine(), d_model=cfg.model.d_model)
    if precision not in ("32", "bf16"):
        raise ABError(f"precision={args.precision}: bench/train.py's step trains in 32 or bf16 only")
    print(f"training precision {precision}: {why}")
    bf16 = precision == "bf16"
    model, loss_fn, optimizer = train_bench.ours(cfg, tokenizer, args.device)
    train_bench.train_steps(model, loss_fn, optimizer, warmup, bf16, args.device)
    tokens = sum(b["n_tokens"] for b in batches)
    return lambda: (train_bench.train_steps(model, loss_fn, optimizer, batches, bf16, args.device), None), tokens


def decode_settings(args) -> dict:
    """What Translator.translate gets: the search settings of the command line."""
    settings = dict(beam_size=args.beam_size, max_tokens=args.batch_tokens, precision=args.precision,
                    pretokenized=args.pretokenized)
    if args.forced_len:  # exactly L decoder steps a line, as bench/decode.py's forced cases
        settings.update(forced_ours(args.forced_len))
    return settings


def decode_pass(args):
    """A callable that translates `--src` and returns (seconds, the nbest lists), and the line count."""
    from seq2seq.translator import Translator

    try:
        lines = Path(args.src).read_text(encoding="utf-8").splitlines()[:args.lines]
    except (OSError, UnicodeDecodeError) as e:
        raise ABError(f"--src {args.src}: {e}") from None
    translator = Translator.from_checkpoint(args.ckpt, device=args.device)
    settings = decode_settings(args)
    translator.translate(lines[:20], **settings)  # warm-up

    def run():
        start = time.perf_counter()
        n = args.batch_lines or len(lines)  # lines a call: 1 is one sentence at a time, as a service answers them
        out = [nbest for at in range(0, len(lines), n) for nbest in translator.translate_nbest(lines[at:at + n],
                                                                                               **settings)]
        return time.perf_counter() - start, out
    return run, len(lines)


def same_output(a: list, b: list) -> str:
    same = sum(x[0][0] == y[0][0] for x, y in zip(a, b))
    score_gap = max((abs(x[0][1] - y[0][1]) for x, y in zip(a, b)), default=0.0)
    return f"same translation on {same} of {len(a)} lines, scores at most {score_gap:.1e} apart"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="+", metavar="target",
                        help="MODULE:FUNCTION, e.g. seq2seq.search:top_next_tokens; several are swapped together")
    parser.add_argument("--rev", default="HEAD", help="the git revision of A (default HEAD); B is the working tree")
    parser.add_argument("--task", choices=["train", "decode"], required=True)
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds (A then B, then B then A, ...)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--precision", default="auto", help="auto (what the commands would pick here), 32, bf16, "
                        "or, decoding, 16 or int8")
    train = parser.add_argument_group("--task train (bench/train.py's batches and step)")
    train.add_argument("--data", choices=["small_enja", "demo"], default="small_enja")
    train.add_argument("--data-url", default="../shared/data/small_parallel_enja")
    train.add_argument("--data-dir", default="data")
    train.add_argument("--model", default="small")
    train.add_argument("--max-tokens", type=int, default=None, help="batch budget (default: the data preset's)")
    train.add_argument("--steps", type=int, default=10, help="training steps per round and version")
    decode = parser.add_argument_group("--task decode")
    decode.add_argument("--ckpt")
    decode.add_argument("--src", help="one sentence a line")
    decode.add_argument("--lines", type=int, default=500, help="the first N lines of --src")
    decode.add_argument("--pretokenized", action="store_true", help="--src is already in the corpus's form")
    decode.add_argument("--beam-size", type=int, default=5)
    decode.add_argument("--batch-tokens", type=int, default=4096, help="max_tokens of each decoding batch")
    decode.add_argument("--batch-lines", type=int, default=0,
                        help="translate N lines a call (1: one sentence at a time; 0: all lines in one call)")
    decode.add_argument("--forced-len", type=int, default=0, help="L: every line decoded for exactly L steps "
                        "(bench/decode.py's forced cases; 0: natural length)")
    args = parser.parse_args(argv)
    if args.task == "decode" and not (args.ckpt and args.src):
        parser.error("--task decode needs --ckpt and --src")
    if args.forced_len < 0 or args.forced_len == 1:
        parser.error("--forced-len must be 0 (natural length) or at least 2 (a token, then eos)")
    if args.rounds < 2:
        parser.error("--rounds must be at least 2: each version goes first once")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        swaps = [swapper(target, args.rev) for target in args.targets]
        print(machine_report(this_machine(), args.device))
        run, units = train_pass(args) if args.task == "train" else decode_pass(args)
    except (ABError, Seq2SeqError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def use(which: str) -> None:
        for impl in swaps:
            impl(which)

    unit = "tokens" if args.task == "train" else "sentences"
    seconds, outputs = {"A": [], "B": []}, {}
    for r in range(args.rounds):
        for which in ("A", "B") if r % 2 == 0 else ("B", "A"):
            use(which)
            took, out = run()
            seconds[which].append(took)
            outputs.setdefault(which, out)
    use("B")
    ratios = [a / b for a, b in zip(seconds["A"], seconds["B"])]
    print(f"{' '.join(args.targets)}, {args.task}, {args.rounds} alternating rounds; "
          f"A = {args.rev}, B = the working tree")
    for which in ("A", "B"):
        print(f"{which}: {units / statistics.median(seconds[which]):.1f} {unit}/s (median), "
              f"{units / min(seconds[which]):.1f} (best)")
    print("A/B time per round: " + " ".join(f"{x:.3f}" for x in ratios))
    print(f"B is {statistics.median(ratios):.3f}x as fast as A (median; range {min(ratios):.3f}-{max(ratios):.3f})")
    if args.task == "decode":
        print(same_output(outputs["A"], outputs["B"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
