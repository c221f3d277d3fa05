#!/usr/bin/env bash
# The GPU check of issue #13, in under 8 minutes on one GPU, run from the repository root:
#   1. the GPU tests of the suite (skipped on machines without CUDA);
#   2. `run.py train experiment=smoke trainer=gpu` (precision auto: bf16 where the GPU has it, else 16);
#   3. translate the smoke test set on the GPU and on the CPU, greedy fp32: the outputs must agree;
#   4. training tokens/s and beam-5 sentences/s on the GPU, next to HF Marian of the same shape on the same GPU;
#   5. the CPU's cache blocking (64-row encoder groups and logit blocks) against the GPU's, beam 5, A/B.
# It needs no corpus from outside: everything runs on the generated demo corpus.
#
# On a machine without the project's Python packages and without network (the lent GPU machines), put the
# missing wheels in .whl/ first (hydra-core, omegaconf, antlr4-python3-runtime, matplotlib-fontja):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .whl hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 matplotlib-fontja
# and the script installs them into /tmp/site.
#
#   bash bench/gpu_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print('GPU:', torch.cuda.get_device_name())"
start=$SECONDS
python3 run.py machine peaks=false  # the machine, and what precision=auto and device=auto pick on it

echo "== 1. GPU tests"
python3 -m pytest -q -p no:cacheprovider tests/test_hardware.py -k cuda 2>&1 | tail -5

echo "== 2. train experiment=smoke on the GPU"
python3 run.py train experiment=smoke trainer=gpu trainer.enable_progress_bar=false \
    data_dir="$out/data" hydra.run.dir="$out/smoke" 2>&1 | grep -E "precision|machine|results" || true
ckpt="$out/smoke/checkpoints/best.ckpt"
test -f "$ckpt"
python3 - "$out/smoke/results.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"smoke on the GPU: {r['train_tokens_per_s']:,.0f} tokens/s, {r['global_step']} steps in {r['train_time_s']} s, "
      f"test BLEU {r['test/bleu']:.1f}; {r['validations']} validations took {r['validation_time_s']} s "
      f"({r['validation_time_s'] / r['train_time_s']:.0%} of training)")
EOF

echo "== 3. GPU and CPU translations of the same checkpoint (greedy, fp32)"
test_en="$out/data/demo/test.en"
python3 run.py translate ckpt="$ckpt" input="$test_en" output="$out/gpu.ja" device=cuda precision=32 beam_size=1 progress=false
python3 run.py translate ckpt="$ckpt" input="$test_en" output="$out/cpu.ja" device=cpu precision=32 beam_size=1 progress=false
python3 - "$out/gpu.ja" "$out/cpu.ja" <<'EOF'
import sys
gpu, cpu = (open(p, encoding="utf-8").read().splitlines() for p in sys.argv[1:])
same = sum(a == b for a, b in zip(gpu, cpu))
print(f"GPU and CPU agree on {same} of {len(cpu)} lines")
sys.exit(0 if len(gpu) == len(cpu) and same >= 0.98 * len(cpu) else 1)
EOF
python3 run.py translate ckpt="$ckpt" input="$test_en" output="$out/gpu_auto.ja" progress=false 2>&1 | grep precision || true

echo "== 4. speed on the GPU, side by side with HF Marian"
python3 bench/train.py --device cuda --data demo --data-dir "$out/data" --model base --max-tokens 16384 --steps 20 --rounds 3
python3 bench/decode.py --device cuda --ckpt "$ckpt" --data-url "$out/data/demo" --budgets 4096 16384 65536 \
    --marian-batches 64 256 1024 --rounds 1  # one round: the 8-minute budget

echo "== 5. the CPU's cache blocking on the GPU, A/B: beam 5, 2,000 lines, 16,384-token batches"
# On a GPU the encoder takes a batch whole and logits go in blocks of up to 2^26 (seq2seq/hardware.py:
# rows_per_block); on a CPU, 64-row encoder groups and 64-row logit blocks. Rounds alternate; sentences/s.
python3 - "$ckpt" "$test_en" <<'EOF'
import functools, statistics, sys, time
import torch
import seq2seq.search as search
from seq2seq.translator import Translator
ckpt, test_en = sys.argv[1:]
lines = open(test_en, encoding="utf-8").read().splitlines() * 10
translator = Translator.from_checkpoint(ckpt, device="cuda")
gpu_style = (search.encode_by_length, search.rows_per_block)
cpu_style = (functools.partial(search.encode_by_length, group_rows=search.ENCODE_GROUP_ROWS),
             lambda device, vocab_size, cpu_rows: cpu_rows)
def speed(style):
    search.encode_by_length, search.rows_per_block = style
    torch.cuda.synchronize(); start = time.perf_counter()
    out = translator.translate(lines, beam_size=5, max_tokens=16384)
    torch.cuda.synchronize()
    return len(lines) / (time.perf_counter() - start), out
speed(gpu_style); speed(cpu_style)  # warm-up
rounds = [(speed(gpu_style), speed(cpu_style)) for _ in range(3)]
print(f"GPU-style {statistics.median(g[0] for g, _ in rounds):.0f} sentences/s, CPU-style "
      f"{statistics.median(c[0] for _, c in rounds):.0f}; same output: {rounds[0][0][1] == rounds[0][1][1]}")
EOF
echo "gpu_check: done in $((SECONDS - start)) s"
