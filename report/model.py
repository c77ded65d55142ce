"""Numbers derived from a loaded run.json (pipeline.runfile.load_run): baselines, metrics, speedups, result rows.

What the report document, its plots and the run index read, so all three agree on every figure. No text
formatting here (report/format.py) and no I/O.
"""
from __future__ import annotations

import math
from typing import Any

METRIC_LABELS = {"cer_rescore": "CER", "wer_rescore": "WER", "cer_greedy": "greedy CER"}
METRIC_ORDER = ("cer_rescore", "wer_rescore", "cer_greedy")
SELECTED_LABEL = "selected mix"


def num(x: Any) -> float | None:
    """A finite number as float, else None (run.json fields may be missing, null, booleans or NaN)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def metric_label(name: str) -> str:
    return METRIC_LABELS.get(name, name)


def metric_of(entry: dict | None, name: str) -> float | None:
    return num(((entry or {}).get("accuracy") or {}).get(name))


def objective_of(entry: dict | None) -> float | None:
    return num(((entry or {}).get("latency") or {}).get("objective_ms"))


def cases_of(entry: dict | None) -> dict[tuple, float]:
    """{(model, bs, sl): median_ms} of one entry's latency cases."""
    out = {}
    for c in ((entry or {}).get("latency") or {}).get("cases") or []:
        if isinstance(c, dict) and num(c.get("median_ms")) is not None:
            out[(str(c.get("model", "?")), c.get("bs"), c.get("sl"))] = float(c["median_ms"])
    return out


def case_sort_key(key: tuple) -> tuple:
    """Encoder cases before decoder cases, then by batch size and sequence length."""
    model, bs, sl = key
    order = {"encoder": 0, "decoder": 1}.get(model, 2)
    return (order, model, bs if isinstance(bs, (int, float)) else 0, sl if isinstance(sl, (int, float)) else 0)


def _precision(b: dict) -> str:
    return str(b.get("precision") or "").lower()


def fp32_baseline(run: dict) -> dict | None:
    bl = run.get("baselines") or []
    return (next((b for b in bl if _precision(b) == "fp32"), None)
            or next((b for b in bl if str(b.get("label", "")).lower() == "fp32"), None))


def fp16_baseline(run: dict) -> dict | None:
    bl = run.get("baselines") or []
    return (next((b for b in bl if _precision(b) == "fp16"), None)
            or next((b for b in bl if str(b.get("label", "")).lower() == "fp16"), None))


def int8_baselines(run: dict) -> list[dict]:
    return [b for b in run.get("baselines") or [] if _precision(b) == "int8"]


def best_int8_baseline(run: dict) -> dict | None:
    """The fastest all-INT8 baseline (lowest latency objective); None if none was timed."""
    timed = [b for b in int8_baselines(run) if objective_of(b) is not None]
    return min(timed, key=objective_of, default=None)


def threshold_of(run: dict) -> float | None:
    crit = run.get("criterion") or {}
    thr = num(crit.get("threshold"))
    if thr is None:
        ref, delta = num(crit.get("reference")), num(crit.get("delta"))
        if ref is not None and delta is not None:
            thr = ref + delta if crit.get("kind") == "absolute" else ref * (1 + delta) if crit.get("kind") == "relative" else None
    return thr


def passes(entry: dict, metric: str, threshold: float | None, higher_is_better: bool = False) -> bool | None:
    """The entry's recorded verdict, else its metric against the threshold; None when neither is known."""
    if isinstance(entry.get("passed"), bool):
        return entry["passed"]
    m = metric_of(entry, metric)
    if m is None or threshold is None:
        return None
    return m >= threshold if higher_is_better else m <= threshold


