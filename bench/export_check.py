"""Export round trips: a checkpoint exported by `run.py export` to Hugging Face (MarianMTModel) and to
CTranslate2, each decoding the small_parallel_enja test split greedily beside our own search.

Prints the machine, then per runtime how many of the sentences come out identical to ours, token for
token, and its time as a ratio to ours (fp32, one process, the same trained weights: the outputs are
the same, so this is a like-for-like speed comparison at natural length). Needs a post-norm model
for Hugging Face (model.pre_norm=false); a pre-norm one checks CTranslate2 only.

    python bench/export_check.py --ckpt runs/x/checkpoints/best.ckpt --data-url PATH/small_parallel_enja
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch

from seq2seq.export import export_ctranslate2, export_huggingface
from seq2seq.hardware import machine_report, this_machine


def up_to_eos(rows: list[list[int]], eos: int) -> list[list[int]]:
    return [row[:row.index(eos)] if eos in row else row for row in rows]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data-url", required=True, help="a directory with test.en (small_parallel_enja's layout)")
    parser.add_argument("--batch", type=int, default=64, help="sentences per batch, every runtime")
    parser.add_argument("--max-tokens", type=int, default=100,
                        help="every runtime stops a translation after this many tokens (before eos)")
    args = parser.parse_args()
    print(machine_report(this_machine()), flush=True)

    from seq2seq.search import SearchConfig, greedy_search
    from seq2seq.translator import Translator, pad_batch

    translator = Translator.from_checkpoint(args.ckpt, device="cpu")
    tok, cfg = translator.tokenizer, translator.model.cfg
    src_lang = translator.info.src_lang
    lines = translator.prepare(Path(args.data_url, f"test.{src_lang}").read_text(encoding="utf-8").splitlines(),
                               pretokenized=True)
    ids = translator.encode(lines)
    batches = [range(i, min(i + args.batch, len(ids))) for i in range(0, len(ids), args.batch)]
    L = min(args.max_tokens, cfg.max_len - 1)
    search = SearchConfig(beam_size=1, max_len_a=0, max_len_b=L)  # one limit for all: L tokens, then eos

    def ours():
        out = []
        for rows in batches:
            src = pad_batch([ids[r] for r in rows])
            out += greedy_search(translator.model, src, translator.model.pad_mask(src), search)[0].tolist()
        return up_to_eos(out, tok.eos_id)

    with torch.inference_mode():
        ours()  # warm-up
        reference, our_s = timed(ours)
    print(f"\n{len(lines)} sentences, greedy, fp32, batches of {args.batch}, at most {L} tokens; "
          f"{cfg.n_enc_layers}+{cfg.n_dec_layers} "
          f"layers, d_model {cfg.d_model}, {'pre' if cfg.pre_norm else 'post'}-norm")
    print(f"{'runtime':<28} {'identical':>10} {'seconds':>8} {'time vs ours':>12}")
    print(f"{'seq2seq (ours)':<28} {len(lines):>5}/{len(lines):<4} {our_s:>8.2f} {1.0:>12.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        if not cfg.pre_norm:
            from transformers import MarianMTModel, MarianTokenizer

            export_huggingface(args.ckpt, str(Path(tmp, "hf")))
            hf_tok, hf = (cls.from_pretrained(Path(tmp, "hf")) for cls in (MarianTokenizer, MarianMTModel))
            assert hf_tok(lines[:50])["input_ids"] == [seq + [tok.eos_id] for seq in ids[:50]], \
                "MarianTokenizer ids differ"

            def marian():
                out = []
                for rows in batches:
                    inputs = hf_tok([lines[r] for r in rows], return_tensors="pt", padding=True)
                    generated = hf.eval().generate(**inputs, num_beams=1, do_sample=False,
                                                   max_length=L + 2)  # start, L tokens, eos
                    out += generated[:, 1:].tolist()
                return up_to_eos(out, tok.eos_id)

            with torch.inference_mode():
                marian()
                theirs, seconds = timed(marian)
            same = sum(a == b for a, b in zip(theirs, reference))
            print(f"{'HF MarianMTModel.generate':<28} {same:>5}/{len(lines):<4} {seconds:>8.2f} "
                  f"{seconds / our_s:>12.2f}")
        import ctranslate2

        export_ctranslate2(args.ckpt, str(Path(tmp, "ct2")))
        ct2 = ctranslate2.Translator(str(Path(tmp, "ct2")), device="cpu", compute_type="float32",
                                     intra_threads=torch.get_num_threads())
        pieces = [tok.pieces(seq) + ["</s>"] for seq in ids]

        def ctranslate():
            results = ct2.translate_batch(pieces, max_batch_size=args.batch, beam_size=1,
                                          max_decoding_length=L)  # L tokens (CTranslate2 does not count eos)
            return [[tok.sp.piece_to_id(p) for p in r.hypotheses[0]] for r in results]

        ctranslate()
        theirs, seconds = timed(ctranslate)
        same = sum(a == b for a, b in zip(theirs, reference))
        print(f"{'CTranslate2 float32':<28} {same:>5}/{len(lines):<4} {seconds:>8.2f} {seconds / our_s:>12.2f}")


if __name__ == "__main__":
    main()
