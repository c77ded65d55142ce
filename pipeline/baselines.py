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
from tasks.base import ALL, Task

# What a baseline record depends on besides the models' content: these config sections (resolved: backend
# "auto" is already the backend used) and, of [latency], the keys that time baselines (search_* and
# tie_tolerance only rank search candidates). [calibration] only for INT8 records.
BASELINE_SECTIONS = ("task", "data", "backend", "quantize")
# baselines are timed with the search protocol (Experiment.full_record)
BASELINE_LATENCY_KEYS = ("batch_sizes", "seq_lens", "search_warmup", "search_iters", "models")
_SHA_MEMO: dict[tuple, str] = {}


def _threshold(kind: str, hi: bool, d: float, reference: float) -> float | None:
    """The pass threshold of one reference value, in the metric's own direction."""
    if kind == "absolute":
        return reference - d if hi else reference + d
    if kind == "relative":
        return reference * (1 - d) if hi else reference * (1 + d)
    if kind == "fixed":
        return d
    return None


def criterion_of(cfg: dict, task: Task, reference: float | dict) -> dict:
    """The pass rule as data, in the metric's own direction: absolute (FP32 -/+ delta), relative (FP32 x (1 -/+
    delta)), fixed (the value delta itself, e.g. cosine >= 0.99) or hackathon (every case of the task's
    reference check passes).

    `reference`: FP32's accuracy dict (its flat metrics and, for a task with eval_sets, "sets"), or FP32's
    value of the metric. With sets, the rule applies to each set with its own threshold from FP32's value on
    it ([criterion] sets = "each"), or to the weighted mean of the sets' values against the weighted mean of
    FP32's ("weighted", [criterion] weights = {set = w}, default equal). [criterion] mode = "point" judges the
    point estimate; "bound" the bound of its paired bootstrap 95 % interval in the metric's bad direction
    (FP32's value + the interval's high end of the change for a lower-is-better metric, the low end else)."""
    c = cfg["criterion"]
    m = task.metric(c["metric"])
    hi, d, kind = m.higher_is_better, float(c["delta"]), c["kind"]
    mode, how, weights = c.get("mode", "point"), c.get("sets", "each"), dict(c.get("weights") or {})
    fp32 = reference if isinstance(reference, dict) else {m.name: reference}
    ref = fp32[m.name]
    if kind == "absolute":
        text = f"{m.name} {'>=' if hi else '<='} FP32 {m.name} {'-' if hi else '+'} {d:g} (absolute)"
    elif kind == "relative":
        text = f"{m.name} {'>=' if hi else '<='} FP32 {m.name} x (1 {'-' if hi else '+'} {d:g})"
    elif kind == "fixed":
        text = f"{m.name} {'>=' if hi else '<='} {d:g}"
    elif kind == "hackathon":
        if not task.check_name:
            raise WorkbenchError(f"criterion.kind = \"hackathon\" needs a task with a reference output check; "
                                 f"task {task.name!r} has none")
        text = "every case of the hackathon output check passes"
    else:
        raise WorkbenchError(f"config criterion.kind = {kind!r} is not one of absolute, relative, fixed, hackathon")
    if mode not in ("point", "bound") or how not in ("each", "weighted"):
        raise WorkbenchError(f"config criterion.mode = {mode!r} / criterion.sets = {how!r}: choose point or bound "
                             f"/ each or weighted")
    if mode == "bound" and kind == "hackathon":
        raise WorkbenchError("config criterion.mode = \"bound\" judges a metric's interval; the hackathon kind "
                             "has none (use mode = \"point\")")
    thr = _threshold(kind, hi, d, ref)
    if thr is not None and not np.isfinite(thr):
        raise WorkbenchError(f"criterion {text} gives the threshold {thr} (FP32 {m.name} is {reference}): use "
                             f"criterion.kind = \"fixed\" for this metric")
    names = list(getattr(task, "eval_sets", ()) or ())
    crit = {"metric": m.name, "kind": kind, "delta": d, "reference": ref, "threshold": thr,
            "higher_is_better": hi, "text": text, "mode": mode, "sets": how, "set_rules": {}}
    if names and kind != "hackathon":
        sets = fp32.get("sets") or {}
        crit["set_rules"] = {n: {"reference": sets[n][m.name], "threshold": _threshold(kind, hi, d, sets[n][m.name])}
                             for n in names}
        if how == "weighted":
            bad = set(weights) - set(names)
            if bad or any(not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0 for w in weights.values()):
                raise WorkbenchError(f"config criterion.weights = {weights!r}: non-negative numbers for the task's "
                                     f"sets {names}")
            w = {n: float(weights.get(n, 0.0 if weights else 1.0)) for n in names}
            if sum(w.values()) <= 0:
                raise WorkbenchError(f"config criterion.weights = {weights!r} weigh no set of {names}")
            wref = sum(w[n] * crit["set_rules"][n]["reference"] for n in names) / sum(w.values())
            crit["weights"], crit["weighted"] = w, {"reference": wref, "threshold": _threshold(kind, hi, d, wref)}
            crit["text"] += f", on the sets' weighted mean ({', '.join(f'{n} {w[n]:g}' for n in names)})"
        else:
            crit["text"] += f", on each set ({', '.join(names)})"
    elif how == "weighted" and weights:
        raise WorkbenchError(f"config criterion.weights names sets, but task {task.name!r} has one evaluation set")
    if mode == "bound":
        crit["text"] += "; judged on the 95 % interval's bound in the metric's bad direction"
    return crit