def metric_names(run: dict) -> list[str]:
    """The criterion metric first, then CER/WER/greedy CER, then any other accuracy key that occurs."""
    names = [run["criterion"]["metric"]]
    entries = list(run.get("baselines") or []) + ([run["selected"]] if run.get("selected") else [])
    seen = {k for e in entries for k, v in (e.get("accuracy") or {}).items() if num(v) is not None}
    names += [m for m in METRIC_ORDER if m in seen]
    names += sorted(seen - set(METRIC_ORDER))
    return list(dict.fromkeys(names))


def speedup(ref: float | None, val: float | None) -> float | None:
    return ref / val if ref is not None and val not in (None, 0.0) else None


def result_rows(run: dict) -> list[dict]:
    """One row per baseline and the selected mix: metrics, pass, hackathon, objective, speedups vs FP32."""
    fp32 = fp32_baseline(run)
    ref_obj, ref_cases = objective_of(fp32), cases_of(fp32)
    metric, thr = run["criterion"]["metric"], threshold_of(run)
    entries = [("baseline", b) for b in run.get("baselines") or []]
    entries += [("search", x["best"]) for x in run.get("searches") or [] if isinstance(x.get("best"), dict)]
    if run.get("selected"):
        entries.append(("selected", run["selected"]))
    rows = []
    for kind, e in entries:
        hk = e.get("hackathon") or {}
        cases = cases_of(e)
        # The selected mix was re-timed side by side with FP32: its speedups use that FP32 timing.
        ref_e = {"latency": e["reference_latency"]} if isinstance(e.get("reference_latency"), dict) else None
        r_obj, r_cases = (objective_of(ref_e), cases_of(ref_e)) if ref_e else (ref_obj, ref_cases)
        rows.append({
            "label": str(e.get("label") or (SELECTED_LABEL if kind == "selected" else "?")),
            "kind": kind,
            "precision": e.get("precision"),
            "calibrator": e.get("calibrator"),
            "recipe": e.get("recipe"),  # None: the run's own recipe
            "metrics": {m: metric_of(e, m) for m in metric_names(run)},
            "metric": metric_of(e, metric),
            "passed": passes(e, metric, thr, bool(run["criterion"].get("higher_is_better"))),
            "ci": e.get("ci") if isinstance(e.get("ci"), dict) else None,
            "hackathon": (f"{hk['passed']}/{hk['total']}" if "passed" in hk and "total" in hk else None),
            "objective_ms": objective_of(e),
            "timed_as": (e.get("latency") or {}).get("timed_as"),  # a model of the same graph timed for it
            "speedup": speedup(r_obj, objective_of(e)),
            "cases": {k: {"median_ms": v, "speedup": speedup(r_cases.get(k), v)} for k, v in cases.items()},
        })
    return rows


def _set_entries(run: dict) -> list[dict]:
    return [b for b in run.get("baselines") or [] if isinstance(b.get("accuracy"), dict)] + \
        ([run["selected"]] if isinstance(run.get("selected"), dict) else [])


def set_names(run: dict) -> list[str]:
    """The evaluation sets the run measured (task.eval_sets), else those any record has."""
    names = list((run.get("task") or {}).get("eval_sets") or [])
    for e in _set_entries(run):
        names += [n for n in (e["accuracy"].get("sets") or {}) if n not in names]
    return names


def set_rows(run: dict) -> list[dict]:
    """One row per (baseline or selected mix, evaluation set): the criterion metric on the set, its change
    against FP32 on the set with the interval, and the set's verdict (None: not judged on its own)."""
    metric = run["criterion"]["metric"]
    fp32 = fp32_baseline(run) or {}
    ref_sets = (fp32.get("accuracy") or {}).get("sets") or {}
    rows = []
    for e in _set_entries(run):
        sets = e["accuracy"].get("sets") or {}
        ivs = e["accuracy"].get("intervals") or {}
        for name in set_names(run):
            v = num((sets.get(name) or {}).get(metric))
            ref = num((ref_sets.get(name) or {}).get(metric))
            verdict = (e.get("verdicts") or {}).get(name)
            rows.append({"label": str(e.get("label") or "?"), "set": name, "metric": v, "reference": ref,
                         "change": None if v is None or ref is None else v - ref,
                         "ci": ivs.get(name) if isinstance(ivs.get(name), dict) else None,
                         "passed": verdict if isinstance(verdict, bool) else None,
                         "selected": e is run.get("selected")})
    return rows


