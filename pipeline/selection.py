"""The selection stage shared by the pipelines: from the passing options (baselines and every passing plan the
search evaluated) to the mix to ship, decided on paired side-by-side timings (search.selection)."""
from __future__ import annotations

import hashlib
import json
from typing import Callable

from pipeline.baselines import content_sha
from search.algorithm import flat_plan_hash, plan_counts
from search.selection import choose, objective_runs, shortlist

# An option: (label, {graph: model path}, flat plan, record with "accuracy" (and "latency"), calibrator)
Option = tuple


def option_key(o: Option) -> str:
    """Options of one key are one graph: the same plan placed by the same recipe (a record of another recipe
    than the run's own says so in its "recipe")."""
    recipe = o[3].get("recipe")
    return flat_plan_hash(o[2]) + (f":{recipe}" if recipe else "")


def select(options: list[Option], accuracy_key: Callable[[dict], float], cache, side_by_side: Callable,
           fp32_models: dict, tolerance: float, most: int, exclude: set[str] = frozenset()
           ) -> tuple[Option, dict, dict] | None:
    """(chosen option, its side-by-side latency, the timing record for run.json) or None without options.
    `exclude`: labels of options ruled out (e.g. rejected by the confirmation stage); the choice is then the
    next by the same order among the others.

    One option per plan (same plan = same graph: the most accurate option of each, by `accuracy_key`, lower is
    better), shortlisted by sequential timing, timed with FP32 by `side_by_side({label: models})` (cached in
    `cache` by the models timed), chosen by search.selection.choose."""
    options = [o for o in options if o[0] not in exclude]
    if not options:
        return None
    groups: dict[str, list] = {}
    for o in options:
        groups.setdefault(option_key(o), []).append(o)
    reps = {h: min(g, key=lambda o: accuracy_key(o[3])) for h, g in groups.items()}
    cands = [{"label": o[0], "hash": h, "n_fallback": plan_counts(o[2])["n_fallback"], "acc": accuracy_key(o[3]),
              "seq_ms": (o[3].get("latency") or {}).get("objective_ms", float("inf"))} for h, o in reps.items()]
    short = shortlist(cands, lambda c: c["seq_ms"], most=most)
    by_label = {o[0]: o for o in reps.values()}
    timed = {c["label"]: by_label[c["label"]][1] for c in short}
    timed.setdefault("FP32", fp32_models)
    # keyed by the models' content, not their paths: a moved or copied run directory finds its timing
    key = hashlib.sha256(json.dumps({k: {m: content_sha(p) for m, p in v.items()} for k, v in sorted(timed.items())})
                         .encode()).hexdigest()[:16]
    lat = cache.get_or_compute(f"side-by-side/3:{key}", lambda: side_by_side(timed))
    runs = {label: objective_runs(lat[label]["cases"]) for label in timed}
    best, how = choose(short, runs, runs["FP32"], tolerance, accuracy_key=lambda c: c["acc"])
    ref = lat["FP32"]
    timing = {"note": "passing options (one per plan, the most accurate of each) shortlisted by their sequential "
                      "timings, then timed interleaved run by run with FP32; decided on paired per-run ratios",
              "rule": how["rule"], "fastest": how["fastest"], "within_noise": how["within_noise"],
              "not_timed": sorted(c["label"] for c in cands if c not in short),
              "rows": [{"label": c["label"], "same_plan": [m[0] for m in groups[c["hash"]] if m[0] != c["label"]],
                        "n_fallback": c["n_fallback"], "sequential_ms": c["seq_ms"],
                        "objective_ms": lat[c["label"]]["objective_ms"],
                        "speedup_vs_fp32": ref["objective_ms"] / lat[c["label"]]["objective_ms"],
                        "paired_vs_fp32": how["vs_fp32"][c["label"]], "paired_vs_fastest": how["vs_fastest"][c["label"]],
                        "accuracy": by_label[c["label"]][3]["accuracy"]} for c in short],
              "fp32_objective_ms": ref["objective_ms"]}
    chosen = by_label[best["label"]]
    timing["same_plan_as_selected"] = [m[0] for m in groups[option_key(chosen)] if m[0] != chosen[0]]
    return chosen, lat, timing


def passing_candidates(result, label: str, models_of: Callable, method: str, extra: dict | None = None) -> list[Option]:
    """Every passing plan a search evaluated, once each, as options (the search's best under the search's label)."""
    out, seen = [], set()
    for rec in result.trace:
        h = rec["plan_hash"]
        if not rec.get("passed") or h in seen:
            continue
        seen.add(h)
        flat = result.plans[h]
        name = label if result.best and h == result.best["plan_hash"] else f"{label}: {rec['label']}"
        out.append((name, models_of(flat), flat, {"label": name, "accuracy": rec["accuracy"],
                                                  "latency": rec["latency"], **(extra or {})}, method))
    return out