def judged_value(crit: dict, acc: dict, name: str = ALL) -> float:
    """The value the criterion judges of set `name` (ALL: the flat metric): the point estimate, or with mode
    "bound" FP32's value plus the bad-direction bound of the interval of the change."""
    m, hi = crit["metric"], crit["higher_is_better"]
    if name != ALL and name not in (acc.get("sets") or {}):
        raise WorkbenchError(f"an accuracy record without set {name!r} (a cached result from before the task "
                             f"had evaluation sets?): use a new run directory")
    point = acc[m] if name == ALL else acc["sets"][name][m]
    if crit.get("mode", "point") == "point":
        return point
    ci = (acc.get("intervals") or {}).get(name)
    if not ci or ci.get("metric", m) != m:
        raise WorkbenchError(f"criterion.mode = \"bound\" needs the paired interval of {m} on set {name!r}; this "
                             f"record has {'one of ' + str(ci.get('metric')) if ci else 'none'} (a task with "
                             f"evaluate_items and delta_interval for this metric)")
    ref = crit["reference"] if name == ALL else crit["set_rules"][name]["reference"]
    return ref + (ci["low"] if hi else ci["high"])


def verdicts(crit: dict, acc: dict) -> dict[str, bool]:
    """{unit: passes} of what the criterion judges: each set (or ALL for a task with one set), or "weighted"."""
    if crit["kind"] == "hackathon":
        return {"hackathon": acc.get("hackathon_passed") == acc.get("hackathon_total")}
    hi = crit["higher_is_better"]
    ok = (lambda v, t: v >= t - 1e-12) if hi else (lambda v, t: v <= t + 1e-12)  # noqa: E731
    rules = crit.get("set_rules") or {}
    if not rules:
        return {ALL: ok(judged_value(crit, acc), crit["threshold"])}
    if crit.get("sets") == "weighted":
        w = crit["weights"]
        v = sum(w[n] * judged_value(crit, acc, n) for n in rules) / sum(w.values())
        return {"weighted": ok(v, crit["weighted"]["threshold"])}
    return {n: ok(judged_value(crit, acc, n), r["threshold"]) for n, r in rules.items()}


def passes_of(crit: dict) -> Callable[[dict], bool]:
    """accuracy dict -> whether it passes `crit` (with the hackathon kind: the check's counts in it)."""
    return lambda acc: all(verdicts(crit, acc).values())


def confirmation_criterion(crit: dict, reference: float) -> dict:
    """The rule on the confirmation set: the run's kind, delta and mode, with FP32's value on that set."""
    hi = crit["higher_is_better"]
    out = {k: v for k, v in crit.items() if k not in ("set_rules", "weights", "weighted")}
    out.update(reference=reference, threshold=_threshold(crit["kind"], hi, crit["delta"], reference), set_rules={},
               sets="each")
    return out