def confirmation_rows(run: dict) -> list[dict]:
    """The confirmation split's rows: each baseline, then each confirmed (or rejected) selection attempt."""
    conf = run.get("confirmation")
    if not isinstance(conf, dict):
        return []
    metric = run["criterion"]["metric"]
    rows = []

    def row(label, kind, search_acc, c):
        c = c or {}
        return {"label": label, "kind": kind, "search_metric": num((search_acc or {}).get(metric)),
                "metric": num((c.get("accuracy") or {}).get(metric)), "ci": c.get("ci"),
                "passed": c.get("passed") if isinstance(c.get("passed"), bool) else None}

    for b in run.get("baselines") or []:
        if isinstance(b.get("confirmation"), dict):
            rows.append(row(str(b.get("label")), "baseline", b.get("accuracy"), b["confirmation"]))
    for a in conf.get("attempts") or []:
        confirmed = a.get("label") == conf.get("confirmed")
        rows.append(row(f"{'selected' if confirmed else 'rejected'}: {a.get('label')}",
                        "selected" if confirmed else "rejected", a.get("accuracy"), a.get("confirmation")))
    return rows


def side_by_side_of(run: dict, label: str) -> dict | None:
    """The side-by-side timing row that covers `label` (timed itself, or the same plan as a timed option)."""
    rows = (run.get("side_by_side") or {}).get("rows") or []
    return next((r for r in rows if r.get("label") == label or label in (r.get("same_plan") or [])), None)


def qat_comparison(run: dict, rows: list[dict] | None = None) -> list[dict] | None:
    """Issue 8's comparison, when the run has a QAT calibrator: FP32, the most accurate PTQ all-INT8, the
    search from it, QAT all-INT8 and the search from QAT scales (`rows`: result_rows(run), relabelled).
    All of the run's own recipe: a second recipe's rows (`recipe` set) compare only among themselves."""
    rows = rows if rows is not None else result_rows(run)
    qat = next((r for r in rows if r["kind"] == "baseline" and r["calibrator"] == "qat" and not r["recipe"]), None)
    if qat is None:
        return None
    ptq = [r for r in rows if r["kind"] == "baseline" and r["precision"] == "int8" and r["calibrator"] != "qat"
           and not r["recipe"] and r["metric"] is not None]
    sign = 1.0 if run["criterion"].get("higher_is_better") else -1.0
    best_ptq = max(ptq, key=lambda r: sign * r["metric"], default=None)
    search = {r["calibrator"]: r for r in rows if r["kind"] == "search" and not r["recipe"]}
    picks = [("FP32", next((r for r in rows if r["precision"] == "fp32"), None)),
             (f"best PTQ all-INT8 ({best_ptq['calibrator']})" if best_ptq else "best PTQ all-INT8", best_ptq),
             ("PTQ selected mix (search from it)", search.get(best_ptq["calibrator"]) if best_ptq else None),
             ("QAT all-INT8", qat), ("QAT + search", search.get("qat"))]
    return [{**r, "label": label, "source_label": r["label"]} if r else {"label": label, "missing": True}
            for label, r in picks]


def latency_series(run: dict) -> list[tuple[str, dict]]:
    """The entries the latency plot compares: FP32, FP16, the fastest all-INT8 baseline, the selected mix."""
    best = best_int8_baseline(run)
    series = [("FP32", fp32_baseline(run)), ("FP16", fp16_baseline(run)),
              (f"best all-INT8: {best['label']}" if best else "all-INT8", best),
              (SELECTED_LABEL, run.get("selected"))]
    return [(name, e) for name, e in series if e and cases_of(e)]
