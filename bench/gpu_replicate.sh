#!/usr/bin/env bash
# `kdcache replicate --preset toy` on one lent H200 (no network there: the zstandard wheel is
# carried in .whl/). A device call lasts at most 10 minutes and the machine stays warm while
# calls follow each other, so the run goes on in the background between calls:
#   bash bench/gpu_replicate.sh start [ARGS]   # copies the code to /tmp, starts the run in its
#                                              # own session (it outlives the call), returns
#   bash bench/gpu_replicate.sh wait SECONDS   # follows it up to SECONDS, then collects
#   bash bench/gpu_replicate.sh collect        # run log, task logs, evaluation records, report
#                                              # and PNGs into $OUT/replicate (few files: a tarball)
#   bash bench/gpu_replicate.sh run SECONDS    # in the foreground (stops cleanly after SECONDS)
# ARGS go to `kdcache replicate` (e.g. --parallel 14). A finished step is kept under $REP, so a
# rerun on the same machine resumes.
set -o pipefail
OUT=${OUT:-out}
REP=${REP:-/tmp/kdcache-rep/toy}
SRC=/tmp/kdcache-src
mkdir -p "$OUT/replicate" "$REP"
OUT=$(cd "$OUT" && pwd)

setup() {
  python3 -c "import zstandard" 2>/dev/null || [ -d /tmp/zs/zstandard ] || python3 -m pip install \
    -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/zs .whl/zstandard*.whl \
    || exit 1
  rm -rf "$SRC" && mkdir -p "$SRC" && cp -r kdcache pyproject.toml "$SRC/"
  export PYTHONPATH=/tmp/zs:$SRC HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
}

# GPU use every 5 s beside the run (where a later run's parallelism should go)
sample_gpu() {
  pgrep -f "nvidia-smi --query-gpu" > /dev/null || (setsid nohup nvidia-smi \
    --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 5 \
    >> "$REP/gpu.csv" 2>/dev/null < /dev/null &)
}

running() { pgrep -f "python3 -m kdcache replicate .*--out $REP" > /dev/null; }

collect() {
  tail -15 "$REP/run.log" 2>/dev/null
  (cd "$REP" && tar czf "$OUT/replicate/run.tgz" --ignore-failed-read run.log logs eval \
     gpu.csv preset.json corpus.json teacher/kdcache_retrieval.json teacher-short/kdcache_retrieval.json student-base/kdcache_retrieval.json \
     report.md report.json ./*.png 2>/dev/null)
  for f in report.md report.json; do [ -e "$REP/$f" ] && cp "$REP/$f" "$OUT/replicate/"; done
  du -sh "$REP"/* 2>/dev/null | tr '\n' ' '; echo
}

case "${1:-run}" in
  start)
    shift; setup
    running && { echo "already running"; exit 0; }
    date -u +"start %FT%TZ" >> "$REP/run.log"
    sample_gpu
    (cd "$SRC" && setsid nohup sh -c "python3 -m kdcache replicate --preset ${PRESET:-toy} --out '$REP' $*;
      echo \"rc=\$? \$(date -u +%FT%TZ)\"" >> "$REP/run.log" 2>&1 < /dev/null &)
    sleep 5; tail -5 "$REP/run.log" ;;
  wait)
    end=$(( $(date +%s) + ${2:-500} ))
    while running && [ "$(date +%s)" -lt "$end" ]; do
      sleep 20; echo "$(date -u +%T) $(grep -c 'finished\|done' "$REP/run.log") $(tail -1 "$REP/run.log" | cut -c1-150)"
    done
    running && echo "still running" || echo "finished"
    collect ;;
  collect) collect ;;
  run)
    setup
    date -u +"start %FT%TZ"
    (cd "$SRC" && timeout -s INT "${2:-530}" python3 -m kdcache replicate --preset ${PRESET:-toy} \
      --out "$REP" >> "$REP/run.log" 2>&1)
    echo "rc=$?"; date -u +"stop %FT%TZ"; collect ;;
  *) echo "usage: $0 start [ARGS] | wait SECONDS | collect | run SECONDS" >&2; exit 2 ;;
esac
