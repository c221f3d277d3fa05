"""Decoding speed: seq2seq's batched beam search against Hugging Face MarianMTModel.generate and
CTranslate2.

Each system runs in its own process (so peak RSS is its own) on the small_parallel_enja test set
(500 sentences). Our model is the trained checkpoint, and CTranslate2 runs the same trained weights
(exported by `run.py export format=ctranslate2`, seq2seq/export.py), so their natural-length rows
compare directly, BLEU included. Marian has the same shape but random weights, so only the *forced-length* rows
(every system emits exactly --forced-len tokens per sentence) compare all three decoders. Every system runs at
several batch sizes, and the ratios compare each one's fastest (Marian's generate() is not fastest
at 64 sentences: 128 measured 24% faster at beam 5 bf16 in one run).

It prints the machine first. Each system runs at every precision it offers here (ours: 32, bf16, int8;
Marian: fp32, bf16 and torch's dynamic int8; CTranslate2: float32, int8) and is compared at its fastest.
bf16 is skipped on a CPU without native bf16, where it is emulated: its matmul measured 5x (AVX-512)
to 300x (AVX2) slower than fp32 (--all-precisions runs it anyway). Our precisions run interleaved, and
the last lines say what `precision=auto` picks on this machine and how it does against the fastest of
ours in each case (the goal: never more than 5% behind). The systems run in turn for --rounds rounds,
and each row reports its fastest round, so that a machine whose speed drifts (a VM) favours none of them.

    python bench/decode.py --ckpt runs/x/checkpoints/best.ckpt [--data-url PATH/small_parallel_enja] [--device cuda]
"""
import argparse
import copy
import functools
import importlib.util
import itertools
import json
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from seq2seq import Seq2SeqError
from seq2seq.hardware import keep_freed_memory, machine_report, synchronize, this_machine

CASES = [("greedy", 1), ("beam5", 5)]


def precisions(args) -> list[str]:
    """Ours, in our names: every one this device offers, bf16 only where it is native (or --all-precisions)."""
    from seq2seq.hardware import this_machine

    if args.device.startswith("cuda"):
        return ["bf16", "16", "32"]
    return ["32", "int8"] + (["bf16"] if this_machine().cpu_native_bf16 or args.all_precisions else [])


@functools.cache
def checkpoint_facts(ckpt: str) -> dict:
    """The checkpoint's own record (source language, model config), read once per process."""
    from seq2seq.checkpoint import load_checkpoint

    return load_checkpoint(ckpt)["seq2seq"]


def test_lines(data_url: str, ckpt: str) -> list[str]:
    """The test split's source side, in the checkpoint's source language."""
    src_lang = checkpoint_facts(ckpt)["data"]["src_lang"]
    return Path(data_url, f"test.{src_lang}").read_text(encoding="utf-8").splitlines()


def forced_ours(L: int) -> dict:
    """Our search settings for exactly L decoder steps: L - 1 tokens, then eos (as CTranslate2's and Marian's L)."""
    return dict(max_len_a=0, max_len_b=L - 1, min_len=L - 1)


def forced_ct2(L: int) -> dict:
    """CTranslate2's translate_batch settings for the same L steps."""
    return dict(min_decoding_length=L, max_decoding_length=L)


def ct2_source(tokenizer, lines: list[str]) -> list[list[str]]:
    """The lines as CTranslate2 takes them: our SentencePiece pieces, eos appended as our encoder sees it."""
    eos = tokenizer.pieces([tokenizer.eos_id])[0]
    return [tokenizer.pieces(ids) + [eos] for ids in tokenizer.encode(lines)]


