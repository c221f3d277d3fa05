"""`run.py report SWEEP_DIR`: one table (markdown + CSV) and plots for a Hydra multirun directory."""
import csv
import json
import math
import sys
from pathlib import Path

import yaml

from seq2seq import Seq2SeqError

METRICS = ["val/bleu", "test/bleu", "test/chrf", "n_params", "train_time_s"]


def read_runs(sweep_dir: Path) -> list[dict]:
    """Every job directory of the sweep: its overrides, status and results (if any)."""
    runs = []
    for job in sorted((p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").exists()),
                      key=lambda p: int(p.name) if p.name.isdigit() else p.name):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
        params = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
        results_file, error_file = job / "results.json", job / "error.txt"
        if results_file.exists():
            status, results = "done", json.loads(results_file.read_text())
        elif error_file.exists():
            status, results = "failed: " + error_file.read_text().strip()[:80], {}
        else:
            status, results = "running (or killed)", {}
        runs.append({"job": job.name, "dir": job, "params": params, "status": status, "results": results})
    if not runs:
        raise Seq2SeqError(f"{sweep_dir}: no Hydra jobs here (expected subfolders with .hydra/overrides.yaml)")
    return runs


def swept_keys(runs: list[dict]) -> list[str]:
    """The override keys whose values differ between jobs, in the order they were given."""
    keys = [k for run in runs for k in run["params"]]
    return [k for k in dict.fromkeys(keys) if len({run["params"].get(k) for run in runs}) > 1]


def fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def table(runs: list[dict], keys: list[str]) -> tuple[list[str], list[list[str]]]:
    """Rows sorted by val/bleu (best first); runs without results last, in job order."""
    def order(run):
        bleu = run["results"].get("val/bleu")
        return (bleu is None or math.isnan(bleu), -(bleu or 0.0))
    header = ["job", *keys, *METRICS, "status"]
    rows = [[run["job"], *(run["params"].get(k, "") for k in keys), *(fmt(run["results"].get(m)) for m in METRICS),
             run["status"]] for run in sorted(runs, key=order)]
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def plot(runs: list[dict], keys: list[str], out: Path) -> list[Path]:
    """BLEU against each swept parameter, and dev BLEU learning curves from the CSV logs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    done = [run for run in runs if run["status"] == "done"]
    for key in keys:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        points = sorted((run["params"][key], run["results"].get("val/bleu"), run["results"].get("test/bleu"))
                        for run in done if key in run["params"])
        labels = [p[0] for p in points]
        ax.plot(labels, [p[1] for p in points], "o-", label="val/bleu")
        ax.plot(labels, [p[2] for p in points], "s--", label="test/bleu")
        ax.set_xlabel(key)
        ax.set_ylabel("BLEU")
        ax.legend()
        fig.tight_layout()
        written.append(out / f"bleu_vs_{key.replace('/', '_')}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        for metrics in (run["dir"] / "csv").glob("version_*/metrics.csv"):
            with open(metrics) as f:
                points = [(int(r["step"]), float(r["val/bleu"])) for r in csv.DictReader(f) if r.get("val/bleu")]
            if points:
                label = " ".join(f"{k}={run['params'].get(k)}" for k in keys) or run["job"]
                ax.plot(*zip(*points), marker=".", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("val/bleu")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "learning_curves.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def report(argv: list[str]) -> None:
    if len(argv) != 1:
        raise Seq2SeqError("usage: python run.py report SWEEP_DIR (a Hydra multirun directory)")
    sweep_dir = Path(argv[0])
    if not sweep_dir.is_dir():
        raise Seq2SeqError(f"{sweep_dir}: not a directory")
    runs = read_runs(sweep_dir)
    keys = swept_keys(runs)
    header, rows = table(runs, keys)
    text = markdown(header, rows)
    (sweep_dir / "report.md").write_text(text, encoding="utf-8")
    with open(sweep_dir / "report.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    plots = plot(runs, keys, sweep_dir)
    sys.stdout.write(text)
    print(f"\nwrote {sweep_dir / 'report.md'}, report.csv, " + ", ".join(p.name for p in plots), file=sys.stderr)
