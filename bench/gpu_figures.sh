#!/usr/bin/env bash
# A list of GPU figure runs on one lent H200, in the background, so they outlive one device call
# (10 minutes at most) and the machine never sits idle between steps. From the repository root,
# after the vLLM kit is unpacked to /tmp/site (../shared/gpu-vllm/README.md) and with the
# zstandard and Liger wheels carried in .whl/:
#   bash bench/gpu_figures.sh start STEP ...   # copies the code to /tmp, runs the steps in order
#   bash bench/gpu_figures.sh wait SECONDS     # follows them up to SECONDS, then collects
#   bash bench/gpu_figures.sh collect          # every step's JSON lines and log tails -> $OUT
# STEP: dump8k | dump32k | dump128k | big | student  (see each below); smoke: the machinery on
# CPU (PY=.venv/bin/python).
set -o pipefail
OUT=${OUT:-out}
export PY=${PY:-python3}
RUN=${RUN:-/tmp/kdcache-figures}
SRC=/tmp/kdcache-figures-src
mkdir -p "$OUT/figures" "$RUN"
OUT=$(cd "$OUT" && pwd)

setup() {
  $PY -c "import zstandard" 2>/dev/null || [ -d /tmp/zs/zstandard ] || $PY -m pip install \
    -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/zs .whl/zstandard*.whl \
    || exit 1
  rm -rf "$SRC" && mkdir -p "$SRC" && cp -r kdcache bench pyproject.toml "$SRC/"
  [ -d .whl ] && cp -r .whl "$SRC/"
}

running() { pgrep -f "gpu_figures.sh steps" > /dev/null; }

# One step: its JSON lines in $RUN/STEP/, its stderr in $RUN/STEP.log.
step() {
  local name=$1 dump_env="WRITER_FEED=blocking WRITER_ROUNDS=2"
  mkdir -p "$RUN/$name"
  export OUT="$RUN/$name" PYTHONPATH=/tmp/site:/tmp/zs:$SRC VLLM_USE_FLASHINFER_SAMPLER=0 \
    HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
  cd "$SRC" || return 1
  case $name in
    # 32 windows of 8k (two shards: the end-of-dump tail paid once per two), every k and mode;
    # document k = 16 also in 131,072-token engine groups
    dump8k) env $dump_env WRITER_SCALE=2 WRITER_CELLS=causal:8192:16,causal:8192:64,causal:8192:256,document:8192:16,document:8192:16:131072,document:8192:64,document:8192:256 \
      timeout 900 $PY bench/gpu_vllm_dump.py writer ;;
    # 16 windows of 32k (one shard), every k and mode (CELLS32K: fewer)
    dump32k) env $dump_env WRITER_SCALE=2 WRITER_CELLS=${CELLS32K:-causal:32768:16,causal:32768:64,causal:32768:256,document:32768:16,document:32768:64,document:32768:256} \
      timeout 900 $PY bench/gpu_vllm_dump.py writer ;;
    # 128k windows, causal and many-document (as many tokens as 32 windows of 8k: two windows)
    dump128k) env $dump_env WRITER_SCALE=2 WRITER_CELLS=causal:131072:64,document:131072:64 \
      timeout 600 $PY bench/gpu_vllm_dump.py writer ;;
    # the Llama-3-8B-shaped teacher, 32k windows, k = 64
    big) $PY bench/gpu_vllm_dump.py teachers && BIG_WINDOWS=${BIG_WINDOWS:-6} timeout 600 \
      $PY bench/gpu_vllm_dump.py big ;;
    # where the Llama-3.2-1B student's 16k step goes: attention backends, profiled cells
    # (without the vLLM kit's site on the path: transformers and torch as the machine has them)
    student) PYTHONPATH=/tmp/zs:$SRC timeout 400 $PY bench/bench_hf_student.py --out-dir "$OUT" --attention --profile \
      --cells llama-3.2-1b/16k/kdcache,llama-3.2-1b/16k/liger,llama-3.2-1b/16k/hf --budget-s 380 ;;
    smoke) env $dump_env WRITER_CELLS=causal:512:16 timeout 600 $PY bench/gpu_vllm_dump.py \
      writer-smoke && $PY bench/bench_hf_student.py --out-dir "$OUT" --profile \
      --cells llama-3.2-1b/16k/kdcache ;;
    *) echo "unknown step $name" >&2; return 2 ;;
  esac
}

collect() {
  for f in "$RUN"/*.log; do [ -e "$f" ] && { echo "== $f"; tail -4 "$f" | cut -c1-300; }; done
  (cd "$RUN" && tar czf "$OUT/figures/figures.tgz" --ignore-failed-read ./*.log ./*/*.jsonl \
     ./*/*.json steps.log 2>/dev/null)
}

case "${1:-}" in
  start)
    shift; setup
    running && { echo "already running"; exit 0; }
    cp "$0" "$RUN/gpu_figures.sh"
    (setsid nohup bash "$RUN/gpu_figures.sh" steps "$@" >> "$RUN/steps.log" 2>&1 < /dev/null &)
    sleep 3; tail -3 "$RUN/steps.log" ;;
  steps)
    shift
    for name in "$@"; do
      echo "$(date -u +%FT%TZ) start $name"
      (step "$name") > "$RUN/$name.log" 2>&1
      echo "$(date -u +%FT%TZ) done $name rc=$?"
    done
    echo "$(date -u +%FT%TZ) all done" ;;
  wait)
    end=$(( $(date +%s) + ${2:-500} ))
    while running && [ "$(date +%s)" -lt "$end" ]; do sleep 10; done
    running && echo "still running" || echo "finished"
    collect ;;
  collect) collect ;;
  *) echo "usage: $0 start STEP ... | wait SECONDS | collect" >&2; exit 2 ;;
esac
