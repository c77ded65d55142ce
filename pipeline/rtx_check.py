"""`wb rtx-check`: build a run's deliverables with a real TensorRT builder (TensorRT-RTX, on CPU, ahead of time
for one compute capability), so that a parser or builder error in any graph our TensorRT recipe writes fails CI.

Any run: the graphs are those of `models.json` ({label: {graph: path}}, written by the WeNet pipeline and by task
runs; a path is run-relative, or absolute for a user's FP32 graph outside the run). A WeNet run's graphs are its
encoder and decoder; a task run's are its task's graphs (run.json `task.graphs`). Variants, each for every graph:
  FP32        the run's FP32 graph: the size reference
  FP16        the FP16 baseline (always the TensorRT recipe: FP16-typed graph with FP32 islands)
  INT8 all    every quantizable node INT8, by the TensorRT recipe, ranges of the calibrator the search started from
  QAT export  the shipped QAT weights with quantizers inserted from its plans and ranges, exported through torch
              (quant.qat.export_qat_onnx, what `wb qat` writes as qdq/*.onnx); only in a WeNet run with qat.dir
  INT8 all (qat)  a task run with a task QAT directory (`wb qat --config`): its all-INT8 plan on the fine-tuned
              graph with the QAT ranges, by the TensorRT recipe
  selected    the selected mix, by the TensorRT recipe
A run placed by the ONNX Runtime recipe (the CPU default) has its INT8 and selected plans placed again here by
the TensorRT recipe, same plans and ranges (under rtx/models/). Each graph is also checked by graph.validate.
An INT8 plan smaller than the FP32 plan by about three quarters of its INT8 layers' weight bytes is the evidence
that those weights are stored as INT8 (weights that stay float, such as embeddings, keep their bytes).

Engine shapes: the run's own, run.json `task.shapes` ({graph: {input: {min, opt, max}}}, what a task run built its
ONNX Runtime engines with); a run without them (a WeNet run) takes the WeNet pipeline's ranges
(tasks.wenet_asr.PIPELINE_TIME_RANGES over engines.default_shapes), as before.

Writes, in the run directory: rtx/<variant>/<graph>_engine/ (engine artifacts, reused by content hash),
rtx_builds.json, rtx_builds.md, and the report again (it lists the plan sizes). Each row's "kind" is the graph's
name (encoder/decoder in a WeNet run).
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import engines
from graph.plan import load_plan
from graph.placement import quantize
from graph.validate import validate
from pipeline.config import is_wenet
from core.errors import WorkbenchError
from core.fsutil import atomic_path, read_json, write_json

from tasks.wenet_asr import KINDS, PIPELINE_TIME_RANGES

MODELS_FILE, RESULT_JSON, RESULT_MD = "models.json", "rtx_builds.json", "rtx_builds.md"


def resolve_run_dir(path: str | Path) -> Path:
    """The run directory of `path`: a run directory itself, or a published `--out` directory (its run.json
    names the run, found under pipeline.config.default_runs_root())."""
    from pipeline.config import default_runs_root

    path = Path(path)
    if (path / MODELS_FILE).is_file():
        return path
    if not (path / "run.json").is_file():
        raise WorkbenchError(f"{path} is neither a run directory nor a published run (no {MODELS_FILE}, no run.json)")
    run_dir = default_runs_root() / read_json(path / "run.json")["id"]
    if not (run_dir / MODELS_FILE).is_file():
        raise WorkbenchError(f"{path} was published from run {run_dir}, which has no {MODELS_FILE} (a run from "
                             "before `wb rtx-check` existed, or one that did not finish): run the search again")
    return run_dir


def _slug(label: str) -> str:
    """"INT8 all (max)" -> "int8_all_max": a directory name."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def is_task_run(run: dict) -> bool:
    """A run of the one pipeline (pipeline/experiment.py: run.json has a "task" table, WeNet's too), not a run
    recorded before it (WeNet only, no "task")."""
    return isinstance(run.get("task"), dict)


