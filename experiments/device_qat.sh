#!/usr/bin/env bash
# QAT of the shipped `small` model on the lent GPU machine (device tool), in one command of at most 10 minutes:
# unpack the carried synthesizers (.debs) and wheels (.whl), generate the corpus, run `wb qat` from the PTQ
# tables in TABLES (carried: a `wb search` run's calibration/ directory), and leave the QAT directory in $OUT
# (as qat.tar in 15 MiB parts: cat them, then tar -x).
# Call (from the repo root, with .debs, .whl and TABLES carried):
#   bash experiments/device_qat.sh TABLES [TRAIN_UTTS] [extra `wb qat` args...]
# The tree plus carried paths must stay under 64 MiB: carry a folder holding only encoder.json and decoder.json
# (not a run's whole calibration/), and keep the shipped QAT weights out of the tree sent for a second QAT run.
# Recorded runs (issue 8): TABLES = the default run's calibration, `--method entropy --steps 1500
# --time-limit 330 --eval-every 250 --workers 8` (models/weights/small_qat), and the same with --no-fake-quant
# (the ablation control).
set -euo pipefail
TABLES="$1"; TRAIN_UTTS="${2:-20000}"; shift 2 || shift 1
source "$(dirname "$0")/device_env.sh"
# Fail fast (before the corpus) if this torch's export names tensors other than the tables do.
python3 - "$TABLES" <<'PY'
import sys, tempfile
from graph.analysis import analyze
from models.export import export_onnx
from models.weights import default_model
from workbench.commands.qat import _tables
from quant.table import CalibrationTable
paths = export_onnx(default_model("small")[0], tempfile.mkdtemp())
for kind, p in zip(("encoder", "decoder"), paths):
    have = set(CalibrationTable.load(_tables(__import__("pathlib").Path(sys.argv[1]))[kind]).tensors)
    need = {q.act_inputs[0] for q in analyze(p).quantizable if q.kind != "act_matmul"}
    assert need <= have, f"{kind}: {len(need - have)} tensors not in the table, e.g. {sorted(need - have)[:3]}"
print("table names match this export")
PY
t0=$(date +%s)
python3 -m workbench.cli data --sizes "train=$TRAIN_UTTS,calib=512,test=500" --splits train,calib --workers "$(nproc)" \
  2>&1 | tr '\r' '\n' | grep -v '^ *$' | tail -2
echo "corpus: $(( $(date +%s) - t0 )) s"
python3 -m workbench.cli qat --tables "$TABLES" --out /tmp/qat "$@" 2>&1 | tr '\r' '\n' | awk 'NR % 40 == 0 || /QAT:|error/' | tail -15
echo "total: $(( $(date +%s) - t0 )) s"
# At most 8 files come back: the QAT directory as one tar in 15 MiB parts (cat them, then tar -x).
tar -C /tmp -cf /tmp/qat.tar qat
split -b 15M /tmp/qat.tar "$OUT/qat.tar.part-"
cp /tmp/qat/qat.json "$OUT/"
grep -h val_cer /tmp/qat/train_log.jsonl | tail -8
