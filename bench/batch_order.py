"""Padding and speed of the training batches by their order: pairs sorted by size alone against size,
then source length, then target length (what `ParallelDataset.sampler` does). Our model trains on the
first `--steps` batches of one epoch of each order, the two interleaved for `--rounds`, in one process;
it prints real (non-pad) tokens per second and the ratio. It prints the machine first.

    python bench/batch_order.py --data-url PATH/small_parallel_enja [--steps 40] [--rounds 3]
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from hydra import compose, initialize_config_dir
from train import CONF, ours, train_steps  # bench/train.py: our model, optimizer and timed steps

from seq2seq.config import build_config
from seq2seq.corpora import DataConfig
from seq2seq.data import LengthOrderSampler, TokenBatchSampler, collate
from seq2seq.datamodule import TranslationDataModule
from seq2seq.hardware import machine_report, this_machine


def first_batches(dataset, sampler, max_tokens: int, steps: int) -> list[dict]:
    """The first `steps` training batches of epoch 0 in the sampler's order, padded as training pads them."""
    return [collate([dataset[i] for i in batch]) for batch in TokenBatchSampler(sampler, max_tokens).batches()[:steps]]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-url", required=True, help="small_parallel_enja: a directory, file:// or https://")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--model", default="small")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(machine_report(this_machine(), "cpu"))
    url = Path(args.data_url).resolve().as_uri() if "://" not in args.data_url else args.data_url
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={args.model}", "data=small_enja", f"data.url={url}",
                                          f"data_dir={args.data_dir}", "output_dir=."])
    datamodule = TranslationDataModule(build_config(DataConfig, cfg.data, "data"), Path(cfg.data_dir) / "cache",
                                       seed=cfg.seed)
    datamodule.setup()
    train, max_tokens = datamodule.datasets["train"], cfg.data.max_tokens
    size_only = LengthOrderSampler(train.sizes, True, cfg.seed)
    orders = {"size only": first_batches(train, size_only, max_tokens, args.steps),
              "size, src, tgt": first_batches(train, train.sampler(True, cfg.seed), max_tokens, args.steps)}
    model, loss_fn, optimizer = ours(cfg, datamodule.tokenizer, "cpu")
    train_steps(model, loss_fn, optimizer, orders["size only"][:3], False, "cpu")  # warm-up
    times = {name: [] for name in orders}
    for _ in range(args.rounds):
        for name, batches in orders.items():
            times[name].append(train_steps(model, loss_fn, optimizer, batches, False, "cpu"))
    print(f"model={args.model}, fp32, {args.steps} batches of max_tokens={cfg.data.max_tokens} per order, "
          f"best of {args.rounds} rounds")
    speed = {}
    for name, batches in orders.items():
        real = sum(b["n_tokens"] for b in batches)
        padded = sum(b["src"].numel() + b["tgt_out"].numel() for b in batches)
        speed[name] = real / min(times[name])
        print(f"{name:15s} real tokens {real:8,d} ({real / padded:.0%} of padded)  "
              f"{min(times[name]) / args.steps:.3f} s/step  {speed[name]:7.0f} real tokens/s")
    print(f"size, src, tgt / size only: {speed['size, src, tgt'] / speed['size only']:.2f}x")


if __name__ == "__main__":
    main()
