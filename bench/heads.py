"""Which heads matter, over many sentences: every head switched off in turn (seq2seq.explain.head_importance),
teacher-forced on the test split's references, and what each head attends to (attention_profiles).

Prints one markdown table: the drop in log P(reference token) per target token (nats, the mean over
every target token of the first --n test pairs) for each kind of attention as a whole, then the
--top heads that hurt most and the --bottom that hurt least, each with its attention profile averaged
over the same pairs. docs/attention.md quotes it.

    python bench/heads.py --ckpt runs/x/checkpoints/best.ckpt --data-url PATH/small_parallel_enja [--n 100]
"""
import argparse
import time
from pathlib import Path

import torch

from seq2seq.explain import PROFILE, attention_profiles, head_importance
from seq2seq.hardware import machine_report, this_machine
from seq2seq.translator import Translator


def pairs(translator: Translator, data_url: str, n: int) -> list[tuple[list[int], list[int]]]:
    """The first n test pairs in the checkpoint's direction, encoded as the model reads them."""
    info = translator.info
    read = lambda lang: Path(data_url, f"test.{lang}").read_text(encoding="utf-8").splitlines()[:n]  # noqa: E731
    limit = translator.model.cfg.max_len - 1
    src = translator.tokenizer.encode(translator.prepare(read(info.src_lang), pretokenized=True))
    tgt = translator.tokenizer.encode(translator.prepare(read(info.tgt_lang), pretokenized=True, side="tgt"))
    return [(s[:limit], t[:limit]) for s, t in zip(src, tgt) if s and t]


def describe(profile: dict[str, float], kind: str) -> str:
    marker = "<s>" if kind == "decoder" else "</s>"
    parts = [f"strongest key {profile['peak']:.0%}"]
    if kind != "cross":
        parts += [f"itself {profile['self']:.0%}", f"the one before {profile['previous']:.0%}"]
    return ", ".join(parts + [f"`{marker}` {profile['marker']:.0%}", f"entropy {profile['entropy']:.2f}"])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data-url", required=True, help="folder with test.en and test.ja")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--top", type=int, default=6)
    p.add_argument("--bottom", type=int, default=2)
    args = p.parse_args()
    print(machine_report(this_machine()))
    torch.set_grad_enabled(False)
    translator = Translator.from_checkpoint(args.ckpt)
    started, total, tokens, profiles = time.perf_counter(), None, 0, {}
    data = pairs(translator, args.data_url, args.n)
    for src_ids, tgt_ids in data:
        labels, drops = head_importance(translator.model, src_ids, tgt_ids)  # (rows, T)
        total = drops.sum(-1) if total is None else total + drops.sum(-1)
        tokens += drops.shape[1]
        for name, profile in attention_profiles(translator.model, src_ids, tgt_ids).items():
            for key in PROFILE:
                profiles.setdefault(name, dict.fromkeys(PROFILE, 0.0))[key] += profile[key] / len(data)
    mean = dict(zip(labels, (total / tokens).tolist()))
    print(f"{len(data)} pairs, {tokens} target tokens, {time.perf_counter() - started:.1f} s\n")
    kinds = [name for name in labels if name.startswith("all ")]
    heads = sorted((name for name in labels if name not in kinds), key=mean.get, reverse=True)
    print("| switched off | mean drop (nats/token) | what it attends to |\n|---|---:|---|")
    for name in kinds + heads[:args.top] + heads[-args.bottom:]:
        profile = describe(profiles[name], name.split()[0]) if name in profiles else ""
        print(f"| {name} | {mean[name]:.3f} | {profile} |")


if __name__ == "__main__":
    main()
