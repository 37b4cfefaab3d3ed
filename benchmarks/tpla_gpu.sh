#!/bin/bash
# TPLA vs MLA decode attention on one GPU (the per-rank kernel: one GPU stands for one tp rank), DeepSeek-V3
# attention shapes (128 heads, latent 512 + RoPE 64), bf16, 32K-128K cached tokens: head-split MLA (128/g
# heads over the whole latent) against TPLA (128 heads over a d_c/g slice), g = 2, 4, 8, batch 1 and 16.
# Writes benchmarks/results/gpu/tpla_cuda_b<batch>/tpla.{json,md,png}. Not run yet: no GPU was lent when written.
#   bash benchmarks/tpla_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
for batch in 1 16; do
  python benchmarks/tpla.py --device cuda --dtype bf16 --shapes v3 --lengths 32768,65536,131072 \
    --degrees 2,4,8 --batch "$batch" --repeats 20 --out "benchmarks/results/gpu/tpla_cuda_b$batch"
done
