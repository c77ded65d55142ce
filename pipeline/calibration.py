"""Stage: calibration. One table per graph with every PTQ calibrator's ranges (quant.calibrate), split into one
file per calibrator, plus the task's own calibrators that come with their weights (QAT). Cached in the run's
calibration/ directory: a resume reads the tables instead of recalibrating."""
from __future__ import annotations

from core.errors import WorkbenchError
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
        for g in ws.names:
            path = exp.dir / "calibration" / f"{g}.json"
            if not path.is_file():
                feeds = list(task.calibration_feeds(g, fp32_runners))
                # the default tensor set (graph.placement.calibration_tensors) serves both recipes and any plan
                table = calibrate(ws.fp32[g], feeds, methods=",".join(ptq), percentiles=(c["percentile"],),
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
    extra = task.extra_methods()
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
