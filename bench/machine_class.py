"""One command for a machine class's row in docs/benchmarks.md (issue #13): the machine, `experiment=smoke`'s
wall time, training against HF Marian (bench/train.py), decoding against HF `generate` and CTranslate2
(bench/decode.py), and what `precision=auto` picks, each system at its fastest setting on this machine; then
ours against CTranslate2 int8 in alternating passes (bench/head_to_head.py), the ratio a drifting VM moves least.

    python bench/machine_class.py --data-url PATH/small_parallel_enja [--ckpt CKPT | --train-minutes 20]
    bash bench/avx2.sh python bench/machine_class.py ...     # the AVX2 class, emulated on a newer CPU
    python bench/machine_class.py --demo                     # a quick check of the whole chain, offline

Without --ckpt it first trains en→ja (`experiment=enja_small`) for --train-minutes: the decoding rows need a
trained model (20 minutes on a 2-core AMX Xeon: test BLEU 30). Every step's whole output goes to --out
(a folder per run); the last lines printed are the headline row and the figures behind it. --demo runs
every step on the generated demo corpus, at a few steps each: it checks the chain, not the machine.
"""
import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from seq2seq.hardware import machine_report, this_machine

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-url", default="../shared/data/small_parallel_enja",
                        help="small_parallel_enja's folder: the training batches, the model, the test sentences")
    parser.add_argument("--ckpt", help="an en->ja small_parallel_enja checkpoint to decode with (default: train one)")
    parser.add_argument("--train-minutes", type=int, default=20, help="training time of that model, without --ckpt")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each bench; each reports its best or median")
    parser.add_argument("--out", default=None, help="where the outputs go (default: runs/machine_class/<time>)")
    parser.add_argument("--demo", action="store_true", help="the demo corpus, a few steps each: checks the chain")
    return parser.parse_args()


