#!/usr/bin/env bash
# Train the `small` model on the lent GPU machine (device tool), in one command of at most 10 minutes:
# unpack the carried synthesizers (.debs) and wheels (.whl), generate the corpus on all cores, train with a
# time limit, and leave the weights, the log and the corpus manifests in $OUT.
# Call (from the repo root, with .debs and .whl carried):
#   bash experiments/device_train.sh [TRAIN_UTTS] [TIME_LIMIT_S] [extra `wb train` args...]
set -euo pipefail
TRAIN_UTTS="${1:-20000}"; TIME_LIMIT="${2:-400}"; shift 2 || shift $#
source "$(dirname "$0")/device_env.sh"
t0=$(date +%s)
python3 -m workbench.cli data --sizes "train=$TRAIN_UTTS,calib=512,test=500" --workers "$(nproc)" 2>&1 | tr '\r' '\n' | grep -v '^ *$' | tail -5
echo "corpus: $(( $(date +%s) - t0 )) s"
python3 -m workbench.cli train --config small --out /tmp/run --time-limit "$TIME_LIMIT" --steps 100000 "$@" 2>&1 \
  | tr '\r' '\n' | awk 'NR % 50 == 0' | tail -20
echo "total: $(( $(date +%s) - t0 )) s"
mkdir -p "$OUT/run"
cp /tmp/run/train_log.jsonl "$OUT/run/"
# Files come back at most 16 MiB each: ship the fp16 weights in parts (join with cat).
split -b 15M /tmp/run/small.safetensors "$OUT/run/small.safetensors.part-"
python3 - <<'PY'
import json, statistics
recs = [json.loads(l) for l in open("/tmp/run/train_log.jsonl")]
dt = [b["time_s"] - a["time_s"] for a, b in zip(recs, recs[1:])]
print(f"steps {recs[-1]['step']}, median step {statistics.median(dt):.3f} s, median data wait {statistics.median(r['data_wait_s'] for r in recs):.4f} s")
PY
grep val_cer /tmp/run/train_log.jsonl | tail -20
