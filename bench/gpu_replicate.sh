#!/usr/bin/env bash
# `kdcache replicate --preset toy` on one lent H200 (no network there: the zstandard wheel is
# carried in .whl/), resumable across device calls of at most 10 minutes:
#   bash bench/gpu_replicate.sh [SECONDS]     # stops cleanly after SECONDS (default 530)
# Rerun it (same machine, /tmp kept) to resume; each call copies the run's log, its task logs,
# the evaluation records and, once written, the report and PNGs to $OUT/replicate.
set -o pipefail
OUT=${OUT:-out}
REP=${REP:-/tmp/kdcache-rep/toy}
mkdir -p "$OUT/replicate" "$REP"
python3 -c "import zstandard" 2>/dev/null || python3 -m pip install -q --no-index --no-deps \
  --no-compile --no-cache-dir --target /tmp/zs .whl/zstandard*.whl || exit 1
export PYTHONPATH=/tmp/zs:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
date -u +"start %FT%TZ"
timeout -s INT "${1:-530}" python3 -m kdcache replicate --preset toy --out "$REP" \
  >> "$REP/run.log" 2>&1
echo "rc=$?"
date -u +"stop %FT%TZ"
tail -25 "$REP/run.log"
for f in run.log logs eval report.md report.json preset.json teacher/kdcache_retrieval.json \
         teacher-short/kdcache_retrieval.json corpus.json; do
  [ -e "$REP/$f" ] && cp -r "$REP/$f" "$OUT/replicate/$(echo "$f" | tr / -)"
done
cp "$REP"/*.png "$OUT/replicate/" 2>/dev/null
du -sh "$REP"/* 2>/dev/null | tr '\n' ' '