def step(title: str, command: list[str], log: Path) -> str:
    """Run one step, its output into `log`; its stdout, or exit naming the step and the log."""
    print(f"== {title}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode:
        sys.exit(f"error: {title} failed (exit {proc.returncode}); its output: {log}\n{proc.stderr[-2000:]}")
    print(f"   {time.perf_counter() - start:.1f} s, output in {log}", flush=True)
    return proc.stdout


def found(pattern: str, text: str, what: str) -> re.Match:
    match = re.search(pattern, text)
    if match is None:
        sys.exit(f"error: no {what} in the output (pattern {pattern!r}): a bench changed its format")
    return match


def smoke(out: Path) -> dict:
    """`run.py train experiment=smoke`, the whole command timed from outside, as a user runs it."""
    run_dir = out / "smoke"
    start = time.perf_counter()
    step("smoke", [sys.executable, "run.py", "train", "experiment=smoke", "trainer.enable_progress_bar=false",
                   f"data_dir={out / 'data'}", f"hydra.run.dir={run_dir}"], out / "smoke.log")
    wall = time.perf_counter() - start
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    precision = found(r"training precision (\S+): ([^\n]+)", (out / "smoke.log").read_text(encoding="utf-8"),
                      "training precision line")
    return dict(wall=wall, bleu=results["test/bleu"], tokens_per_s=results["train_tokens_per_s"],
                precision=precision.group(1), reason=precision.group(2), ckpt=run_dir / "checkpoints" / "best.ckpt")


def training(args, out: Path) -> dict:
    """bench/train.py at model=small on small_parallel_enja's batches (model=tiny on the demo's with --demo)."""
    data = ["--data", "demo", "--model", "tiny", "--steps", "2"] if args.demo else \
        ["--data-url", args.data_url, "--model", "small", "--steps", "20"]
    text = step("training vs HF Marian", [sys.executable, "bench/train.py", *data, "--data-dir", str(out / "data"),
                                          "--rounds", str(args.rounds)], out / "train.log")
    verdict = found(r"best seq2seq \((seq2seq \w+)\) / best Marian \((Marian \w+ \w+)\): ([\d.]+)x", text,
                    "training verdict")
    ours = found(rf"\n{re.escape(verdict.group(1))} +[\d,]+ +(\d+) +[\d.]+x +(\d+)%", text, "row of our best")
    auto = found(r"precision=auto trains at (\S+) here .*= ([\d.]+x|not measured)", text, "training auto line")
    return dict(ours=verdict.group(1), peer=verdict.group(2), ratio=float(verdict.group(3)),
                tokens_per_s=int(ours.group(1)), peak=int(ours.group(2)), auto=auto.group(1), auto_ratio=auto.group(2))


def model_to_decode(args, out: Path, smoke_run: dict) -> Path:
    """--ckpt, the smoke model with --demo, or an en->ja model trained here for --train-minutes."""
    if args.ckpt:
        return Path(args.ckpt).resolve()
    if args.demo:
        return smoke_run["ckpt"]
    run_dir = out / "enja"
    step(f"train en->ja for {args.train_minutes} min",
         [sys.executable, "run.py", "train", "experiment=enja_small", f"trainer.max_time=00:00:{args.train_minutes}:00",
          "trainer.enable_progress_bar=false", f"data.url={Path(args.data_url).resolve()}",
          f"data_dir={out / 'data'}", f"hydra.run.dir={run_dir}"], out / "enja.log")
    return run_dir / "checkpoints" / "best.ckpt"


def decoding_inputs(args, out: Path) -> tuple[int, str]:
    """What both decoding steps translate: (tokens per sentence in the forced-length rows, the test set's folder)."""
    return (5, str(out / "data" / "demo")) if args.demo else (20, args.data_url)


def decoding(args, out: Path, ckpt: Path) -> dict:
    """bench/decode.py: our best against HF Marian's and CTranslate2's, per case, and auto against ours."""
    forced, data_url = decoding_inputs(args, out)
    quick = ["--limit", "16", "--budgets", "512", "--marian-batches", "16"] if args.demo else \
        ["--budgets", "4096", "16384", "--marian-batches", "64", "128", "256"]
    text = step("decoding vs HF generate and CTranslate2", [sys.executable, "bench/decode.py", "--ckpt", str(ckpt),
                                                             "--data-url", data_url, "--rounds", str(args.rounds),
                                                             "--forced-len", str(forced), *quick], out / "decode.log")
    cases = {}
    for name in ("greedy", f"greedy forced {forced}", "beam5", f"beam5 forced {forced}"):
        line = found(rf"\n{name}: best seq2seq \((seq2seq \w+), [^)]*\) / ([^\n]+)", text, f"{name} verdict")
        ratios = dict(re.findall(r"(Marian|CT2 int8|CT2 float32) \([^)]*\) = ([\d.]+)x", line.group(2)))
        auto = found(rf"\n{name}: auto \((\w+)\) / fastest \((\w+)\) = ([\d.]+x|not measured)", text, f"{name} auto")
        cases[name] = dict(ours=line.group(1), auto=auto.group(1), fastest=auto.group(2), auto_ratio=auto.group(3),
                           **{peer: float(r) for peer, r in ratios.items()})
    return cases


def head_to_head(args, out: Path, ckpt: Path) -> dict:
    """bench/head_to_head.py: ours at `auto` against CTranslate2 int8 in alternating passes, per case the
    median ratio and its range (the ratio decode.py's one-system-after-another rows cannot pin down on a VM)."""
    forced, data_url = decoding_inputs(args, out)
    quick = ["--limit", "16", "--max-tokens", "512", "--rounds", "2"] if args.demo else ["--rounds", "6"]
    text = step("head to head with CTranslate2 int8", [sys.executable, "bench/head_to_head.py", "--ckpt", str(ckpt),
                                                        "--data-url", data_url, "--forced-len", str(forced), *quick],
                out / "head_to_head.log")
    rounds = found(r"(\d+) rounds, passes alternating", text, "round count").group(1)
    row = r" +[\d.]+ +[\d.]+ +([\d.]+)x +([\d.]+)x +([\d.]+)x\n"  # two rates, then median, low and high ratios
    ratios = {name: found(rf"\n{name}{row}", text, f"{name} ratio").groups()
              for name in ("greedy", f"greedy forced {forced}", "beam5", f"beam5 forced {forced}")}
    return dict(rounds=rounds, ratios=ratios)


def headline(machine: str, smoke_run: dict, train: dict, cases: dict, versus: dict) -> str:
    """The row of docs/benchmarks.md's headline table, and the figures behind it."""
    beam = cases["beam5"]
    beam_forced = next(case for name, case in cases.items() if name.startswith("beam5 forced"))
    row = (f"| {machine} | {smoke_run['wall']:.1f} s | {train['ratio']:.2f}× ({train['peak']}% of peak) | "
           f"{beam.get('CT2 int8', float('nan')):.2f}× ({beam['ours'].removeprefix('seq2seq ')}; forced "
           f"{beam_forced.get('CT2 int8', float('nan')):.2f}×) | {beam_forced.get('Marian', float('nan')):.2f}× |")
    lines = ["| machine class | `experiment=smoke`, wall | training vs HF Marian | beam 5 vs CTranslate2 int8 | "
             "beam 5 forced vs HF `generate` |", "|---|---:|---:|---:|---:|", row, "",
             f"smoke: {smoke_run['wall']:.1f} s in all, {smoke_run['tokens_per_s']:,.0f} tokens/s, test BLEU "
             f"{smoke_run['bleu']:.2f}, precision {smoke_run['precision']} ({smoke_run['reason']})",
             f"training: {train['ours']} {train['tokens_per_s']:,} tokens/s = {train['ratio']:.2f}x {train['peer']}, "
             f"{train['peak']}% of the matmul peak; auto trains at {train['auto']}: {train['auto_ratio']} of our "
             "fastest"]
    for name, case in cases.items():
        peers = ", ".join(f"{case[p]:.2f}x {p}" for p in ("CT2 int8", "CT2 float32", "Marian") if p in case)
        lines.append(f"{name}: {case['ours']} = {peers}; auto ({case['auto']}) / fastest ({case['fastest']}) = "
                     f"{case['auto_ratio']}")
    ratios = ", ".join(f"{name} {median}x ({low}-{high})" for name, (median, low, high) in versus["ratios"].items())
    lines.append(f"head to head with CT2 int8, alternating passes, median (range) of {versus['rounds']} rounds: "
                 + ratios)
    return "\n".join(lines)


def main():
    args = parse_args()
    out = Path(args.out or ROOT / "runs" / "machine_class" / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    machine = this_machine()
    print(machine_report(machine, "cpu"), flush=True)
    smoke_run = smoke(out)
    train = training(args, out)
    ckpt = model_to_decode(args, out, smoke_run)
    cases = decoding(args, out, ckpt)
    versus = head_to_head(args, out, ckpt)
    isa = machine.cpu_isa.split(",")[0] + (" with capped kernels (the machine line)" if machine.isa_caps else "")
    summary = headline(f"{isa} ({machine.cpu_model}, {machine.threads} threads, {time.strftime('%Y-%m-%d')})",
                       smoke_run, train, cases, versus)
    (out / "headline.md").write_text(summary + "\n", encoding="utf-8")
    print(f"\n{summary}\n\n(also in {out / 'headline.md'})")


if __name__ == "__main__":
    main()
