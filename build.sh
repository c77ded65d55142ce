#!/usr/bin/env bash
# Main job on the embedded default (bundled WeNet-style model, synthetic speech, ONNX Runtime on CPU):
#   data -> model -> ONNX export -> FP32 evaluation -> (calibration -> Q/DQ -> engines -> search: coming).
# Usage: ./build.sh [--quick] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")"
QUICK=0; OUT_DIR="out"
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --out) OUT_DIR="$2"; shift ;;
        -h|--help) sed -n '2,4p' "$0"; exit 0 ;;
        *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
source tools/bootstrap.sh
wb() { "$WB_PY" -m workbench.cli "$@"; }

LIMIT=0; [ "$QUICK" = 1 ] && LIMIT=100   # --quick evaluates the first 100 test utterances
echo "== 1/4 data: synthetic speech corpus (calib 512, test 500 utterances)"
wb data --splits calib,test --sizes calib=512,test=500

echo "== 2/4 model: export encoder/decoder with WeNet's GPU ONNX interface (opset 13, as WeNet)"
wb export --out "$OUT_DIR/fp32"

echo "== 3/4 evaluation: attention-rescoring CER on the held-out-voice test split (ONNX Runtime CPU)"
wb evaluate --encoder "$OUT_DIR/fp32/encoder.onnx" --decoder "$OUT_DIR/fp32/decoder.onnx" --split test \
    --limit "$LIMIT" --json "$OUT_DIR/fp32/eval_test.json"

echo "== 4/4 hackathon output check (bs 1,4,16 x sl 16,64,256): the ONNX Runtime export against PyTorch"
wb check --encoder "$OUT_DIR/fp32/encoder.onnx" --decoder "$OUT_DIR/fp32/decoder.onnx" \
    --json "$OUT_DIR/fp32/hackathon_check.json"

cat <<MSG

Done: FP32 models and their evaluation are in $OUT_DIR/.
Not yet in this build (later issues): PTQ calibration, Q/DQ placement from a precision plan, INT8/FP16 engines,
and the precision search that picks the fastest mix passing the accuracy threshold, with its report.
MSG