def run_ours(args, lines) -> list[dict]:
    from seq2seq.metrics import corpus_scores
    from seq2seq.translator import Translator

    rows, L = [], args.forced_len
    translator = Translator.from_checkpoint(args.ckpt, device=args.device)
    refs = Path(args.data_url, f"test.{translator.info.tgt_lang}").read_text(encoding="utf-8").splitlines()
    for precision in precisions(args):
        translator.translate(lines[:32], beam_size=2, precision=precision, pretokenized=True)  # warm-up
    # precisions interleaved, so that a machine that drifts in speed (a VM) tilts none of them
    for (name, beam), max_tokens, precision in itertools.product(CASES, args.budgets, precisions(args)):
        start = time.perf_counter()
        hyps = translator.translate(lines, beam_size=beam, max_tokens=max_tokens, precision=precision,
                                    pretokenized=True)  # the test split is in the corpus's form
        seconds = time.perf_counter() - start
        n_tok = sum(len(ids) + 1 for ids in translator.tokenizer.encode(hyps))
        bleu = corpus_scores(hyps, refs[:len(lines)], translator.info.bleu_tokenize)["bleu"]
        rows.append(dict(system=f"seq2seq {precision}", case=name, batch=f"{max_tokens} tok",
                         seconds=seconds, sentences=len(lines), tokens=n_tok, bleu=bleu))
        start = time.perf_counter()
        translator.translate(lines, beam_size=beam, max_tokens=max_tokens, precision=precision, pretokenized=True,
                             **forced_ours(L))
        rows.append(dict(system=f"seq2seq {precision}", case=f"{name} forced {L}", batch=f"{max_tokens} tok",
                         seconds=time.perf_counter() - start, sentences=len(lines), tokens=L * len(lines)))
    return rows


def run_ctranslate2(args, lines) -> list[dict]:
    import tempfile

    import ctranslate2

    from seq2seq.export import export_ctranslate2 as export
    from seq2seq.checkpoint import load_model
    from seq2seq.metrics import corpus_scores

    _, tokenizer, info = load_model(args.ckpt)
    source = ct2_source(tokenizer, lines)
    refs = Path(args.data_url, f"test.{info.tgt_lang}").read_text(encoding="utf-8").splitlines()[:len(lines)]
    rows = []
    with tempfile.TemporaryDirectory() as model_dir:
        export(args.ckpt, model_dir)
        L = args.forced_len
        gpu = args.device.startswith("cuda")
        for compute_type in ("float32", "bfloat16", "int8_float16") if gpu else ("float32", "int8"):
            translator = ctranslate2.Translator(model_dir, device="cuda" if gpu else "cpu", compute_type=compute_type,
                                                inter_threads=1, intra_threads=torch.get_num_threads())
            for (name, beam), budget in itertools.product(CASES, args.budgets):
                start = time.perf_counter()
                out = translator.translate_batch(source, beam_size=beam, max_batch_size=budget, batch_type="tokens")
                seconds = time.perf_counter() - start
                hyps = [tokenizer.sp.decode_pieces(r.hypotheses[0]) for r in out]
                bleu = corpus_scores(hyps, refs, info.bleu_tokenize)["bleu"]
                rows.append(dict(system=f"CT2 {compute_type}", case=name, batch=f"{budget} tok", seconds=seconds,
                                 sentences=len(lines), tokens=sum(len(r.hypotheses[0]) + 1 for r in out), bleu=bleu))
                start = time.perf_counter()
                translator.translate_batch(source, beam_size=beam, max_batch_size=budget, batch_type="tokens",
                                           **forced_ct2(L))
                rows.append(dict(system=f"CT2 {compute_type}", case=f"{name} forced {L}", batch=f"{budget} tok",
                                 seconds=time.perf_counter() - start, sentences=len(lines), tokens=L * len(lines)))
    return rows


