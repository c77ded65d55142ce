"""The search stage shared by the pipelines: seed the search's cache with the all-INT8 baseline it starts from,
run search.algorithm on the pipeline's callables, and return the record run.json and the selection stage read."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from search.algorithm import SearchProblem, flat_plan_hash, plan_counts, search
from search.evalcache import EvalCache
from search.selection import objective_runs

from .selection import passing_candidates


def search_from(start: dict, *, nodes: list[str], sensitivity: dict[str, float], groups: dict[str, list[str]],
                models_of: Callable, accuracy: Callable, latency: Callable, passes: Callable, cfg: dict,
                cache_path: Path, progress: bool = True, fanout: dict | None = None,
                side_by_side: Callable | None = None, recipe: str | None = None) -> dict:
    """The precision search from the all-INT8 baseline `start` (a baseline record with calibrator, accuracy and
    latency). `models_of(flat)` places a flat plan's models; `accuracy(flat)` and `latency(flat)` measure it;
    `side_by_side({label: models})` times models interleaved (the search's protocol), for latency probes.
    `recipe`: a placement recipe other than the run's own, named in the labels and records."""
    method = start["calibrator"]
    extra = {"recipe": recipe} if recipe else {}

    def paired(plans: dict) -> dict:
        lat = side_by_side({h: models_of(p) for h, p in plans.items()})
        return {h: objective_runs(lat[h]["cases"]).tolist() for h in plans}

    problem = SearchProblem(nodes=nodes, fallback=cfg["quantize"]["fallback"], accuracy=accuracy, passes=passes,
                            latency=latency, sensitivity=sensitivity, groups=groups,
                            paired=paired if side_by_side is not None else None,
                            max_full_evals=cfg["budget"]["max_full_evals"],
                            **(fanout or {}))  # accuracy_many, prepare_many, parallel: pipeline.fanout
    begin = flat_plan_hash({n: "int8" for n in nodes})
    cache = EvalCache(cache_path)
    cache.get_or_compute(f"acc:{begin}", lambda: start["accuracy"])  # the baseline is the search's start
    cache.get_or_compute(f"lat:{begin}", lambda: start["latency"])
    result = search(problem, cache, progress=progress)
    out = {"label": f"search from {method}" + (f" ({recipe} recipe)" if recipe else ""), "calibrator": method,
           **extra, "status": result.status,
           "n_full_evals": result.n_full_evals, "n_computed_evals": result.n_computed,
           "n_cache_hits": result.n_cache_hits, "trace": result.trace, "sensitivity": sensitivity, "best": None}
    if result.best is not None:
        flat = result.plans[result.best["plan_hash"]]
        # its latency is the search's shorter protocol; the selection stage re-times side by side
        out["best"] = {"label": out["label"], "calibrator": method, "plan_hash": flat_plan_hash(flat),
                       **plan_counts(flat), "accuracy": result.best["accuracy"], "latency": result.best["latency"],
                       "passed": True, **extra}
        out["models"], out["flat"] = models_of(flat), flat
    out["candidates"] = passing_candidates(result, out["label"], models_of, method, extra)  # any may win
    return out


def probe_groups(analyses: dict, key: Callable[[str, str], str]) -> dict[str, list[str]]:
    """Latency-probe groups: the nodes of one kind per graph (e.g. all depthwise convs of the encoder)."""
    groups: dict[str, list[str]] = {}
    for graph, analysis in analyses.items():
        for q in analysis.quantizable:
            groups.setdefault(f"{graph} {q.kind}", []).append(key(graph, q.id))
    return groups
