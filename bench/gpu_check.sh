#!/usr/bin/env bash
# The GPU check of issue #13, in under 8 minutes on one GPU, run from the repository root:
#   1. the GPU tests of the suite (skipped on machines without CUDA);
#   2. `run.py train experiment=smoke trainer=gpu` (precision auto: bf16 where the GPU has it, else 16);
#   3. translate the smoke test set on the GPU and on the CPU, greedy fp32: the outputs must agree;
#   4. training tokens/s on the GPU, next to HF Marian of the same shape on the same GPU;
#   5. beam-5 (and greedy) sentences/s on the GPU, next to HF Marian `generate` on the same GPU;
#   6. the CPU's cache blocking (64-row encoder groups and logit blocks) against the GPU's, beam 5, A/B.
# It needs no corpus from outside: everything runs on the generated demo corpus. A step that fails does not stop
# the ones after it; the script then ends by listing the failed steps, and exits 1.
#
# A lent GPU machine has torch, lightning, sacrebleu and transformers but not Hydra, MeCab or sacremoses, and no
# network: run `bash bench/gpu_wheels.sh` here first (it puts their wheels in .whl/, about 16 MiB), carry .whl,
# and the script installs them into /tmp/site. Rehearsed on a CPU in a venv holding only the image's packages.
#
#   bash bench/gpu_check.sh [WORK_DIR]        # WORK_DIR: data, checkpoints, outputs (default /tmp/gpu_check)
#   REHEARSE=1 bash bench/gpu_check.sh        # every step on the CPU at toy sizes: checks the script itself
#                                             # where no GPU is lent, so that a GPU's few minutes are not spent on it
# Where $OUT is set (a lent machine), the whole output is also kept in $OUT/gpu_check.log.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/gpu_check}
mkdir -p "$out"
if [ -n "${OUT:-}" ]; then exec > >(tee "$OUT/gpu_check.log") 2>&1; fi
if [ "${REHEARSE:-0}" = 1 ]; then
    device=cpu trainer=cpu lines_times=1
    train_sizes="--model tiny --max-tokens 1024 --steps 2 --rounds 1"
    decode_sizes="--limit 40 --budgets 1024 --marian-batches 32 --rounds 1"
else
    device=cuda trainer=gpu lines_times=10
    train_sizes="--model base --max-tokens 16384 --steps 20 --rounds 3"
    decode_sizes="--budgets 4096 16384 65536 --marian-batches 64 256 1024 --rounds 1"  # one round: the 8 minutes
fi
if [ -d .whl ] && ! python3 -c "import hydra, MeCab, ipadic, sacremoses" 2>/dev/null; then  # what is missing
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
if [ "$device" = cuda ]; then
    python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print('GPU:', torch.cuda.get_device_name())"
else
    echo "rehearsal: every step on the CPU at toy sizes"
fi
start=$SECONDS
python3 run.py machine peaks=false  # the machine, and what precision=auto and device=auto pick on it
ckpt="$out/smoke/checkpoints/best.ckpt" test_en="$out/data/demo/test.en"

gpu_tests() {
python3 -m pytest -q -p no:cacheprovider tests/test_hardware.py -k cuda 2>&1 | tail -5
}

smoke_training() {
python3 run.py train experiment=smoke trainer=$trainer trainer.enable_progress_bar=false \
    data_dir="$out/data" hydra.run.dir="$out/smoke" 2>&1 | grep -E "precision|machine|results" || true
test -f "$ckpt"
python3 - "$out/smoke/results.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"smoke on the GPU: {r['train_tokens_per_s']:,.0f} tokens/s, {r['global_step']} steps in {r['train_time_s']} s, "
      f"test BLEU {r['test/bleu']:.1f}; {r['validations']} validations took {r['validation_time_s']} s "
      f"({r['validation_time_s'] / r['train_time_s']:.0%} of training)")
EOF
}

