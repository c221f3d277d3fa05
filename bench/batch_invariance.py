"""Does a line's translation depend on the lines batched with it? Ours at each CPU precision, and CTranslate2.

Translates the first --lines test sentences in batches of --max-tokens (as `run.py translate` does),
then again each line alone, in batches of --small-tokens, and in 20 random batches of 32 lines (as a
service batches the requests that arrive together); prints how many translations differ from the
first. A translation toolkit should print 0 everywhere: a user who translates the same sentence twice
expects the same answer, whatever else was translated with it.

    python bench/batch_invariance.py --ckpt runs/x/checkpoints/best.ckpt --data-url PATH/small_parallel_enja
"""
import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import ct2_source  # noqa: E402  (bench/: no package)

from seq2seq.hardware import machine_report, this_machine  # noqa: E402


def ours(args, lines) -> list[tuple[str, int, int]]:
    from seq2seq.translator import Translator

    translator = Translator.from_checkpoint(args.ckpt, device="cpu")
    rows = []
    precisions = ["32", "int8"] + (["bf16"] if this_machine().cpu_native_bf16 else [])
    for precision in precisions:
        def run(batch, max_tokens=args.max_tokens):
            return translator.translate(batch, beam_size=args.beam_size, max_tokens=max_tokens, precision=precision,
                                        pretokenized=True)
        rows.append((f"seq2seq {precision}", *compare(run, lines, args.small_tokens)))
    return rows


def ctranslate2_rows(args, lines) -> list[tuple[str, int, int]]:
    try:
        import ctranslate2
    except ImportError:
        print("CTranslate2 is not installed (pip install ctranslate2): its rows are left out")
        return []
    from seq2seq.checkpoint import load_model
    from seq2seq.export import export_ctranslate2

    _, tokenizer, _ = load_model(args.ckpt)
    source = ct2_source(tokenizer, lines)
    rows = []
    with tempfile.TemporaryDirectory() as model_dir:
        export_ctranslate2(args.ckpt, model_dir)
        for compute_type in ("float32", "int8"):
            translator = ctranslate2.Translator(model_dir, device="cpu", compute_type=compute_type,
                                                intra_threads=torch.get_num_threads())

            def run(batch, max_tokens=args.max_tokens):
                out = translator.translate_batch(batch, beam_size=args.beam_size, max_batch_size=max_tokens,
                                                 batch_type="tokens")
                return [r.hypotheses[0] for r in out]
            rows.append((f"CT2 {compute_type}", *compare(run, source, args.small_tokens)))
    return rows


def compare(run, lines: list, small_tokens: int) -> tuple[int, int, int]:
    """Translations unlike those of `run(lines)`: each line alone, in small batches, in random batches of 32."""
    batched = run(lines)
    alone = sum(run([line])[0] != out for line, out in zip(lines, batched))
    small = sum(a != b for a, b in zip(run(lines, small_tokens), batched))
    rng, mixed = random.Random(0), 0
    for _ in range(20):
        picked = rng.sample(range(len(lines)), min(32, len(lines)))
        mixed += sum(out != batched[i] for out, i in zip(run([lines[i] for i in picked]), picked))
    return alone, small, mixed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data-url", required=True, help="small_parallel_enja's directory (its test split)")
    parser.add_argument("--lines", type=int, default=300)
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--small-tokens", type=int, default=256)
    args = parser.parse_args()
    print(machine_report(this_machine()), flush=True)
    from seq2seq.checkpoint import load_checkpoint

    src_lang = load_checkpoint(args.ckpt)["seq2seq"]["data"]["src_lang"]
    lines = Path(args.data_url, f"test.{src_lang}").read_text(encoding="utf-8").splitlines()[:args.lines]
    rows = ours(args, lines) + ctranslate2_rows(args, lines)
    print(f"\n{len(lines)} test lines, beam {args.beam_size}; lines unlike the translation in {args.max_tokens}-token "
          "batches")
    print(f"| system | translated alone | in {args.small_tokens}-token batches | in 20 random batches of 32 |")
    print("|---|---:|---:|---:|")
    for name, alone, small, mixed in rows:
        print(f"| {name} | {alone} of {len(lines)} | {small} of {len(lines)} | {mixed} of {20 * min(32, len(lines))} |")


if __name__ == "__main__":
    main()
