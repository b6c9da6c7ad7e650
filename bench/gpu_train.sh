#!/usr/bin/env bash
# Student-trainer figures on one lent H200 (device tool, from the repository root):
#   bash bench/gpu_train.sh [SHAPES]        e.g.  bash bench/gpu_train.sh ours16k:0,hf16k,stage2:20
# SHAPES: comma list of NAME[:CHECKPOINTED_LAYERS] (see bench/bench_train.py). Targets are made on
# the GPU (random top-k ids/log-probs at V = 202,048): no dataset travels.
set -o pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, triton, transformers, lightning; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__)"
python3 bench/bench_train.py --shapes "${1:-ours16k:0,hf16k,stage2:20,stage1:20}" \
  --steps "${STEPS:-4}" --warmup "${WARMUP:-2}" --json-out "$OUT/bench_train.json" 2>&1 \
  | tee "$OUT/bench_train.log"