def graph_names(run: dict, models: dict) -> list[str]:
    """The run's graph names, in the run's order: WeNet's encoder and decoder, or the task's graphs (run.json
    `task.graphs`, else the FP32 entry of models.json)."""
    if not is_task_run(run):
        return list(KINDS)
    return list(run["task"].get("graphs") or models["FP32"])


def model_path(run_dir: Path, models: dict, label: str, graph: str) -> Path:
    """A models.json entry as a path: run-relative, or absolute (a user's FP32 graph outside the run)."""
    try:
        p = Path(models[label][graph])
    except KeyError:
        raise WorkbenchError(f"{run_dir / MODELS_FILE} has no graph {graph!r} for {label!r}") from None
    p = p if p.is_absolute() else run_dir / p
    if not p.is_file():
        raise WorkbenchError(f"{label} {graph}: {p} (named in {run_dir / MODELS_FILE}) does not exist here")
    return p


def engine_shapes(run: dict, graph: str, onnx_path: Path) -> tuple[dict, str]:
    """(shapes, engine kind) for building `graph`: the run's recorded task.shapes and engine kinds (default
    "generic"), else the WeNet pipeline's ranges for its encoder/decoder."""
    task = run.get("task") or {}
    recorded = task.get("shapes") or {}
    if graph in recorded:
        return recorded[graph], (task.get("engine_kinds") or {}).get(graph, "generic")

    if graph not in PIPELINE_TIME_RANGES:
        raise WorkbenchError(f"run.json records no engine shapes (task.shapes) for graph {graph!r}, and it is not a "
                             f"WeNet encoder/decoder: run the search again with this workbench (task runs record them)")
    return engines.default_shapes(onnx_path, graph, time_range=PIPELINE_TIME_RANGES[graph]), graph


def _tensorrt_recipe(run_dir: Path, run: dict, label: str, kind: str, onnx_path: Path, plan: dict,
                     calibrator: str, fp32: Path | None = None) -> tuple[Path, dict]:
    """(model, plan): `onnx_path` itself when the run placed by the TensorRT recipe, else the same plan placed
    again by it on the FP32 model of the calibrator's source (`fp32` in a task run), with that calibrator's
    table."""
    if run["recipe"] == "tensorrt":
        return onnx_path, plan
    # QAT ranges go on the QAT weights (pipeline.workspace sources), PTQ ranges of a SmoothQuant run on its
    # smoothed graph (pipeline.calibration), any other on the run's FP32 graph
    smoothed = run["config"]["calibration"].get("smoothquant", "none") != "none"
    source = run_dir / "models" / "qat_fp32" / f"{kind}.onnx" if calibrator == "qat" else \
        run_dir / "models" / "smoothed" / f"{kind}.onnx" if smoothed else \
        fp32 if fp32 is not None else run_dir / "models" / "fp32" / f"{kind}.onnx"
    out = run_dir / "rtx" / "models" / f"{_slug(label)}.{kind}.onnx"
    if not out.is_file():
        quantize(str(source), run_dir / "calibration" / f"{kind}.{calibrator}.json", plan=plan, recipe="tensorrt",
                 out=out)
    return out, plan


def _qat_export(run: dict, out_dir: Path) -> dict[str, tuple[Path, dict]]:
    """{kind: (Q/DQ ONNX, plan)}: the QAT directory's weights, quantizers from its plans and ranges, exported."""
    from models.export import export_onnx
    from models.weights import load_weights

    from quant.qat import export_qat_onnx, insert_quantizers
    from quant.qat_run import WEIGHTS, check_qat_dir, table_path
    from quant.table import CalibrationTable


    qdir = check_qat_dir(run["config"]["qat"]["dir"])
    plans = {k: load_plan(qdir / f"{k}.plan.json") for k in KINDS}
    if not all((out_dir / f"{k}.onnx").is_file() for k in KINDS):
        model = load_weights(qdir / WEIGHTS).eval()
        fp32 = dict(zip(KINDS, export_onnx(model, out_dir / "fp32", opset=run["config"]["model"]["opset"])))
        for k in KINDS:
            insert_quantizers(model, plans[k], CalibrationTable.load(table_path(qdir, k)), fp32[k])
        export_qat_onnx(model, out_dir, opset=run["config"]["model"]["opset"])
    return {k: (out_dir / f"{k}.onnx", plans[k]) for k in KINDS}