def content_sha(path: Path) -> str:
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
    blob = {"models": {k: content_sha(p) for k, p in sorted(models.items())},
            "reference": {k: content_sha(p) for k, p in sorted(reference.items())},
            "config": {s: cfg[s] for s in BASELINE_SECTIONS}
            | {"latency": {k: cfg["latency"][k] for k in BASELINE_LATENCY_KEYS}}
            | ({"calibration": cfg["calibration"]} if calibrator else {}),
            "data": data}
    return "baseline:" + hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def add_intervals(ws, baselines: list[dict]) -> None:
    """Each baseline's metric change against FP32 with its paired bootstrap 95 % interval over the evaluation
    items, per set (accuracy "intervals", task.delta_interval, seeded) and flat ("ci", for the report); FP32's
    items become the workspace's reference (the search's intervals). The per-item results stay in the cache,
    out of run.json."""
    ref = baselines[0].pop("items", None) if baselines else None
    ws.set_reference(ref)
    for b in baselines[1:]:
        items = b.pop("items", None)
        if items is not None and ref is not None and "accuracy" in b:
            ivs = ws.intervals(items, ref)
            b["accuracy"] = {k: v for k, v in b["accuracy"].items() if k != "intervals"}
            if ivs:
                b["accuracy"]["intervals"] = ivs
                if ALL in ivs:
                    b["ci"] = ivs[ALL]


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
    try:
        fp16, fp16_error = fp16_models(), None
    except WorkbenchError as exc:  # an FP16 graph the backend cannot build or run is a result, not a crash
        fp16, fp16_error = None, exc
    if exp.fanout.distributed:  # accuracies on the workers first; the records below time them here, alone
        exp.prefetch_baselines([(fp32, None)] + ([(fp16, None)] if fp16 else [])
                               + [(models, m) for (m, _), models in int8.items()])
    steps = tqdm(total=2 + len(int8), desc="baselines", disable=not exp.progress)
    baselines = [exp.full_record("FP32", fp32, precision="fp32", calibrator=None)]
    steps.update(1)
    models_of_label = {"FP32": (fp32, flat_of("fp32"))}
    if "accuracy" in baselines[0]:
        check_metric_record(exp.task, baselines[0]["accuracy"])
    crit = criterion_of(exp.cfg, exp.task, baselines[0]["accuracy"])
    try:
        if fp16_error:
            raise fp16_error
        baselines.append(exp.full_record("FP16", fp16, precision="fp16", calibrator=None))
        models_of_label["FP16"] = (fp16, flat_of("fp16"))
    except WorkbenchError as exc:  # placing, building or running it failed
        baselines.append({"label": "FP16", "precision": "fp16", "calibrator": None, "error": str(exc)[:300]})
    steps.update(1)
    # (recipe, source models) -> its first all-INT8 record: the calibrators' all-INT8 models of a recipe on the
    # same FP32 models are one graph. Not a QAT calibrator's: its own weights and table place another graph
    # (measured on MiniLM: the tensorrt recipe's QAT all-INT8 ran 2.1x FP32 against 1.6x for the PTQ ones)
    timed = {}
    for (m, r), models in int8.items():
        label = f"INT8 all ({m})" if r is None else f"INT8 all ({m}, {r} recipe)"
        graph_key = (r, tuple(sorted((g, str(p)) for g, p in ws.source(m).items())))
        rec = exp.full_record(label, models, timed_as=timed.get(graph_key), precision="int8", calibrator=m,
                              **({"recipe": r} if r else {}))
        timed.setdefault(graph_key, rec)
        baselines.append(rec)
        models_of_label[label] = (models, flat_of("int8"))
        steps.update(1)
    steps.close()
    add_intervals(exp.ws, baselines)  # before the verdicts: mode "bound" judges the intervals
    check = exp.task.check_name
    for b in baselines:
        if "accuracy" in b:
            if crit["kind"] == "hackathon":
                b["passed"] = b[check]["passed"] == b[check]["total"]
            else:
                b["verdicts"] = verdicts(crit, b["accuracy"]) if b is not baselines[0] or crit["mode"] == "point" \
                    else {k: True for k in verdicts({**crit, "mode": "point"}, b["accuracy"])}
                b["passed"] = all(b["verdicts"].values())
    return baselines, models_of_label, crit


def check_metric_record(task: Task, acc: dict) -> None:
    """A record cached before the task named its evaluation sets would judge the wrong thing: one clear error."""
    missing = [n for n in getattr(task, "eval_sets", ()) if n not in (acc.get("sets") or {})]
    if missing:
        raise WorkbenchError(f"the FP32 record has no results for evaluation sets {missing} (cached before the task "
                             f"had them?): use a new run directory")
