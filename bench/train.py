"""Training throughput: seq2seq's Transformer against Hugging Face MarianMTModel of the same shape.

Both train on the very same batches (our token-budget batches of small_parallel_enja, or of the
generated demo corpus with --data demo); the number that matters is real (non-pad) source+target
tokens per second, printed with the ratio and the fraction of the machine's measured matmul peak
each step reaches. It prints the machine first. Each system runs in fp32 and in bf16 autocast and is
compared at its faster one; bf16 is skipped on a CPU without native bf16, where it is emulated:
its matmul measured 5x (AVX-512) to 300x (AVX2) slower than fp32 (--all-precisions runs it anyway).
The last line says what `precision=auto` trains at on this machine, against the fastest of ours.

    python bench/train.py --data-url PATH/small_parallel_enja [--steps 20] [--model small] [--device cuda]
"""
import argparse
import itertools
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch.utils.flop_counter import FlopCounterMode

from seq2seq.config import build_config
from seq2seq.corpora import DataConfig
from seq2seq.datamodule import TranslationDataModule
from seq2seq.hardware import choose_precision, machine_report, matmul_peak, synchronize, this_machine
from seq2seq.lit_module import OptimConfig, TranslationModule
from seq2seq.model import ModelConfig, Transformer

CONF = Path(__file__).resolve().parents[1] / "conf"


def ours(cfg, tokenizer, device: str):
    model = Transformer(ModelConfig(**cfg.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id))
    module = TranslationModule(model, tokenizer, OptimConfig(**cfg.optim), None).to(device)
    optimizer = module.configure_optimizers()["optimizer"]  # the one `run.py train` uses
    return model, lambda batch: module.loss(batch, cfg.optim.label_smoothing)[0], optimizer


def marian(cfg, tokenizer, attn_implementation: str, device: str):
    from transformers import MarianConfig, MarianMTModel

    m = cfg.model
    config = MarianConfig(
        vocab_size=tokenizer.vocab_size, decoder_vocab_size=tokenizer.vocab_size, d_model=m.d_model,
        encoder_layers=m.n_enc_layers, decoder_layers=m.n_dec_layers, encoder_attention_heads=m.n_heads,
        decoder_attention_heads=m.n_heads, encoder_ffn_dim=m.d_ff, decoder_ffn_dim=m.d_ff,
        activation_function="relu", dropout=m.dropout, attention_dropout=0.0, activation_dropout=0.0,
        max_position_embeddings=m.max_len, pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id,
        decoder_start_token_id=tokenizer.bos_id, scale_embedding=True, share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True, attn_implementation=attn_implementation)
    model = MarianMTModel(config).to(device)

    def loss(batch):
        logits = model(input_ids=batch["src"], attention_mask=batch["src"].ne(tokenizer.pad_id),
                       decoder_input_ids=batch["tgt_in"]).logits  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["tgt_out"].flatten(),
                               ignore_index=tokenizer.pad_id, label_smoothing=cfg.optim.label_smoothing)
    # its fastest optimizer too (the Trainer's optim="adamw_torch_fused")
    return model, loss, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def train_steps(model, loss_fn, optimizer, batches, bf16: bool, device: str) -> float:
    """Seconds for one optimizer step per batch: forward, backward, clip, AdamW."""
    model.train()
    synchronize(device)
    start = time.perf_counter()
    for batch in batches:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - start


def step_flops(model, loss_fn, batch) -> int:
    with FlopCounterMode(display=False) as counter:
        loss_fn(batch).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["small_enja", "demo"], default="small_enja")
    parser.add_argument("--data-url", default="../shared/data/small_parallel_enja", help="for --data small_enja")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--model", default="small")
    parser.add_argument("--max-tokens", type=int, default=None, help="batch budget (default: the data preset's)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per system and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--all-precisions", action="store_true", help="bf16 even where it is emulated")
    return parser.parse_args()


