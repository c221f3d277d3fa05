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
The "1 a call" cases translate the first --single sentences one call each, as a service answers them, each
system at its faster of one thread and all of them.

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


def cases(forced_len: int, single: int) -> list[tuple[str, int, int | None, bool]]:
    """(name, beam size, forced output length or None for natural length, one sentence a call)."""
    batched = [(f"{name}{f' forced {L}' if L else ''}", beam, L, False)
               for name, beam in (("greedy", 1), ("beam5", 5)) for L in (None, forced_len)]
    return batched + ([(f"{name} 1 a call", beam, None, True) for name, beam in (("greedy", 1), ("beam5", 5))]
                      if single else [])


def ours(args, lines, precision: str):
    """A function translating the lines in one of the cases with our decoder: all of them in batches of
    `setting` tokens, or the first --single one a call on `setting` threads."""
    from seq2seq.translator import Translator

    translator = Translator.from_checkpoint(args.ckpt, device="cpu")
    threads = torch.get_num_threads()

    def run(beam: int, forced: int | None, setting: int, single: bool) -> None:
        if single:
            torch.set_num_threads(setting)
            for line in lines[:args.single]:
                translator.translate([line], beam_size=beam, precision=precision, pretokenized=True)
            torch.set_num_threads(threads)
            return
        translator.translate(lines, beam_size=beam, max_tokens=setting, precision=precision,
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
    translators = {threads: ctranslate2.Translator(model_dir, device="cpu", compute_type=args.compute_type,
                                                   inter_threads=1, intra_threads=threads)
                   for threads in thread_counts()}  # its thread count is fixed when it is made

    def run(beam: int, forced: int | None, setting: int, single: bool) -> None:
        if single:
            for sentence in source[:args.single]:
                translators[setting].translate_batch([sentence], beam_size=beam)
            return
        translators[torch.get_num_threads()].translate_batch(source, beam_size=beam, max_batch_size=setting,
                                                             batch_type="tokens",
                                                             **(forced_ct2(forced) if forced else {}))
    return run


def thread_counts() -> list[int]:
    """The thread counts one sentence a call is timed at: one, and all (on a 2-core VM CTranslate2 answered one
    sentence 8x faster on one thread than on two, its threads waiting on each other over such small products)."""
    return sorted({1, torch.get_num_threads()})


def timed(run, beam: int, forced: int | None, setting: int, single: bool) -> float:
    time.sleep(PAUSE_S)
    start = time.perf_counter()
    run(beam, forced, setting, single)
    return time.perf_counter() - start


def worker(system: str, args, lines, precision: str, conn) -> None:
    """One system in a process of its own: load, warm up, then time each pass the parent asks for."""
    with tempfile.TemporaryDirectory() as model_dir:
        run = ours(args, lines, precision) if system == "seq2seq" else ctranslate2_runner(args, lines, model_dir)
        run(2, None, max(args.max_tokens), False)  # warm-up
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
    parser.add_argument("--single", type=int, default=64,
                        help="also translate the first N sentences one a call, as a service answers them (0: not)")
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
    for name, beam, forced, single in cases(args.forced_len, min(args.single, len(lines))):
        settings = thread_counts() if single else args.max_tokens  # each system at its fastest of these
        seconds = {(system, setting): [] for system in systems for setting in settings}  # one per round
        for r in range(args.rounds):
            for setting in settings:
                for system in (list(systems) if r % 2 == 0 else list(systems)[::-1]):
                    systems[system].send((beam, forced, setting, single))
                    seconds[system, setting].append(systems[system].recv())
        fastest = {system: [min(seconds[system, s][r] for s in settings) for r in range(args.rounds)]
                   for system in systems}  # each round, each system at its fastest setting
        ratios = [ct2 / ours_s for ours_s, ct2 in zip(fastest["seq2seq"], fastest["CT2"])]
        sentences = min(args.single, len(lines)) if single else len(lines)
        best = {system: sentences / min(s) for system, s in fastest.items()}
        print(f"{name:<18} {best['seq2seq']:>15.1f} {best['CT2']:>11.1f} {statistics.median(ratios):>12.2f}x "
              f"{min(ratios):>5.2f}x {max(ratios):>5.2f}x", flush=True)
        fastest_budgets.append(f"{name}: " + ", ".join(
            f"{system} {min(settings, key=lambda s: statistics.median(seconds[system, s]))}"
            f"{' threads' if single else ''}" for system in systems))
    for conn in systems.values():
        conn.send(None)
    print(f"\nratio: seq2seq {precision} sentences/s over CT2 {args.compute_type}'s in the same round, each at "
          "its fastest budget (above 1: ours is faster)")
    if len(args.max_tokens) > 1 or args.single:
        print("fastest budget (or thread count) by the median: " + "; ".join(fastest_budgets))


if __name__ == "__main__":
    main()