def run_marian(args, lines) -> list[dict]:
    from transformers import MarianConfig, MarianMTModel

    from seq2seq.checkpoint import load_model

    model, tokenizer, _ = load_model(args.ckpt)
    m = model.cfg
    config = MarianConfig(
        vocab_size=m.vocab_size, decoder_vocab_size=m.vocab_size, d_model=m.d_model, encoder_layers=m.n_enc_layers,
        decoder_layers=m.n_dec_layers, encoder_attention_heads=m.n_heads, decoder_attention_heads=m.n_heads,
        encoder_ffn_dim=m.d_ff, decoder_ffn_dim=m.d_ff, activation_function="relu", max_position_embeddings=m.max_len,
        pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id, decoder_start_token_id=tokenizer.bos_id,
        scale_embedding=True, share_encoder_decoder_embeddings=True, tie_word_embeddings=True)
    marian = MarianMTModel(config).eval().to(args.device)
    versions = {"32": marian}
    if args.device.startswith("cuda") or "bf16" in precisions(args):
        versions["bf16"] = marian
    if not args.device.startswith("cuda"):  # its int8: the same dynamic quantization our int8 uses
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
        versions["int8"] = quantize_dynamic(copy.deepcopy(marian), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                            dtype=torch.qint8)
    ids = [seq + [tokenizer.eos_id] for seq in tokenizer.encode(lines)]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # the same length-sorting advantage as ours
    rows = []
    L = args.forced_len
    for (precision, model), (name, beam), batch_size in itertools.product(versions.items(), CASES,
                                                                          args.marian_batches):
        start = time.perf_counter()
        for b in range(0, len(order), batch_size):
            batch = [ids[i] for i in order[b:b + batch_size]]
            src = torch.full((len(batch), max(map(len, batch))), tokenizer.pad_id, device=args.device)
            for r, seq in enumerate(batch):
                src[r, :len(seq)] = torch.tensor(seq)
            with torch.no_grad(), (torch.autocast(src.device.type, dtype=torch.bfloat16) if precision == "bf16"
                                   else nullcontext()):
                model.generate(input_ids=src, attention_mask=src.ne(tokenizer.pad_id), num_beams=beam,
                                do_sample=False, min_new_tokens=L, max_new_tokens=L)
        synchronize(args.device)
        rows.append(dict(system=f"Marian {precision}", case=f"{name} forced {L}", batch=f"{batch_size} sent",
                         seconds=time.perf_counter() - start, sentences=len(lines), tokens=L * len(lines)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data-url", default="../shared/data/small_parallel_enja")
    parser.add_argument("--budgets", type=int, nargs="+", default=[1024, 4096, 16384],
                        help="batch budgets (tokens) of seq2seq and CTranslate2")
    parser.add_argument("--marian-batches", type=int, nargs="+", default=[32, 64, 128, 256],
                        help="sentences per generate() call; each system's best batch is the one compared")
    parser.add_argument("--forced-len", type=int, default=20)
    parser.add_argument("--limit", type=int, default=None, help="only the first N test sentences")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--all-precisions", action="store_true", help="bf16 even where it is emulated")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of all systems, one after another; each row reports its fastest round")
    parser.add_argument("--child", choices=["seq2seq", "marian", "ctranslate2"])
    args = parser.parse_args()
    lines = test_lines(args.data_url, args.ckpt)[:args.limit]
    if args.child:
        keep_freed_memory()  # every system with the malloc the machine line names, not ours alone
        rows = {"seq2seq": run_ours, "marian": run_marian, "ctranslate2": run_ctranslate2}[args.child](args, lines)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps([dict(r, peak_rss_mb=rss) for r in rows]))
        return
    print(machine_report(this_machine(), args.device), flush=True)
    if not (args.device.startswith("cuda") or this_machine().cpu_native_bf16 or args.all_precisions):
        print(f"bf16 rows skipped: this CPU has no native bf16 ({this_machine().cpu_isa}), where bf16 is emulated, "
              "several to hundreds of times slower than fp32 (--all-precisions runs them anyway)")
    children = ["seq2seq", "marian"]
    if importlib.util.find_spec("ctranslate2"):
        children.append("ctranslate2")
    else:
        print("CTranslate2 is not installed (pip install ctranslate2): its rows are left out", file=sys.stderr)
    rounds = [run_children(children, args) for _ in range(args.rounds)]  # systems alternate, round after round
    rows = fastest_rounds(rounds)
    print(f"{len(lines)} sentences, {torch.get_num_threads()} threads, device {args.device}, "
          f"each row the fastest of {args.rounds} rounds\n")
    print(f"{'system':<14} {'case':<18} {'batch':<10} {'sent/s':>8} {'tok/s':>8} {'BLEU':>6} {'peak RSS MB':>12}")
    for r in rows:
        bleu = f"{r['bleu']:.2f}" if "bleu" in r else ""
        print(f"{r['system']:<14} {r['case']:<18} {r['batch']:<10} {sentences_per_s(r):>8.1f} "
              f"{r['tokens'] / r['seconds']:>8.0f} {bleu:>6} {r['peak_rss_mb']:>12.0f}")
    print()
    for name, _ in CASES:
        for case in (f"{name} forced {args.forced_len}", name):
            best = {}  # each system's fastest precision and batch size for this case
            for peer in ["seq2seq", "Marian"] + sorted({r["system"] for r in rows if r["system"].startswith("CT2")}):
                candidates = [r for r in rows if r["case"] == case and r["system"].startswith(peer)]
                if candidates:
                    best[peer] = max(candidates, key=sentences_per_s)
            ours = best.pop("seq2seq")
            print(f"{case}: best seq2seq ({ours['system']}, {ours['batch']}) / " + (", ".join(
                f"{peer} ({r['system']}, {r['batch']}) = {sentences_per_s(ours) / sentences_per_s(r):.2f}x"
                for peer, r in best.items()) or "no peer measured in this case"))
    print()
    auto_against_explicit(rows, args)


