"""Stage: calibration. One table per graph with every PTQ calibrator's ranges (quant.calibrate), split into one
file per calibrator, plus the task's own calibrators that come with their weights (QAT). Cached in the run's
calibration/ directory: a resume reads the tables instead of recalibrating.

With `[calibration] smoothquant` (not "none"), each graph is first smoothed (quant.smooth, graph.smooth: exact in
FP32) on the calibration feeds, written to models/smoothed/<graph>.onnx with its report, and every PTQ calibrator
calibrates and places on that graph (the workspace source of those methods); FP32 stays the original graph."""
from __future__ import annotations

from core.errors import WorkbenchError
from core.fsutil import write_json
from quant.calibrate import calibrate
from quant.methods import method_key
from quant.table import CalibrationTable


def calibrate_stage(exp) -> list[str]:
    """Fill `exp.ws.tables` (and the sources of extra methods); returns the run's calibrator keys in config
    order."""
    task, ws, c = exp.task, exp.ws, exp.cfg["calibration"]
    key_of = lambda m: method_key(m, c["percentile"])  # noqa: E731
    ptq = [m for m in c["methods"] if m != "qat"]  # "qat" ranges come with their weights (task.extra_methods)
    keys = [key_of(m) for m in ptq]
    if ptq:
        fp32_runners = {}  # the FP32 runners of the graphs before, for chained tasks' feeds
        smoothed = {}
        for g in ws.names:
            path = exp.dir / "calibration" / f"{g}.json"
            feeds = None
            source = ws.fp32[g]
            if c["smoothquant"] != "none":
                source = exp.dir / "models" / "smoothed" / f"{g}.onnx"
                if not source.is_file():
                    feeds = list(task.calibration_feeds(g, fp32_runners))
                    _smooth(ws.fp32[g], feeds, c["smoothquant_alpha"], c["smoothquant"], source)
                smoothed[g] = source
            if not path.is_file():
                feeds = feeds if feeds is not None else list(task.calibration_feeds(g, fp32_runners))
                # the default tensor set (graph.placement.calibration_tensors) serves both recipes and any plan
                table = calibrate(source, feeds, methods=",".join(ptq), percentiles=(c["percentile"],),
                                  default_method=keys[0], padding=task.graph(g).padding, progress=exp.progress,
                                  data_info={"task": task.name, "graph": g, "feeds": len(feeds)})
                table.save(path)
            table = CalibrationTable.load(path)
            for key in keys:
                p = exp.dir / "calibration" / f"{g}.{key}.json"
                if not p.is_file():
                    table.with_method(key).save(p)
                ws.tables.setdefault(key, {})[g] = p
            fp32_runners[g] = ws.runner(g, ws.fp32[g])
        if smoothed:  # every PTQ calibrator places on the smoothed graphs
            for key in keys:
                ws.add_source(key, smoothed)
    extra = task.extra_methods()
    if "qat" in c["methods"] and "qat" not in extra:  # a task QAT directory (`wb qat --config`)
        from quant.qat_distill import task_qat_sources

        extra["qat"] = task_qat_sources(exp.cfg["qat"]["dir"], task, exp.dir)
    for m, x in extra.items():
        ws.add_source(m, x["sources"])
        ws.tables[m] = dict(x["tables"])
    methods = [m if m == "qat" else key_of(m) for m in c["methods"]]
    missing = [m for m in methods if m not in ws.tables]
    if missing or not methods:
        raise WorkbenchError(f"config calibration.methods = {c['methods']}: task {task.name!r} has no ranges for "
                             f"{', '.join(missing) or 'any calibrator'} (PTQ calibrators: max, percentile, entropy, "
                             f"mse)")
    return methods


def _smooth(fp32, feeds, alpha: float, targets: str, out) -> None:
    """The smoothed FP32 graph at `out` (written atomically) and its report beside it (`.smooth.json`)."""
    import onnx

    from core.fsutil import atomic_path
    from quant.smooth import smooth

    model, report = smooth(fp32, feeds, alpha, targets)
    if not report["tensors"]:
        raise WorkbenchError(f"config calibration.smoothquant = {targets!r}: {fp32} has no MatMul input to smooth")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))
    write_json(out.with_suffix(".smooth.json"), report | {"source": str(fp32)})
