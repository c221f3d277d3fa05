"""Our decoder against CTranslate2, pass after pass: a ratio that a drifting machine cannot tilt.

bench/decode.py runs each system in its own process, one after another. On a VM whose speed drifts
between them, its ratios move with the machine: three runs on one 2-core VM put our int8 greedy at
0.68-1.08x CTranslate2 int8, while CTranslate2's own greedy rows ranged 349-610 sentences/s. Here each
decoder lives in a process of its own, its model loaded once, and the two take turns: one pass over the
test sentences by one while the other waits on a pipe (ours first in one round, CTranslate2 first in
the next). Each round gives one ratio per case; the median and the range over --rounds rounds are
printed. (Both in one process would share the machine unfairly: CTranslate2 brings its own copy of
libgomp, and with it loaded our passes measured 35% slower.) Ours runs at --precision (default: what
`auto` picks here), CTranslate2 at --compute-type.

Each system at its best batch: every round times both at each budget of --max-tokens, and a case's ratio
in that round is ours at our fastest budget over CTranslate2 at its fastest. On the 2-core Xeon under the
AVX2 caps both ran faster in 16,384-token batches, which hold the 500 test sentences in one batch, than in
4,096-token ones (three batches, the last of them short): ours greedy 262 -> 379 sentences/s, CTranslate2
377 -> 410. On 2,000 training sentences our budgets 4,096 to 32,768 were within the noise of each other.

    python bench/head_to_head.py --ckpt runs/x/checkpoints/best.ckpt --data-url PATH/small_parallel_enja
    bash bench/avx2.sh python bench/head_to_head.py ...      # the AVX2 class, emulated on a newer CPU
"""
import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import checkpoint_facts, ct2_source, forced_ct2, forced_ours, test_lines  # noqa: E402  (bench/: no package)

from seq2seq.hardware import choose_precision, machine_report, this_machine  # noqa: E402

PAUSE_S = 0.5  # before each pass: the other process's OpenMP threads spin a while after their work


def cases(forced_len: int) -> list[tuple[str, int, int | None]]:
    """(name, beam size, forced output length or None for natural length)."""
    return [(f"{name}{f' forced {L}' if L else ''}", beam, L)
            for name, beam in (("greedy", 1), ("beam5", 5)) for L in (None, forced_len)]


def ours(args, lines, precision: str):
    """A function translating all lines in one of the cases with our decoder."""
    from seq2seq.translator import Translator

    translator = Translator.from_checkpoint(args.ckpt, device="cpu")

    def run(beam: int, forced: int | None, max_tokens: int) -> None:
        translator.translate(lines, beam_size=beam, max_tokens=max_tokens, precision=precision,
                             pretokenized=True, **(forced_ours(forced) if forced else {}))
    return run


def ctranslate2_runner(args, lines, model_dir: str):
    """The same for CTranslate2, on the same trained weights (`run.py export format=ctranslate2`)."""
    import ctranslate2

    from seq2seq.checkpoint import load_model
    from seq2seq.export import export_ctranslate2

    _, tokenizer, _ = load_model(args.ckpt)
    source = ct2_source(tokenizer, lines)
    export_ctranslate2(args.ckpt, model_dir)
    translator = ctranslate2.Translator(model_dir, device="cpu", compute_type=args.compute_type, inter_threads=1,
                                        intra_threads=torch.get_num_threads())

    def run(beam: int, forced: int | None, max_tokens: int) -> None:
        translator.translate_batch(source, beam_size=beam, max_batch_size=max_tokens, batch_type="tokens",
                                   **(forced_ct2(forced) if forced else {}))
    return run


def timed(run, beam: int, forced: int | None, max_tokens: int) -> float:
    time.sleep(PAUSE_S)
    start = time.perf_counter()
    run(beam, forced, max_tokens)
    return time.perf_counter() - start


def worker(system: str, args, lines, precision: str, conn) -> None:
    """One system in a process of its own: load, warm up, then time each pass the parent asks for."""
    with tempfile.TemporaryDirectory() as model_dir:
        run = ours(args, lines, precision) if system == "seq2seq" else ctranslate2_runner(args, lines, model_dir)
        run(2, None, max(args.max_tokens))  # warm-up
        conn.send("ready")
        while (case := conn.recv()) is not None:
            conn.send(timed(run, *case))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data-url", default="../shared/data/small_parallel_enja")
    parser.add_argument("--precision", default="auto", help="ours: auto, 32, bf16 or int8")
    parser.add_argument("--compute-type", default="int8", help="CTranslate2's: int8, float32, bfloat16, ...")
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[4096, 16384],
                        help="batch budgets in tokens, each system timed at each; its fastest counts")
    parser.add_argument("--forced-len", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="only the first N test sentences")
    args = parser.parse_args()
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        sys.exit("error: CTranslate2 is not installed (pip install ctranslate2)")
    print(machine_report(this_machine()), flush=True)
    lines = test_lines(args.data_url, args.ckpt)[:args.limit]
    precision = args.precision
    if precision == "auto":
        precision, _ = choose_precision("auto", "cpu", training=False, machine=this_machine(),
                                        d_model=checkpoint_facts(args.ckpt)["model_config"]["d_model"])
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter each: no threads forked mid-use
    systems = {}
    for system in ("seq2seq", "CT2"):
        parent, child = spawn.Pipe()
        process = spawn.Process(target=worker, args=(system, args, lines, precision, child), daemon=True)
        process.start()
        systems[system] = parent
    for conn in systems.values():
        if conn.recv() != "ready":
            sys.exit("error: a decoder did not start")
    budgets = " or ".join(map(str, args.max_tokens))
    print(f"{len(lines)} sentences, {torch.get_num_threads()} threads, {budgets}-token batches (each system's "
          f"fastest), seq2seq {precision} against CT2 {args.compute_type}, {args.rounds} rounds, passes alternating\n")
    print(f"{'case':<18} {'seq2seq sent/s':>15} {'CT2 sent/s':>11} {'ratio median':>13} {'min':>6} {'max':>6}")
    fastest_budgets = []
    for name, beam, forced in cases(args.forced_len):
        seconds = {(system, budget): [] for system in systems for budget in args.max_tokens}  # one per round
        for r in range(args.rounds):
            for budget in args.max_tokens:
                for system in (list(systems) if r % 2 == 0 else list(systems)[::-1]):
                    systems[system].send((beam, forced, budget))
                    seconds[system, budget].append(systems[system].recv())
        fastest = {system: [min(seconds[system, b][r] for b in args.max_tokens) for r in range(args.rounds)]
                   for system in systems}  # each round, each system at its fastest budget
        ratios = [ct2 / ours_s for ours_s, ct2 in zip(fastest["seq2seq"], fastest["CT2"])]
        best = {system: len(lines) / min(s) for system, s in fastest.items()}
        print(f"{name:<18} {best['seq2seq']:>15.1f} {best['CT2']:>11.1f} {statistics.median(ratios):>12.2f}x "
              f"{min(ratios):>5.2f}x {max(ratios):>5.2f}x", flush=True)
        fastest_budgets.append(f"{name}: " + ", ".join(
            f"{system} {min(args.max_tokens, key=lambda b: statistics.median(seconds[system, b]))}"
            for system in systems))
    for conn in systems.values():
        conn.send(None)
    print(f"\nratio: seq2seq {precision} sentences/s over CT2 {args.compute_type}'s in the same round, each at "
          "its fastest budget (above 1: ours is faster)")
    if len(args.max_tokens) > 1:
        print("fastest budget by the median: " + "; ".join(fastest_budgets))


if __name__ == "__main__":
    main()
