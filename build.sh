#!/usr/bin/env bash
# Main job on the embedded default: the bundled trained WeNet-style model, synthetic speech, and the default
# backend (TensorRT when usable, else ONNX Runtime on CPU):
#   data -> FP32 export -> calibration (max, percentile, entropy, MSE) -> baselines (FP32, FP16, all-INT8 per
#   calibrator) -> per-layer sensitivity -> precision search -> final engines -> report.
# Usage: ./build.sh [--quick] [--qat] [--minilm] [--out DIR] [--config FILE.toml]
#   --quick: less data and fewer timing runs (about 5 minutes); --out: where the deliverables go (default out/);
#   --qat: the shipped QAT model joins as calibrator "qat" (experiments/configs/qat.toml), with its own search;
#   --minilm: the sentence_embedding task on all-MiniLM-L6-v2 instead (experiments/configs/minilm.toml, extra minilm);
#   --minilm --qat: first a search without QAT (DIR/minilm-ptq), then `wb qat --config --mix-of` (QAT by
#   distillation for that run's mix less its least sensitive fallback, DIR/minilm-qat; both kept for the next
#   run), which then joins the search as calibrator "qat".
set -euo pipefail
cd "$(dirname "$0")"
QUICK=(); OUT_DIR="out"; CONFIG=(); QAT=(); MINILM=()
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=(--quick) ;;
        --qat) QAT=(--config experiments/configs/qat.toml) ;;
        --minilm) MINILM=(--config experiments/configs/minilm.toml); export WB_ADD_EXTRAS="${WB_ADD_EXTRAS:+$WB_ADD_EXTRAS,}minilm" ;;
        --out) OUT_DIR="$2"; shift ;;
        --config) CONFIG=(--config "$2"); shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
source tools/bootstrap.sh
wb() { "$WB_PY" -m workbench.cli "$@"; }

# Only the bundled model's task (wenet_asr) reads the speech corpus; other tasks bring their own data.
needs_corpus() {
    "$WB_PY" - "$@" <<'PY'
import sys
from core.errors import WorkbenchError
from pipeline.config import is_wenet, load_config
try:
    sys.exit(0 if is_wenet(load_config(*sys.argv[1:])) else 1)
except WorkbenchError:
    sys.exit(1)  # wb search below reports the config's error in one line
PY
}
CONFIG_FILES=()
for a in "${QAT[@]}" "${MINILM[@]}" "${CONFIG[@]}"; do [ "$a" = "--config" ] || CONFIG_FILES+=("$a"); done
if needs_corpus "${CONFIG_FILES[@]}"; then
    echo "== data: synthetic speech corpus (calib 512, test 750 utterances: 500 evaluated, 250 confirmation; reused when present)"
    wb data --splits calib,test --sizes calib=512,test=750
fi

if [ ${#MINILM[@]} -gt 0 ] && [ ${#QAT[@]} -gt 0 ]; then  # the shipped QAT model is WeNet's: MiniLM's is made here
    QAT_DIR="$OUT_DIR/minilm-qat"
    if [ ! -f "$QAT_DIR/qat.json" ]; then
        # QAT for the mix: a PTQ search first; the fine-tune keeps its fallbacks FP32 but the least sensitive one,
        # which then has a chance to pass in INT8 (experiments/results/minilm/)
        PTQ_RUN="$OUT_DIR/minilm-ptq"
        mkdir -p "$OUT_DIR"
        if [ ! -f "$PTQ_RUN/run.json" ]; then
            echo "== search without QAT, for the mix QAT trains for ($PTQ_RUN)"
            wb search "${QUICK[@]}" "${MINILM[@]}" "${CONFIG[@]}" --run-dir "$PTQ_RUN"
        fi
        MIX=(--mix-of "$PTQ_RUN" --release 1)
        if ! "$WB_PY" -c 'import sys; from pipeline.runfile import load_run; sys.exit(load_run(sys.argv[1])["status"] != "passed")' "$PTQ_RUN"; then
            MIX=()  # no passing mix to train for: QAT for all-INT8
        fi
        echo "== qat: MiniLM fine-tuned with fake quantizers to reproduce its FP32 embeddings ($QAT_DIR)"
        STEPS=(--steps 500); [ ${#QUICK[@]} -gt 0 ] && STEPS=(--steps 40)
        wb qat "${STEPS[@]}" "${MINILM[@]}" "${CONFIG[@]}" "${MIX[@]}" --out "$QAT_DIR"
    fi
    printf '[qat]\ndir = "%s"\n' "$(cd "$QAT_DIR" && pwd)" > "$OUT_DIR/minilm-qat.toml"
    QAT=(--config "$OUT_DIR/minilm-qat.toml")
fi

echo "== search: calibration, baselines, sensitivity, precision search, final engines, report"
wb search "${QUICK[@]}" "${QAT[@]}" "${MINILM[@]}" "${CONFIG[@]}" --out "$OUT_DIR"
