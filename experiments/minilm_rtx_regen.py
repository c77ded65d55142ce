"""Rebuild a task run's ONNX deliverables here from what came back from another machine, for `wb rtx-check`.

A run on the lent host (experiments/device_minilm.sh) brings back its run.json, models.json, calibration tables
and every placed graph's plan, but not its ONNX files (90 MB each for MiniLM). This places each models.json
entry again from its plan (the plan beside it, `<tag>.plan.json`; final/<graph>.plan.json for the selection)
and the run's calibration table, with the run's recipe and int8 mode (FP16: the tensorrt recipe, as the
pipeline does), on this machine's FP32 export, and points models.json's FP32 entry at that export. Placement is
deterministic, so the graphs are the run's own up to the FP32 export (the same weights and network code; the
torch version may differ).

    python experiments/minilm_rtx_regen.py RUN_DIR [--fp32 PATH]      # then: wb rtx-check --run RUN_DIR
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.fsutil import read_json, write_json  # noqa: E402
from graph.analysis import analyze, prepare_model  # noqa: E402
from graph.calib import load_table  # noqa: E402
from graph.placement import quantize  # noqa: E402
from graph.plan import load_plan  # noqa: E402


def regenerate(run_dir: Path, fp32: Path | None = None, log=print) -> dict:
    run, models = read_json(run_dir / "run.json"), read_json(run_dir / "models.json")
    graphs = run["task"]["graphs"]
    if fp32 is None:
        from models.minilm import export_onnx  # the sentence_embedding task's export (needs the [minilm] extra)

        fp32 = export_onnx(run["config"]["task"]["options"].get("layers", 6))
    if len(graphs) != 1:
        raise SystemExit(f"{run_dir}: {len(graphs)} graphs; this helper takes one-graph runs (give --fp32 per graph)")
    g = graphs[0]
    loaded = prepare_model(fp32)
    analysis = analyze(loaded)
    recipe, mode = run["recipe"], run["config"]["quantize"]["ort_mode"]
    methods = [b["calibrator"] for b in run["baselines"] if b.get("calibrator")]
    models["FP32"][g] = str(Path(fp32).resolve())
    for label, entry in models.items():
        if label == "FP32":
            continue
        out = run_dir / entry[g]
        if label == "selected":
            calibrator = run["selected"]["calibrator"]
            plan = load_plan(run_dir / "final" / f"{g}.plan.json")
            if calibrator is None:  # a float baseline was selected: final/ holds a copy of its graph
                source = next(b["label"] for b in run["baselines"] if b["label"] == run["selected"]["source"])
                src = Path(models[source][g]) if source == "FP32" else run_dir / models[source][g]
                if out.resolve() != src.resolve():
                    shutil.copyfile(src, out)
                log(f"{label}: copy of {source}")
                continue
        else:
            plan = load_plan(out.with_suffix(".plan.json"))
            calibrator = label[len("INT8 all ("):-1] if label.startswith("INT8 all (") else methods[0]
        r = "tensorrt" if "fp16" in plan["nodes"].values() else recipe
        table = load_table(run_dir / "calibration" / f"{g}.{calibrator}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        quantize(loaded, table, plan=plan, recipe=r, out=out, analysis=analysis,
                 ort_mode=mode if r == "onnxruntime" else "auto")
        log(f"{label}: {out.relative_to(run_dir)} ({r} recipe, {calibrator} ranges)")
    write_json(run_dir / "models.json", models)
    return models


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--fp32", type=Path, default=None, help="the FP32 graph (default: the MiniLM export here)")
    a = ap.parse_args()
    regenerate(a.run, a.fp32)
