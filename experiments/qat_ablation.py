"""QAT ablation (issue 8): does QAT's accuracy come from fake quantization during fine-tuning, or from the
fine-tuning itself?  Three weight sets, each evaluated in FP32 and all-INT8 on the held-out test split:

  * original: the shipped `small` model; INT8 = PTQ with the entropy ranges the QAT run started from;
  * QAT: models/weights/small_qat (1500 steps with fake quantizers, distillation from the original);
  * control: the same fine-tune without quantizers (`wb qat --no-fake-quant`, same seed, data, schedule and
    distillation); INT8 = its weights with the same entropy ranges (what its directory's "qat" method holds).

INT8 is every Linear/Conv int8 (attention MatMuls fp32, as the pipeline's all-INT8) with the ONNX Runtime
recipe, the backend measured here.  Accuracy only: all INT8 models have the same graph, hence the same speed.

    .venv/bin/python experiments/qat_ablation.py --control DIR [--qat models/weights/small_qat] [--utts 500]

Writes experiments/results/qat_ablation.json and .md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibration_data.corpus import default_cache_dir, ensure_corpus, load_split  # noqa: E402
from calibration_data.text import DEFAULT_VOCAB  # noqa: E402
from evaluation.asr import evaluate  # noqa: E402
from engines import open_onnx  # noqa: E402
from graph.placement import quantize  # noqa: E402
from models.export import export_onnx  # noqa: E402
from models.weights import DEFAULT_WEIGHTS, load_weights  # noqa: E402
from quant.qat_run import KINDS, WEIGHTS, check_qat_dir, table_path  # noqa: E402
from quant.table import CalibrationTable  # noqa: E402
from core.fsutil import atomic_path, write_json  # noqa: E402

OUT = ROOT / "experiments" / "results"


def models_of(label: str, weights: Path, tables: dict[str, CalibrationTable], work: Path) -> dict[str, dict]:
    """{"fp32": {kind: path}, "int8": {kind: path}} for one weight set."""
    d = work / label.split()[0]
    fp32 = dict(zip(KINDS, export_onnx(load_weights(weights), d / "fp32")))
    int8 = {k: d / "int8" / f"{k}.onnx" for k in KINDS}
    for kind in KINDS:  # quantize's default plan: every Linear/Conv int8, attention MatMuls fp32
        quantize(str(fp32[kind]), tables[kind].data, default_plan="int8", recipe="onnxruntime", out=int8[kind])
    return {"fp32": fp32, "int8": int8}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qat", type=Path, default=ROOT / "models" / "weights" / "small_qat")
    ap.add_argument("--control", type=Path, required=True, help="a `wb qat --no-fake-quant` directory")
    ap.add_argument("--utts", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qat_ablation"))
    args = ap.parse_args()
    qat, control = check_qat_dir(args.qat), check_qat_dir(args.control)
    # The ranges QAT started from: the base method recorded in the QAT tables (their other amax columns).
    base = {k: CalibrationTable.load(table_path(qat, k)) for k in KINDS}
    base_method = base["encoder"].data["qat"]["base_method"]
    sets = [("original (shipped)", DEFAULT_WEIGHTS, {k: t.with_method(base_method) for k, t in base.items()}),
            ("QAT (fake quant)", qat / WEIGHTS, {k: t.with_method("qat") for k, t in base.items()}),
            ("control (no fake quant)", control / WEIGHTS,
             {k: CalibrationTable.load(table_path(control, k)).with_method("qat") for k in KINDS})]
    split = load_split(ensure_corpus(default_cache_dir(), {"test": args.utts}, progress=False), "test")
    n = min(args.utts, len(split))
    feats, texts = [split.features(i) for i in range(n)], split.texts[:n]
    rows = []
    for label, weights, tables in sets:
        models = models_of(label, weights, tables, args.work)
        for precision in ("fp32", "int8"):
            t0 = time.time()
            enc = open_onnx(models[precision]["encoder"], threads=args.threads, kind="encoder")
            dec = open_onnx(models[precision]["decoder"], threads=args.threads, kind="decoder")
            res = evaluate(enc, dec, feats, texts, DEFAULT_VOCAB, progress=False)
            rows.append({"weights": label, "precision": precision, "cer_rescore": res["cer_rescore"],
                         "cer_greedy": res["cer_greedy"], "wer_rescore": res["wer_rescore"],
                         "eval_s": round(time.time() - t0, 1)})
            print(f"{label:<26} {precision}: CER {100 * res['cer_rescore']:.2f} %  greedy {100 * res['cer_greedy']:.2f} %",
                  flush=True)
    result = {"test_utts": n, "base_method": base_method, "recipe": "onnxruntime", "rows": rows,
              "qat": str(args.qat), "control": str(args.control)}
    write_json(OUT / "qat_ablation.json", result)
    with atomic_path(OUT / "qat_ablation.md") as tmp:
        tmp.write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    by = {(r["weights"], r["precision"]): r for r in result["rows"]}
    lines = ["# QAT ablation: fake quantization or just more fine-tuning?", "",
             f"Held-out test split, {result['test_utts']} utterances, attention-rescoring CER; INT8 = every "
             f"Linear/Conv, ONNX Runtime recipe; INT8 ranges: `{result['base_method']}` PTQ ranges of the original "
             "model for all three (QAT keeps activation ranges fixed). Reproduce: "
             "`.venv/bin/python experiments/qat_ablation.py --control DIR`.", "",
             "| weights | FP32 CER | all-INT8 CER | INT8 − FP32 | greedy CER FP32 / INT8 |", "| --- | ---: | ---: | ---: | ---: |"]
    for w in dict.fromkeys(r["weights"] for r in result["rows"]):
        f, i = by[(w, "fp32")], by[(w, "int8")]
        lines.append(f"| {w} | {100 * f['cer_rescore']:.2f} % | {100 * i['cer_rescore']:.2f} % | "
                     f"{100 * (i['cer_rescore'] - f['cer_rescore']):+.2f} pt | "
                     f"{100 * f['cer_greedy']:.2f} % / {100 * i['cer_greedy']:.2f} % |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