def run_children(children: list[str], args) -> list[dict]:
    """One round: each system in its own process, one after another; their rows. A peer that fails (a
    CTranslate2 wheel built for another CUDA than the machine's, say) is left out of this and later rounds,
    with its error's last line; ours failing ends the bench."""
    rows = []
    for child in list(children):
        proc = subprocess.run([sys.executable, __file__, "--child", child, *sys.argv[1:]], capture_output=True,
                              text=True)
        if proc.returncode and child == "seq2seq":
            sys.exit(f"{child} failed:\n{proc.stderr[-2000:]}")
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"{child} failed, its rows are left out: {last}", file=sys.stderr, flush=True)
            children.remove(child)
            continue
        rows += json.loads(proc.stdout.strip().splitlines()[-1])
    return rows


def fastest_rounds(rounds: list[list[dict]]) -> list[dict]:
    """Each row (system, case, batch) at its fastest round, with the largest peak RSS of its rounds. A VM's
    speed drifts by up to 30% within minutes (measured: two runs minutes apart put our greedy at 0.57x and
    0.89x CTranslate2 int8), and the systems run one after another: the fastest round of each is the one
    least slowed by the machine."""
    best: dict[tuple, dict] = {}
    for row in itertools.chain.from_iterable(rounds):
        key = (row["system"], row["case"], row["batch"])
        kept = best.get(key, row)
        peak = max(kept["peak_rss_mb"], row["peak_rss_mb"])
        best[key] = dict(max(kept, row, key=sentences_per_s), peak_rss_mb=peak)
    return list(best.values())


def auto_against_explicit(rows: list[dict], args) -> None:
    """What `precision=auto` picks here, and its speed over the fastest precision of ours, per case (the
    goal: never more than 5% behind); each precision at its best batch budget."""
    from seq2seq.hardware import choose_precision

    d_model = checkpoint_facts(args.ckpt)["model_config"]["d_model"]
    auto, reason = choose_precision("auto", torch.device(args.device).type, training=False, machine=this_machine(),
                                    d_model=d_model)
    print(f"precision=auto decodes at {auto} here: {reason}")
    for case in dict.fromkeys(r["case"] for r in rows if r["system"].startswith("seq2seq")):
        speed = {}  # precision -> its best sentences/s in this case
        for r in rows:
            if r["case"] == case and r["system"].startswith("seq2seq "):
                precision = r["system"].removeprefix("seq2seq ")
                speed[precision] = max(speed.get(precision, 0.0), sentences_per_s(r))
        fastest = max(speed, key=speed.get)
        ratio = f"{speed[auto] / speed[fastest]:.2f}x" if auto in speed else "not measured"
        print(f"{case}: auto ({auto}) / fastest ({fastest}) = {ratio}; " + ", ".join(
            f"{p} {v / speed[fastest]:.2f}x" for p, v in speed.items()))


def sentences_per_s(row: dict) -> float:
    return row["sentences"] / row["seconds"]


if __name__ == "__main__":
    try:
        main()
    except Seq2SeqError as e:  # a checkpoint or corpus it cannot use: one line, not a traceback
        sys.exit(f"error: {e}")
