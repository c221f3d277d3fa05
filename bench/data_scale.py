"""Corpus preparation at scale: peak memory, time, and a second run's start, for synthetic corpora of
growing size (issue #16).

Each corpus joins two random small_parallel_enja training pairs per pair ("a b" / "あ い"), so its
sentences differ and the tokenizer has real text to learn from; dev and test are the real ones. For
each size it runs, each in a fresh process (`data=files`, the project's own data settings):
  1. the preparation, as `run.py train` does it (TranslationDataModule.setup): wall time and the
     process's peak RSS;
  2. a second run over the same files: time from process start until the first training batch is ready,
     and the time one more epoch's batches take to deal.
With --prepare-workers 1 2 ... step 1 runs once per number of preparation processes (data.prepare_workers),
side by side; the peak memory is then also summed over the run's process tree (sampled every 0.1 s), and
the arrays of every run must be byte-identical.

    python bench/data_scale.py --data-url PATH/small_parallel_enja --sizes 250000 1000000 4000000 --work /tmp/scale \
        [--prepare-workers 1 2]
"""
import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

START = time.perf_counter()  # a child's clock starts before its imports


def make_corpus(source: Path, n_pairs: int, out: Path) -> None:
    """train.{en,ja}: n_pairs pairs, each two random real pairs joined; dev and test copied."""
    if (out / "done").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    en = (source / "train.en").read_text(encoding="utf-8").splitlines()
    ja = (source / "train.ja").read_text(encoding="utf-8").splitlines()
    rng = random.Random(n_pairs)
    with open(out / "train.en", "w", encoding="utf-8") as f_en, open(out / "train.ja", "w", encoding="utf-8") as f_ja:
        for _ in range(n_pairs):
            i, j = rng.randrange(len(en)), rng.randrange(len(en))
            f_en.write(f"{en[i]} {en[j]}\n")
            f_ja.write(f"{ja[i]} {ja[j]}\n")
    for split in ("dev", "test"):
        for lang in ("en", "ja"):
            (out / f"{split}.{lang}").write_bytes((source / f"{split}.{lang}").read_bytes())
    (out / "done").touch()


def child(corpus: Path, cache: Path, workers: int) -> None:
    """One run's data side: setup (prepare or open the cache), then the first training batch."""
    from hydra import compose, initialize_config_dir

    from seq2seq.config import build_config
    from seq2seq.corpora import DataConfig
    from seq2seq.datamodule import TranslationDataModule

    files = {f"{split}_{side}": str(corpus / f"{name}.{lang}") for split, name in (("train", "train"),
             ("valid", "dev"), ("test", "test")) for side, lang in (("src", "en"), ("tgt", "ja"))}
    overrides = ["data=files", "data.pretokenized=true", "data.normalize=false", f"data_dir={cache}", "output_dir=.",
                 f"data.prepare_workers={workers}"]
    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides + [f"data.{k}={v}" for k, v in files.items()])
    imported = time.perf_counter()
    datamodule = TranslationDataModule(build_config(DataConfig, cfg.data, "data"), cache / "cache", seed=0)
    datamodule.setup()
    set_up = time.perf_counter()
    loader = datamodule.train_dataloader()
    next(iter(loader))
    first_batch = time.perf_counter()
    loader.batch_sampler.batches()  # one more epoch's batches
    print(json.dumps({"imports_s": imported - START, "setup_s": set_up - imported, "first_batch_s": first_batch - START,
                      "epoch_batches_s": time.perf_counter() - first_batch,
                      "train_pairs": len(datamodule.datasets["train"])}))


def run_child(corpus: Path, cache: Path, workers: int = 0) -> dict:
    """The child's report plus its peak RSS (from the kernel's accounting of that one process) and the peak
    of the RSS summed over it and its preparation processes (psutil, sampled every 0.1 s)."""
    import threading

    import psutil

    proc = subprocess.Popen([sys.executable, __file__, "--child", str(corpus), str(cache), str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    tree_peak, done = [0], threading.Event()

    def sample():
        while not done.wait(0.1):
            try:
                parent = psutil.Process(proc.pid)
                tree_peak[0] = max(tree_peak[0], sum(p.memory_info().rss for p in [parent, *parent.children(True)]))
            except psutil.Error:
                pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    if status:
        raise SystemExit(f"preparing {corpus} failed (status {status})")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_mb": usage.ru_maxrss / 1024,
            "tree_rss_mb": tree_peak[0] / 2 ** 20}


def arrays_digest(cache: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted((cache / "cache").glob("*/*")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-url", help="small_parallel_enja's directory (train/dev/test .en/.ja)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[250_000, 1_000_000, 4_000_000])
    parser.add_argument("--work", default="/tmp/seq2seq-scale", help="where corpora and caches go")
    parser.add_argument("--prepare-workers", type=int, nargs="+", default=[0],
                        help="data.prepare_workers values to compare (0: one per core)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(Path(args.child[0]), Path(args.child[1]), int(args.child[2]))
    from seq2seq.hardware import machine_report, this_machine

    print(machine_report(this_machine()), flush=True)
    print(f"{'pairs':>9} {'workers':>7} {'kept':>9} {'prepare s':>9} {'s/M pairs':>9} {'vs first':>8} "
          f"{'peak RSS MB':>11} {'all procs MB':>12} {'2nd run: 1st batch s':>20} {'2nd run RSS MB':>14} "
          f"{'epoch batching s':>16} {'arrays':>12}", flush=True)
    for n in args.sizes:
        corpus = Path(args.work) / f"corpus-{n}"
        make_corpus(Path(args.data_url), n, corpus)
        base = None
        for workers in args.prepare_workers:
            cache = Path(args.work) / f"cache-{n}"
            subprocess.run(["rm", "-rf", str(cache)], check=True)
            first, second = run_child(corpus, cache, workers), run_child(corpus, cache, workers)
            base = base or first["setup_s"]
            print(f"{n:>9} {workers:>7} {first['train_pairs']:>9} {first['setup_s']:>9.1f} "
                  f"{first['setup_s'] / n * 1e6:>9.1f} {base / first['setup_s']:>7.2f}x {first['peak_rss_mb']:>11.0f} "
                  f"{first['tree_rss_mb']:>12.0f} {second['first_batch_s']:>20.1f} {second['peak_rss_mb']:>14.0f} "
                  f"{second.get('epoch_batches_s', float('nan')):>16.2f} {arrays_digest(cache):>12}", flush=True)


if __name__ == "__main__":
    main()
