#!/bin/bash
# Ladder Residual on one node of GPUs (nccl): training step time of standard vs ladder with the
# sublayer all-reduces overlapped and not, at tp 2, 4 and 8 (as many as the node has), with
# Llama-3-8B-wide layers. Writes benchmarks/results/ladder_cuda_tp<N>.{json,md,png}.
# Not run yet: no multi-GPU machine was available when it was written.
#   bash benchmarks/ladder_gpu.sh [extra benchmarks/ladder.py flags, e.g. --sequence-parallel]
set -euo pipefail
cd "$(dirname "$0")/.."
# NCCL kernels need their own hardware queue to run beside the compute kernels.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-8}
gpus=$(nvidia-smi -L | wc -l)
for tp in 2 4 8; do
  if [ "$tp" -gt "$gpus" ]; then continue; fi
  torchrun --standalone --nproc_per_node "$tp" benchmarks/ladder.py --bf16 --dim 4096 --heads 32 \
    --ffn-dim 14336 --layers 4 --seq-len 4096 --batch-size 1 --steps 5 --warmup 2 --repeats 5 "$@"
done
