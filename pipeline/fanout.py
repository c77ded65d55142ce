"""The pipeline's independent work as executor tasks (search.executor): the sensitivity ranking's per-item
scores and its probes, baseline accuracies, search candidates and the models latency probes time.

Worker functions are top-level (picklable) and take a context (the run directory, the config, model and table
paths, the task itself, feeds) plus one item; they place models into the shared run directory exactly where the
driver would (the same pipeline.workspace code, file names by plan hash) and return plain results. The driver
writes those into the evaluation cache. Engines use the config's thread count, the serial run's, so accuracy is
bit-identical to a serial run. Nothing here measures time: the driver times models between fan-outs.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

from search.algorithm import split_plan
from search.executor import make_executor

_CTX: dict[str, dict] = {}  # per worker process: the first copy of each context (its caches warm up once)
_WS: dict[str, object] = {}  # per worker process: one workspace per run


def context_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _memo(ctx: dict) -> dict:
    return _CTX.setdefault(ctx["key"], ctx)


def _ws(ctx: dict):
    """This run's Workspace in the worker, built once per process from the driver's context."""
    from pipeline.workspace import Workspace

    ws = _WS.get(ctx["ws_key"])
    if ws is None:
        ws = Workspace(Path(ctx["run_dir"]), ctx["cfg"], ctx["task"])
        ws._shapes = dict(ctx["shapes"])  # the driver's (the task's own, or from its feeds)
        ws.tables = {m: {g: Path(p) for g, p in t.items()} for m, t in ctx["tables"].items()}
        ws.sources = {m: {g: Path(p) for g, p in t.items()} for m, t in ctx["sources"].items()}
        _WS[ctx["ws_key"]] = ws
    return ws


def task_probe(ctx: dict, item: tuple[str, str, str]) -> float:
    """Sensitivity of one node: pipeline.sensitivity's score with only that node in INT8."""
    from pipeline.sensitivity import probe

    ctx = _memo(ctx)
    g, node, method = item
    out, ref = ctx["refs"][g]
    return probe(_ws(ctx), g, node, method, ctx.get("recipe"), out, ctx["feeds"][g], ref)


def task_ranking_scores(ctx: dict, item: list[int]) -> list[float]:
    """The task's ranking scores of the items `item` (indices), from the FP32 and the all-INT8 runners of the
    context's method (pipeline.sensitivity.ranking_inputs), each opened when the task first reads it."""
    from pipeline.sensitivity import LazyRunners

    ctx = _memo(ctx)
    ws = _ws(ctx)
    fp32 = LazyRunners(ws, ws.source(ctx["method"]))
    int8 = LazyRunners(ws, {g: Path(p) for g, p in ctx["int8"].items()})
    return [float(x) for x in ws.task.ranking_scores(fp32, int8, item)]


def task_warm(ctx: dict, item):
    """A worker with this run's Workspace built (Fanout.warm)."""
    _ws(_memo(ctx))
    return item


def task_accuracy(ctx: dict, item: dict) -> dict:
    """Accuracy of given models ({"models"}) or of a flat plan's ({"flat", "method"}), placed as the driver
    places them; {"check"}: with the reference check's counts (the hackathon criterion); {"part"}: a baseline
    record's accuracy part (metrics, items, check), or {"error"} for a model the backend cannot build or run,
    which the driver then records as a serial run does."""
    from core.errors import WorkbenchError

    ctx = _memo(ctx)
    ws = _ws(ctx)
    models = {g: Path(p) for g, p in item["models"].items()} if "models" in item else \
        {g: ws.model(g, split_plan(item["flat"], g), item["method"], recipe=item.get("recipe")) for g in ws.names}
    if item.get("part"):
        try:
            return ws.accuracy_part(models)
        except WorkbenchError as exc:
            return {"error": str(exc)[:300]}
    return ws.accuracy(models, check=bool(item.get("check")))


def task_prepare(ctx: dict, item: dict) -> None:
    """Place a flat plan's models and build their engines (no timing: the driver times them alone)."""
    ws = _ws(_memo(ctx))
    for g in ws.names:
        ws.runner(g, ws.model(g, split_plan(item["flat"], g), item["method"], recipe=item.get("recipe")))


# --- the driver's side ----------------------------------------------------------------------------------------------
class Fanout:
    """A run's executor and the contexts its fan-outs share. `distributed`: work goes to the executor's
    workers (Ray); serial runs keep the pipelines' own in-process code."""

    def __init__(self, cfg: dict, run_dir: Path, progress: bool = True):
        self.cfg, self.dir, self.progress = cfg, Path(run_dir), progress
        self.executor = make_executor(cfg["distributed"], cfg["backend"]["threads"], run_dir)
        self.distributed = self.executor.name != "serial"
        self.parallel = self.executor.parallel

    def map(self, fn: Callable, ctx: dict, items: list, on_result=None, desc: str = "") -> list:
        return self.executor.map(fn, ctx, items, on_result, desc=desc, progress=self.progress)

    def warm(self, ctx: dict) -> None:
        """Every worker imports the workbench and builds this run's Workspace (FP32 graphs' analysis) once,
        before the run's first fan-out (the baselines'): otherwise the workers a stage's first fan-out leaves
        idle (5 baselines on 8 workers) start cold in the next stage. Measured on WeNet's sensitivity stage with
        8 workers: 15.6 s cold, 12.5 s warm (experiments/results/ray_scaling.md)."""
        self.map(task_warm, ctx, list(range(self.parallel)), desc="workers (start)")

    def stream(self, fn: Callable, parts, on_result=None, desc: str = "") -> list:
        return self.executor.stream(fn, parts, on_result, desc=desc, progress=self.progress)

    def probes(self, fn: Callable, parts, method: str, cache, prefix: str, key: Callable[[str, str], str]) -> None:
        """One sensitivity probe per (graph, node) on the workers, each score cached as it arrives (a resume probes
        only the rest). `parts` yields (context, graph, nodes, cost) one graph at a time as the driver prepares
        its feeds: a graph's probes go out while the next graph's feeds are computed, costliest graph first among
        those waiting."""
        sent: list[list[tuple[str, str]]] = []

        def uncached():
            for ctx, g, nodes, cost in parts:
                sent.append([(g, n) for n in nodes if f"{prefix}{key(g, n)}" not in cache])
                yield ctx, [(g, n, method) for g, n in sent[-1]], cost

        self.stream(fn, uncached(), desc=f"sensitivity ({self.parallel} workers)",
                    on_result=lambda p, i, s: cache.get_or_compute(f"{prefix}{key(*sent[p][i])}", lambda: s))

    def search(self, acc_fn: Callable, prep_fn: Callable, ctx: dict, method: str, extra: dict | None = None) -> dict:
        """SearchProblem's fan-out hooks for pipeline.search_stage (empty for a serial run: the serial search)."""
        if not self.distributed:
            return {}

        def accuracy_many(plans, on_result):
            self.map(acc_fn, ctx, [{"flat": p, "method": method, **(extra or {})} for p in plans], on_result,
                     desc="search candidates")

        def prepare_many(plans):
            self.map(prep_fn, ctx, [{"flat": p, "method": method, **(extra or {})} for p in plans],
                     desc="latency probes (build)")

        return {"accuracy_many": accuracy_many, "prepare_many": prepare_many, "parallel": self.parallel}

    def close(self) -> None:
        self.executor.close()

