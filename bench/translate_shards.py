"""`run.py translate devices=N`: the same file translated by 1, 2, ... processes, side by side.

Each run is the whole command (start-up, model load, every process's share, the join), timed from
outside. The outputs must be identical to the one-process output, line for line (fp32 by default, so
that no answer depends on the number of threads; --precision int8 to time the default CPU path).

    python bench/translate_shards.py --ckpt runs/x/checkpoints/best.ckpt --input PATH/test.en [--lines 4000] \\
        [--devices 1 2] [--device cpu]
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from seq2seq.hardware import machine_report, this_machine

ROOT = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--input", required=True, help="a text file; its lines are repeated up to --lines")
    p.add_argument("--lines", type=int, default=4000)
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="32")
    p.add_argument("--beam-size", type=int, default=5)
    args = p.parse_args()
    print(machine_report(this_machine(), args.device))
    lines = Path(args.input).read_text(encoding="utf-8").splitlines()
    lines = (lines * (args.lines // max(len(lines), 1) + 1))[:args.lines]
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp, "input.txt")
        source.write_text("\n".join(lines) + "\n", encoding="utf-8")
        rows = []
        for n in args.devices:
            output = Path(tmp, f"out{n}.txt")
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "run.py", "translate", f"ckpt={args.ckpt}", f"input={source}",
                                   f"output={output}", f"devices={n}", f"device={args.device}", "progress=false",
                                   f"precision={args.precision}", f"beam_size={args.beam_size}"],
                                  cwd=ROOT, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if proc.returncode != 0:
                sys.exit(f"devices={n} failed:\n{proc.stderr[-3000:]}")
            rows.append((n, seconds, output.read_text(encoding="utf-8")))
    base_seconds, base_text = rows[0][1], rows[0][2]
    print(f"\n{len(lines)} lines, beam {args.beam_size}, precision {args.precision}, device {args.device}\n")
    print("| devices | seconds | lines/s | vs devices=1 | output equal |\n|---:|---:|---:|---:|---|")
    for n, seconds, text in rows:
        print(f"| {n} | {seconds:.1f} | {len(lines) / seconds:.1f} | {base_seconds / seconds:.2f}x | "
              f"{'yes' if text == base_text else 'NO'} |")


if __name__ == "__main__":
    main()
