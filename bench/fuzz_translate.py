"""Fuzz `run.py translate` with N generated hostile lines: no crash, N lines out, input order kept.

    python bench/fuzz_translate.py --ckpt runs/x/checkpoints/best.ckpt [--lines 10000] [--seed 0] [--precision 32]

Lines: empty, whitespace only, control and zero-width characters, emoji, mixed scripts, special-token
strings, 10,000+ character lines, and invalid UTF-8 bytes (translated with errors=replace).
"""
import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PIECES = ["the", "cat", "猫", "は", "本", "を", "読みます", "。", "?", "😀", "👍🏽", "🇯🇵", "\u200b", "\u200d", "\ufeff",
          "\x00", "\x07", "\x1b[31m", "\t", "\u3000", "\u2028", "\x1c", "\x85", "</s>", "<unk>", "<s>", "<pad>", "▁",
          "Ελληνικά", "עברית", "한국어", "ｆｕｌｌ", "①", "ﬁ", "e\u0301", "\ud7ff", "\U0010ffff"]
BAD_BYTES = [b"\xff", b"\xfe", b"\xc3", b"\xe3\x81", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]


def hostile_line(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return rng.choice([b"", b" ", b"\t\t", "\u3000".encode(), b"\r"])
    if kind == 1:
        return ("x" * rng.randint(10_000, 20_000)).encode()
    if kind == 2:
        return b" ".join(rng.choice(BAD_BYTES) + rng.choice(PIECES).encode() for _ in range(rng.randint(1, 8)))
    text = "".join(rng.choice(PIECES) + rng.choice(["", " "]) for _ in range(rng.randint(1, 30)))
    return text.encode("utf-8", "surrogatepass")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="auto", help="each decoding path: auto, 32, int8 (CPU), bf16")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    lines = [hostile_line(rng) for _ in range(args.lines)]
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from seq2seq.hardware import this_machine

    print(f"machine: {this_machine().describe()}", flush=True)  # the seconds below are this machine's
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp, "fuzz.in"), Path(tmp, "fuzz.out")
        src.write_bytes(b"\n".join(lines) + b"\n")
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "run.py", "translate", f"ckpt={args.ckpt}", f"input={src}",
                               f"output={out}", "errors=replace", "beam_size=2", "progress=false",
                               f"precision={args.precision}"],
                              cwd=root, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode:
            sys.exit(f"translate failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        got = out.read_text(encoding="utf-8").split("\n")[:-1]
        # order: re-translate a sample of lines one by one and compare
        sample = rng.sample(range(args.lines), 20)
        Path(tmp, "sample.in").write_bytes(b"\n".join(lines[i] for i in sample) + b"\n")
        check = subprocess.run([sys.executable, "run.py", "translate", f"ckpt={args.ckpt}", f"input={tmp}/sample.in",
                                "errors=replace", "beam_size=2", "progress=false", f"precision={args.precision}"],
                               cwd=root, capture_output=True, text=True)
    kinds = sum(1 for line in lines if not line.strip()), sum(len(line) >= 10_000 for line in lines)
    ok_count = len(got) == args.lines
    ok_order = check.stdout.split("\n")[:-1] == [got[i] for i in sample]
    print(f"{args.lines} lines ({kinds[0]} empty/blank, {kinds[1]} of 10,000+ chars) in {seconds:.1f} s: "
          f"{len(got)} lines out ({'ok' if ok_count else 'MISMATCH'}), order {'kept' if ok_order else 'BROKEN'}, "
          f"{proc.stderr.count('warning: line')} truncation warnings")
    sys.exit(0 if ok_count and ok_order else 1)


if __name__ == "__main__":
    main()