def variants(run_dir: Path) -> dict[str, dict[str, tuple[Path, dict | None]]]:
    """{variant: {graph: (ONNX path, plan or None for FP32)}} of the run, TensorRT recipe throughout."""
    run, models = read_json(run_dir / "run.json"), read_json(run_dir / MODELS_FILE)
    graphs = graph_names(run, models)
    path_of = lambda label, g: model_path(run_dir, models, label, g)  # noqa: E731
    plan_beside = lambda p: load_plan(p.with_suffix(".plan.json"))  # noqa: E731 - the workspaces write it
    # a task run's FP32 graph may live outside the run (the task's export, a user's file): re-placement starts there
    fp32 = (lambda g: path_of("FP32", g)) if is_task_run(run) else (lambda g: None)  # noqa: E731
    out: dict[str, dict] = {"FP32": {g: (path_of("FP32", g), None) for g in graphs}}
    if "FP16" in models:
        out["FP16"] = {g: (path_of("FP16", g), plan_beside(path_of("FP16", g))) for g in graphs}
    start = next((x["calibrator"] for x in run.get("searches") or [] if x.get("calibrator") != "qat"), None)
    if f"INT8 all ({start})" in models:
        label = f"INT8 all ({start})"
        out[label] = {}
        for g in graphs:
            out[label][g] = _tensorrt_recipe(run_dir, run, label, g, path_of(label, g),
                                             plan_beside(path_of(label, g)), start, fp32(g))
    if run["config"].get("qat", {}).get("dir") and is_wenet(run["config"]):  # WeNet's QAT Q/DQ export
        out["QAT export"] = _qat_export(run, run_dir / "rtx" / "models" / "qat_export")
    elif "INT8 all (qat)" in models:  # a task QAT directory (quant.qat_distill): its all-INT8, TensorRT recipe
        label = "INT8 all (qat)"
        out[label] = {g: _tensorrt_recipe(run_dir, run, label, g, path_of(label, g), plan_beside(path_of(label, g)),
                                          "qat", fp32(g)) for g in graphs}
    if "selected" in models:
        calibrator = run["selected"]["calibrator"]
        out["selected"] = {}
        for g in graphs:
            plan = load_plan(run_dir / "final" / f"{g}.plan.json")
            if calibrator is None:  # a float baseline won (FP32, FP16): built as written, nothing to re-place;
                # checked against its baseline's own plan (final/'s plan covers the quantizable nodes only, so for
                # FP16 it leaves the FP16 activation MatMuls as "fp32")
                source = run["selected"].get("source")
                if source in models and source != "FP32":
                    plan = plan_beside(path_of(source, g))
                out["selected"][g] = (path_of("selected", g), plan)
            else:
                out["selected"][g] = _tensorrt_recipe(run_dir, run, "selected", g, path_of("selected", g), plan,
                                                      calibrator, fp32(g))
    return out