def load_batches(args):
    """The config, the tokenizer, 3 warm-up batches and `args.steps` timed ones, on the device."""
    data = [f"data={args.data}"] + ([f"data.url={Path(args.data_url).resolve().as_uri()}"]
                                    if args.data == "small_enja" else [])
    data += [f"data.max_tokens={args.max_tokens}"] if args.max_tokens else []
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={args.model}", *data, f"data_dir={args.data_dir}", "output_dir=."])
    datamodule = TranslationDataModule(build_config(DataConfig, cfg.data, "data"), Path(cfg.data_dir) / "cache",
                                       seed=cfg.seed)
    datamodule.setup()
    loader = (batch for _ in itertools.count() for batch in datamodule.train_dataloader())  # epoch after epoch
    to_device = lambda b: {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in b.items()}  # noqa: E731
    warmup = [to_device(next(loader)) for _ in range(3)]
    batches = [to_device(next(loader)) for _ in range(args.steps)]
    return cfg, datamodule.tokenizer, warmup, batches


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    machine = this_machine()
    print(machine_report(machine, args.device))
    cfg, tokenizer, warmup, batches = load_batches(args)
    n_tokens = sum(b["n_tokens"] for b in batches)
    n_padded = sum(b["src"].numel() + b["tgt_out"].numel() for b in batches)
    print(f"batches: {args.steps} x max_tokens={cfg.data.max_tokens} of {args.data}, {n_tokens} real tokens "
          f"({n_tokens / n_padded:.0%} of padded), model={args.model}, vocab={tokenizer.vocab_size}, "
          f"threads={torch.get_num_threads()}, device={args.device}")
    on_gpu = args.device.startswith("cuda")
    precisions = [False, True]
    if not (on_gpu or machine.cpu_native_bf16 or args.all_precisions):
        precisions = [False]
        print(f"bf16 rows skipped: this CPU has no native bf16 ({machine.cpu_isa}), where bf16 is emulated, "
              "several to hundreds of times slower than fp32 (--all-precisions runs them anyway)")
    peak = {bf16: matmul_peak(torch.bfloat16 if bf16 else torch.float32, args.device) for bf16 in precisions}

    systems = {}
    for bf16 in precisions:
        tag = "bf16" if bf16 else "fp32"
        systems[f"seq2seq {tag}"] = (*ours(cfg, tokenizer, args.device), bf16)
        for impl in ("eager", "sdpa"):
            systems[f"Marian {impl} {tag}"] = (*marian(cfg, tokenizer, impl, args.device), bf16)
    times = {name: [] for name in systems}
    for name, (model, loss_fn, optimizer, bf16) in systems.items():
        train_steps(model, loss_fn, optimizer, warmup, bf16, args.device)
    for _ in range(args.rounds):
        for name, (model, loss_fn, optimizer, bf16) in systems.items():
            times[name].append(train_steps(model, loss_fn, optimizer, batches, bf16, args.device))
    report(systems, times, batches, n_tokens, peak, args.device, cfg.model.d_model)


def report(systems: dict, times: dict, batches: list, n_tokens: int, peak: dict, device: str, d_model: int) -> None:
    """Tokens/s per system, its ratio to the best Marian, and the share of the matmul peak it reaches."""
    rate = {name: n_tokens / statistics.median(t) for name, t in times.items()}
    best_peer = max((n for n in rate if n.startswith("Marian")), key=rate.get)
    print(f"\n{'system':<20} {'params':>10} {'tokens/s':>10} {'vs best Marian':>15} {'% of matmul peak':>17}")
    for name, (model, loss_fn, _, bf16) in systems.items():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            flops = step_flops(model, loss_fn, batches[0]) * n_tokens / batches[0]["n_tokens"]
        achieved = flops / statistics.median(times[name]) / 1e9
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:<20} {params:>10,} {rate[name]:>10.0f} {rate[name] / rate[best_peer]:>14.2f}x "
              f"{achieved / peak[bf16]:>16.0%}")
    best_ours = max((n for n in rate if n.startswith("seq2seq")), key=rate.get)
    print(f"\nbest seq2seq ({best_ours}) / best Marian ({best_peer}): {rate[best_ours] / rate[best_peer]:.2f}x")
    auto, reason = choose_precision("auto", torch.device(device).type, training=True, machine=this_machine(),
                                    d_model=d_model)
    measured = f"seq2seq {'fp32' if auto == '32' else auto}"
    ratio = f"{rate[measured] / rate[best_ours]:.2f}x" if measured in rate else "not measured"
    print(f"precision=auto trains at {auto} here ({reason}): auto / fastest of ours ({best_ours}) = {ratio}")


if __name__ == "__main__":
    main()
