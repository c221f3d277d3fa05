#!/usr/bin/env bash
# The wheels that bench/gpu_check.sh needs and a lent GPU machine lacks, downloaded here into .whl/ (git-ignored
# through .git/info/exclude), where pip reaches PyPI; the lent machine reaches nothing. Its image holds torch,
# lightning, sacrebleu, sentencepiece, transformers, matplotlib, pytest and tensorboard (as the device tool
# describes it), not Hydra, MeCab or sacremoses. The working tree that travels is capped at
# 64 MiB: these come to about 16 MiB.
#   bash bench/gpu_wheels.sh [PYTHON_VERSION]     # the lent machine's python3, 3.12 (default)
# CTranslate2 (41 MiB, built against CUDA 12 where the image has CUDA 13) is left out: bench/decode.py then leaves
# its rows out, and the issue's GPU comparison is against Hugging Face Marian on the same GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.12}
mkdir -p .whl .git/info
rm -f .whl/*.whl  # one version of each: two stop the install there
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    hydra-core==1.3.2 omegaconf==2.3.0 mecab-python3==1.0.12 sacremoses==0.2.0 pysbd==0.3.4
# pure Python, published as source only: built into wheels here, which install on any Python 3
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3 ipadic==1.0.0
ls -1 .whl
du -sh .whl
