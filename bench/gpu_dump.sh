#!/usr/bin/env bash
# Teacher-dump figures on one lent H200 with the hf engine (vLLM and Ray cannot travel there).
# From the repository root, with the zstandard wheel carried in .whl/ (see docs/teacher_dump.md):
#   bash bench/gpu_dump.sh
# Builds the random-init gpu-1b teacher (1.4B parameters, V=202,048), then `kdcache bench dump`
# at k=16/64/256 on 8k windows and k=64 on 32k windows in bf16, once more with one encode
# thread (the serial writer, side by side), and the encode-thread scaling of bench_encode.py.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/zstandard*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader
[ -n "$SKIP_ENCODE" ] || python3 bench/bench_encode.py --workers 1,2,4,8,12 --threads 8 --windows 16 --rounds 3 | tee -a "$OUT/encode.jsonl"
T=/tmp/kdcache-gpu-1b
[ -f $T/config.json ] || python3 -m kdcache.cli make-teacher --out $T --preset gpu-1b --json | cut -c1-300
dump() { python3 -m kdcache.cli bench dump --model $T --engine hf --dtype bfloat16 --no-baseline --json "$@" \
  2>>"$OUT/dump.err" | tee -a "$OUT/dump.jsonl"; }
for k in 16 64 256; do dump --k $k --window 8192 --windows 8 --rounds 3; done
KDCACHE_ENCODE_WORKERS=1 dump --k 64 --window 8192 --windows 8 --rounds 3
dump --k 64 --window 32768 --windows 4 --rounds 3
