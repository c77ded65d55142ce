"""Stage: baselines. The criterion (the pass rule as data), the cache key of a baseline record, and the
records of FP32, FP16 and all-INT8 per calibrator: accuracy, latency, the task's reference check and the
paired bootstrap interval of the metric's change against FP32."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from core.errors import WorkbenchError
from core.fsutil import sha256_file
from tasks.base import Task

# What a baseline record depends on besides the models' content: these config sections (resolved: backend
# "auto" is already the backend used) and, of [latency], the keys that time baselines (search_* and
# tie_tolerance only rank search candidates). [calibration] only for INT8 records.
BASELINE_SECTIONS = ("task", "data", "backend", "quantize")
BASELINE_LATENCY_KEYS = ("batch_sizes", "seq_lens", "warmup", "iters", "models")
_SHA_MEMO: dict[tuple, str] = {}


def criterion_of(cfg: dict, task: Task, reference: float) -> dict:
    """The pass rule as data, in the metric's own direction: absolute (FP32 -/+ delta), relative (FP32 x (1 -/+
    delta)), fixed (the value delta itself, e.g. cosine >= 0.99) or hackathon (every case of the task's
    reference check passes)."""
    c = cfg["criterion"]
    m = task.metric(c["metric"])
    hi, d, kind = m.higher_is_better, float(c["delta"]), c["kind"]
    if kind == "absolute":
        thr = reference - d if hi else reference + d
        text = f"{m.name} {'>=' if hi else '<='} FP32 {m.name} {'-' if hi else '+'} {d:g} (absolute)"
    elif kind == "relative":
        thr = reference * (1 - d) if hi else reference * (1 + d)
        text = f"{m.name} {'>=' if hi else '<='} FP32 {m.name} x (1 {'-' if hi else '+'} {d:g})"
    elif kind == "fixed":
        thr, text = d, f"{m.name} {'>=' if hi else '<='} {d:g}"
    elif kind == "hackathon":
        if not task.check_name:
            raise WorkbenchError(f"criterion.kind = \"hackathon\" needs a task with a reference output check; "
                                 f"task {task.name!r} has none")
        thr, text = None, "every case of the hackathon output check passes"
    else:
        raise WorkbenchError(f"config criterion.kind = {kind!r} is not one of absolute, relative, fixed, hackathon")
    if thr is not None and not np.isfinite(thr):
        raise WorkbenchError(f"criterion {text} gives the threshold {thr} (FP32 {m.name} is {reference}): use "
                             f"criterion.kind = \"fixed\" for this metric")
    return {"metric": m.name, "kind": kind, "delta": d, "reference": reference, "threshold": thr,
            "higher_is_better": hi, "text": text}


def passes_of(crit: dict) -> Callable[[dict], bool]:
    """accuracy dict -> whether it passes `crit` (with the hackathon kind: the check's counts in it)."""
    if crit["kind"] == "hackathon":
        return lambda acc: acc.get("hackathon_passed") == acc.get("hackathon_total")
    thr = crit["threshold"]
    if crit["higher_is_better"]:
        return lambda acc: acc[crit["metric"]] >= thr - 1e-12
    return lambda acc: acc[crit["metric"]] <= thr + 1e-12


def _content_sha(path: Path) -> str:
    """sha256 of a model file, memoised by (path, size, mtime) within the process."""
    st = Path(path).stat()
    memo = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _SHA_MEMO:
        _SHA_MEMO[memo] = sha256_file(path)
    return _SHA_MEMO[memo]


def baseline_key(cfg: dict, models: dict[str, Path], reference: dict[str, Path], data: dict,
                 calibrator: str | None = None) -> str:
    """The cache key of a baseline: the content (not the path) of the models and of the FP32 reference its
    check compares with, the config that changes the result, and `data` (the task's fingerprint, e.g. the
    vocabulary and the evaluation texts). A copied run directory finds its records; a resume with another
    config does not."""
    blob = {"models": {k: _content_sha(p) for k, p in sorted(models.items())},
            "reference": {k: _content_sha(p) for k, p in sorted(reference.items())},
            "config": {s: cfg[s] for s in BASELINE_SECTIONS}
            | {"latency": {k: cfg["latency"][k] for k in BASELINE_LATENCY_KEYS}}
            | ({"calibration": cfg["calibration"]} if calibrator else {}),
            "data": data}
    return "baseline:" + hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def add_intervals(task: Task, baselines: list[dict]) -> None:
    """Each baseline's metric change against FP32 with its paired bootstrap 95 % interval over the evaluation
    items ("ci"; task.delta_interval, seeded), for the report. The criterion still compares point estimates.
    The per-item results stay in the cache, out of run.json."""
    ref = baselines[0].pop("items", None) if baselines else None
    for b in baselines[1:]:
        items = b.pop("items", None)
        if items is not None and ref is not None:
            ci = task.delta_interval(items, ref)
            if ci:
                b["ci"] = ci


def baselines_stage(exp) -> tuple[list[dict], dict, dict]:
    """(records, {label: (models, flat plan)}, criterion) of FP32, FP16 and all-INT8 per calibrator."""
    ws, names = exp.ws, exp.ws.names
    all_of = lambda g, prec: {n: prec for n in ws.int8_nodes(g)}  # noqa: E731
    flat_of = lambda prec: {exp.key(g, n): prec for g in names for n in ws.int8_nodes(g)}  # noqa: E731
    fp32 = dict(ws.fp32)

    def fp16_models():  # FP16 on the run's FP32 weights; the first calibrator's table is unused by FP16 nodes
        return {g: ws.model(g, all_of(g, "fp16"), exp.methods[0], default="fp16", source="fp32") for g in names}

    # all-INT8 per calibrator, and per calibrator of each extra recipe ({"recipe"} in its record)
    recipes = [None] + list(exp.cfg["quantize"]["extra_recipes"])
    int8 = {(m, r): {g: ws.model(g, all_of(g, "int8"), m, recipe=r) for g in names} for r in recipes
            for m in exp.methods}
    if exp.fanout.distributed:  # accuracies on the workers first; the records below time them here, alone
        specs = [(fp32, None)]
        try:
            specs.append((fp16_models(), None))
        except WorkbenchError:
            pass  # recorded below as the serial run records it
        exp.prefetch_baselines(specs + [(models, m) for (m, _), models in int8.items()])
    steps = tqdm(total=2 + len(int8), desc="baselines", disable=not exp.progress)
    baselines = [exp.full_record("FP32", fp32, precision="fp32", calibrator=None)]
    steps.update(1)
    models_of_label = {"FP32": (fp32, flat_of("fp32"))}
    crit = criterion_of(exp.cfg, exp.task, baselines[0]["accuracy"][exp.cfg["criterion"]["metric"]])
    try:
        fp16 = fp16_models()
        baselines.append(exp.full_record("FP16", fp16, precision="fp16", calibrator=None))
        models_of_label["FP16"] = (fp16, flat_of("fp16"))
    except WorkbenchError as exc:  # an FP16 graph the backend cannot build or run is a result, not a crash
        baselines.append({"label": "FP16", "precision": "fp16", "calibrator": None, "error": str(exc)[:300]})
    steps.update(1)
    for (m, r), models in int8.items():
        label = f"INT8 all ({m})" if r is None else f"INT8 all ({m}, {r} recipe)"
        baselines.append(exp.full_record(label, models, precision="int8", calibrator=m, **({"recipe": r} if r else {})))
        models_of_label[label] = (models, flat_of("int8"))
        steps.update(1)
    steps.close()
    passes = passes_of(crit)
    check = exp.task.check_name
    for b in baselines:
        if "accuracy" in b:
            b["passed"] = passes(b["accuracy"]) if crit["kind"] != "hackathon" else \
                b[check]["passed"] == b[check]["total"]
    add_intervals(exp.task, baselines)
    return baselines, models_of_label, crit
