"""Decoding speed by batch size at each CPU precision: where one sentence at a time and a large batch want
different precisions.

Translates the first --lines test sentences in batches of n sentences (n = 1, 2, 4, ... up to --largest), one
`Translator.translate` call per batch, greedy and at --beam-size, at each precision this CPU runs well (fp32,
int8, and bf16 where it is native), interleaved, best of --rounds rounds. Prints sentences/s and each
precision over fp32. `precision=auto` keeps one precision for every batch, so that a line's translation does
not depend on how many lines share its batch; this shows what that costs where batches are small (on a
2-core AMX Xeon, one sentence at a time decoded 2.9x faster in fp32 than in bf16, and 3.9x in int8, which is
what `auto` picks there since: docs/benchmarks.md).

    python bench/batch_size.py --ckpt runs/x/checkpoints/best.ckpt --data-url PATH/small_parallel_enja
"""
import argparse
import time
from pathlib import Path

import torch

from seq2seq.hardware import choose_precision, machine_report, this_machine


def sentences_per_second(translator, lines: list[str], n: int, beam_size: int, precision: str) -> float:
    """All lines translated n at a time, one call per batch."""
    start = time.perf_counter()
    for at in range(0, len(lines), n):
        translator.translate(lines[at:at + n], beam_size=beam_size, precision=precision, pretokenized=True)
    return len(lines) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data-url", required=True, help="a directory with the test split (test.<source language>)")
    parser.add_argument("--lines", type=int, default=64)
    parser.add_argument("--largest", type=int, default=64, help="the largest batch, in sentences")
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    machine = this_machine()
    print(machine_report(machine), flush=True)
    from seq2seq.translator import Translator

    translator = Translator.from_checkpoint(args.ckpt, device="cpu")
    test = Path(args.data_url, f"test.{translator.info.src_lang}")
    lines = test.read_text(encoding="utf-8").splitlines()[:args.lines]
    precisions = ["32"] + (["int8"] if machine.cpu_int8 else []) + (["bf16"] if machine.cpu_native_bf16 else [])
    auto = choose_precision("auto", "cpu", training=False, machine=machine, d_model=translator.model.cfg.d_model)
    print(f"auto decodes at {auto[0]} here: {auto[1]}")
    for p in precisions:  # warm-up: the int8 copy, oneDNN's kernels
        translator.translate(lines[:2], beam_size=args.beam_size, precision=p, pretokenized=True)
    sizes = [2 ** i for i in range(args.largest.bit_length()) if 2 ** i <= args.largest]
    print(f"\n{len(lines)} test lines in batches of n sentences, one call each; sentences/s, best of {args.rounds} "
          f"rounds, {torch.get_num_threads()} threads")
    others = [p for p in precisions if p != "32"]
    print("| search | n | rows a step | " + " | ".join(precisions) + "".join(f" | {p} / 32" for p in others) + " |")
    print("|---|---:|---:|" + "---:|" * (len(precisions) + len(others)))
    for beam_size in (1, args.beam_size):
        for n in sizes:
            best = dict.fromkeys(precisions, 0.0)
            for r in range(args.rounds):
                for p in precisions if r % 2 == 0 else precisions[::-1]:
                    best[p] = max(best[p], sentences_per_second(translator, lines, n, beam_size, p))
            print(f"| {'greedy' if beam_size == 1 else f'beam {beam_size}'} | {n} | {n * beam_size} | "
                  + " | ".join(f"{best[p]:.1f}" for p in precisions)
                  + "".join(f" | {best[p] / best['32']:.2f}x" for p in others) + " |", flush=True)


if __name__ == "__main__":
    main()