gpu_and_cpu_agree() {
python3 run.py translate ckpt="$ckpt" input="$test_en" output="$out/gpu.ja" device=$device precision=32 beam_size=1 progress=false
python3 run.py translate ckpt="$ckpt" input="$test_en" output="$out/cpu.ja" device=cpu precision=32 beam_size=1 progress=false
python3 - "$out/gpu.ja" "$out/cpu.ja" <<'EOF'
import sys
gpu, cpu = (open(p, encoding="utf-8").read().splitlines() for p in sys.argv[1:])
same = sum(a == b for a, b in zip(gpu, cpu))
print(f"GPU and CPU agree on {same} of {len(cpu)} lines")
sys.exit(0 if len(gpu) == len(cpu) and same >= 0.98 * len(cpu) else 1)
EOF
python3 run.py translate ckpt="$ckpt" input="$test_en" output="$out/gpu_auto.ja" progress=false 2>&1 | grep precision || true
}

training_speed() {
python3 bench/train.py --device $device --data demo --data-dir "$out/data" $train_sizes
}

decoding_speed() {
python3 bench/decode.py --device $device --ckpt "$ckpt" --data-url "$out/data/demo" $decode_sizes
}

# On a GPU the encoder takes a batch whole and logits go in blocks of up to 2^26 (seq2seq/hardware.py:
# rows_per_block); on a CPU, 64-row encoder groups and 64-row logit blocks. Rounds alternate; sentences/s.
cache_blocking() {
python3 - "$ckpt" "$test_en" "$device" "$lines_times" <<'EOF'
import functools, statistics, sys, time
import seq2seq.search as search
from seq2seq.hardware import synchronize
from seq2seq.translator import Translator
ckpt, test_en, device, times = sys.argv[1:]
lines = open(test_en, encoding="utf-8").read().splitlines() * int(times)
translator = Translator.from_checkpoint(ckpt, device=device)
gpu_style = (search.encode_by_length, search.rows_per_block)
cpu_style = (functools.partial(search.encode_by_length, group_rows=search.ENCODE_GROUP_ROWS),
             lambda device, vocab_size, cpu_rows: cpu_rows)
def speed(style):
    search.encode_by_length, search.rows_per_block = style
    synchronize(device); start = time.perf_counter()
    out = translator.translate(lines, beam_size=5, max_tokens=16384)
    synchronize(device)
    return len(lines) / (time.perf_counter() - start), out
speed(gpu_style); speed(cpu_style)  # warm-up
rounds = [(speed(gpu_style), speed(cpu_style)) for _ in range(3)]
print(f"GPU-style {statistics.median(g[0] for g, _ in rounds):.0f} sentences/s, CPU-style "
      f"{statistics.median(c[0] for _, c in rounds):.0f}; same output: {rounds[0][0][1] == rounds[0][1][1]}")
EOF
}

# Every step runs, even after one has failed: a lent GPU's few minutes should bring back every figure they can.
# A step stops at its first failing command (errexit, in a subshell of its own); the failed steps are listed last.
set +e
failed=() steps=0
step() {  # step TITLE FUNCTION
    echo "== $1"
    steps=$((steps + 1))
    ( set -euo pipefail; "$2" )
    local rc=$?
    if [ "$rc" -ne 0 ]; then echo "step failed (exit $rc): $1"; failed+=("$1"); fi
}
step "1. GPU tests" gpu_tests
step "2. train experiment=smoke on the GPU" smoke_training
step "3. GPU and CPU translations of the same checkpoint (greedy, fp32)" gpu_and_cpu_agree
step "4. training speed on the GPU, side by side with HF Marian" training_speed
step "5. decoding speed on the GPU, side by side with HF Marian" decoding_speed
step "6. the CPU's cache blocking on the GPU, A/B: beam 5, 2,000 lines, 16,384-token batches" cache_blocking
if [ "${#failed[@]}" -gt 0 ]; then
    echo "gpu_check: ${#failed[@]} of $steps steps failed, in $((SECONDS - start)) s:"
    printf '  %s\n' "${failed[@]}"
    exit 1
fi
echo "gpu_check: done in $((SECONDS - start)) s"