def check_run(path: str | Path, compute_capability: int = 89, log=print) -> dict:
    """Build every variant with TensorRT-RTX; write rtx_builds.json/.md (the CLI re-renders the report, which
    lists them); WorkbenchError naming
    each graph that the parser or builder refused (after trying all of them)."""
    run_dir = resolve_run_dir(path)
    run = read_json(run_dir / "run.json")
    rows, failures = [], []
    for variant, kinds in variants(run_dir).items():
        for kind, (onnx_path, plan) in kinds.items():
            row = {"variant": variant, "kind": kind, "onnx": _shown(onnx_path, run_dir),
                   "onnx_bytes": onnx_path.stat().st_size,
                   "validator_problems": None if plan is None else len(validate(onnx_path, plan, "tensorrt"))}
            t0 = time.perf_counter()
            try:
                shapes, engine_kind = engine_shapes(run, kind, onnx_path)
                art = engines.build(onnx_path, shapes, run_dir / "rtx" / _slug(variant) / f"{kind}_engine",
                                    backend="tensorrt-rtx", kind=engine_kind, compute_capabilities=[compute_capability])
                row.update(plan_bytes=art.meta["plan_bytes"], build_s=art.meta["build_s"], reused=art.reused,
                           engine=str(art.path.relative_to(run_dir)))
            except WorkbenchError as e:
                row["error"] = str(e)[:500]
                failures.append(f"{variant} {kind}: {str(e)[:200]}")
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            log(f"  {variant:<22} {kind:<8} " + (f"plan {row['plan_bytes'] / 1e6:7.1f} MB  ({row['build_s']:.0f} s"
                                                  f"{', reused' if row['reused'] else ''})" if "error" not in row
                                                  else f"FAILED: {row['error'][:150]}"))
    fp32 = {r["kind"]: r.get("plan_bytes") for r in rows if r["variant"] == "FP32"}
    for r in rows:
        if r.get("plan_bytes") and fp32.get(r["kind"]):
            r["vs_fp32"] = round(r["plan_bytes"] / fp32[r["kind"]], 3)
    versions = engines.base._versions("tensorrt-rtx")
    result = {"format": "wb-rtx-check/1", "run": run_dir.name, "compute_capability": compute_capability,
              "tensorrt_rtx": versions["tensorrt-rtx"], "rows": rows, "failures": failures}
    write_json(run_dir / RESULT_JSON, result)
    with atomic_path(run_dir / RESULT_MD) as tmp:
        tmp.write_text(markdown(result), encoding="utf-8")
    if Path(path).resolve() != run_dir.resolve():  # a published directory gets the results too
        for name in (RESULT_JSON, RESULT_MD):
            (Path(path) / name).write_bytes((run_dir / name).read_bytes())
    if failures:
        raise WorkbenchError(f"TensorRT-RTX refused {len(failures)} of {len(rows)} graphs of {run_dir}: "
                             + " | ".join(failures))
    return result


def _shown(p: Path, run_dir: Path) -> str:
    """A graph's path as rtx_builds.json records it: run-relative, else absolute (a graph outside the run)."""
    p = Path(p)
    for a, root in ((p, run_dir), (p.resolve(), run_dir.resolve())):
        if a.is_relative_to(root):
            return str(a.relative_to(root))
    return str(p)


def rtx_table_rows(result: dict) -> list[list[str]]:
    """Rows of the plan-size table of `wb rtx-check` (pipeline.rtx_check): rtx_builds.md and the report."""
    out = []
    for r in result["rows"]:
        probs = r.get("validator_problems")
        out.append([r["variant"], r["kind"], f"{r['onnx_bytes'] / 1e6:.1f}",
                    f"{r['plan_bytes'] / 1e6:.1f}" if r.get("plan_bytes") else "FAILED",
                    f"{r['vs_fp32']:.2f}" if r.get("vs_fp32") else "—",
                    f"{r['build_s']:.0f}" + (" (reused)" if r.get("reused") else "") if r.get("build_s") else "—",
                    "—" if probs is None else ("ok" if probs == 0 else f"{probs} problems")])
    return out


RTX_TABLE_HEADERS = ["variant", "kind", "ONNX (MB)", "plan (MB)", "plan / FP32 plan", "build (s)", "our validator"]


def markdown(result: dict) -> str:
    lines = [f"# TensorRT-RTX {result['tensorrt_rtx']} builds of run {result['run']} (SM{result['compute_capability']},"
             " built on CPU, not run)", "", "| " + " | ".join(RTX_TABLE_HEADERS) + " |",
             "|" + "---|" * len(RTX_TABLE_HEADERS)]
    lines += ["| " + " | ".join(row) + " |" for row in rtx_table_rows(result)]
    lines += ["", "An INT8 plan smaller than the FP32 plan by about three quarters of its INT8 layers' weight bytes: "
                  "those weights are stored as INT8 (float weights, such as embeddings, keep theirs)."]
    if result["failures"]:
        lines += ["", "Refused by TensorRT-RTX:"] + [f"- {f}" for f in result["failures"]]
    return "\n".join(lines) + "\n"
