#!/bin/bash
# Balance simulator with real kernel numbers: on one GPU, `longtrain probe --device cuda` measures the
# attention kernel (flash-attn when installed, else torch's fused kernel; bf16, causal and full blocks)
# by length at LLaMA-7B attention shapes (32 heads x 128), a bf16 matmul at dim 4096 and the fixed cost
# of one attention call; the links (one GPU cannot measure one) come from the h100x8 preset. Then
# benchmarks/balance.py reruns its at-scale sections (clusters A, B, C; cost.with_probed_kernels) with
# those rates, reusing the CPU measurements of benchmarks/results/balance.json.
# Writes benchmarks/results/gpu/balance_probe_cuda.yaml and benchmarks/results/gpu/balance/balance.{json,md,png}.
# Not run yet: no GPU was lent when it was written.
#   bash benchmarks/balance_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/gpu
mkdir -p "$out/balance"
python -m longtrain.launcher.cli probe --device cuda --links h100x8 --heads 32 --head-dim 128 --dim 4096 \
  --lengths 512,1024,2048,4096,8192,16384,32768 --out "$out/balance_probe_cuda.yaml"
python benchmarks/balance.py --from-json benchmarks/results/balance.json --kernels "$out/balance_probe_cuda.yaml" \
  --out "$out/balance"
