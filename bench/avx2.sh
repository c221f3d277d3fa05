#!/usr/bin/env bash
# Run a command with every library's CPU kernels capped at AVX2: an AVX2-only machine's instruction set on
# a newer CPU (same cores, caches and clock; only the instructions the kernels choose differ).
#   bash bench/avx2.sh python bench/decode.py --ckpt CKPT --data-url DIR
# oneDNN (torch's bf16 matmuls: emulated, as on AVX2), ATen's vectorized kernels, MKL (fp32 matmuls; CTranslate2's
# too), fbgemm (int8: no VNNI) and CTranslate2's own kernels. The machine line of each bench names the caps.
export ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
       FBGEMM_ENABLE_INSTRUCTIONS=AVX2 CT2_FORCE_CPU_ISA=AVX2
exec "$@"
