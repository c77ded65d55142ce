"""The pipelines' independent work as executor tasks (search.executor): sensitivity probes, baseline accuracies,
search candidates and the models latency probes time.

Worker functions are top-level (picklable) and take a context of plain data (the run directory, the config,
model and table paths, feeds) plus one item; they place models into the shared run directory exactly where the
driver would (the same Workspace code, file names by plan hash) and return plain results. The driver writes
those into the evaluation cache. ONNX Runtime sessions use the config's thread count, the serial run's, so
accuracy is bit-identical to a serial run. Nothing here measures time: the driver times models between fan-outs.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np

from search.algorithm import split_plan
from search.executor import make_executor
from tasks.fidelity import noise_to_signal

_CTX: dict[str, dict] = {}  # per worker process: the first copy of each context (its caches warm up once)
_WS: dict[str, object] = {}  # per worker process: one workspace per run


def context_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _memo(ctx: dict) -> dict:
    return _CTX.setdefault(ctx["key"], ctx)


def _session(path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads  # as Experiment.sensitivity's sessions: same threads, same numbers
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


# --- the bundled WeNet pipeline (pipeline.wenet) ----------------------------------------------------------------
def _wenet_ws(ctx: dict):
    from pipeline.wenet import Workspace

    ws = _WS.get(ctx["ws_key"])
    if ws is None:
        ws = Workspace(Path(ctx["run_dir"]), ctx["cfg"], {k: Path(p) for k, p in ctx["fp32"].items()})
        ws.tables = {m: {k: Path(p) for k, p in t.items()} for m, t in ctx["tables"].items()}
        ws.sources = {m: {k: Path(p) for k, p in s.items()} for m, s in ctx["sources"].items()}
        _WS[ctx["ws_key"]] = ws
    return ws


def wenet_probe(ctx: dict, item: tuple[str, str, str]) -> float:
    """Sensitivity of one node: noise-to-signal of the model's main output with only that node in INT8."""
    ctx = _memo(ctx)
    kind, node, method = item
    ws = _wenet_ws(ctx)
    out = ctx["outputs"][kind]
    got = _session(ws.model(kind, {node: "int8"}, method), ctx["cfg"]["backend"]["threads"]).run(
        [out], ctx["feeds"][kind])[0]
    return noise_to_signal(got, ctx["refs"][kind])


def _wenet_data(ctx: dict) -> SimpleNamespace:
    """What Experiment.accuracy and Experiment.hackathon read from the experiment, so that workers run that code."""
    return SimpleNamespace(eval_feats=ctx["eval_feats"], eval_texts=ctx["eval_texts"], vocab=ctx["vocab"],
                           hack_cases=ctx["hack_cases"], cfg=ctx["cfg"])


def wenet_accuracy(ctx: dict, item: dict) -> dict:
    """Accuracy (and the hackathon check where asked) of given models ({"models"}) or of a flat plan's
    ({"flat", "method"}), placed as the driver places them. A baseline ({"tolerate"}) that fails comes back as
    {"error"}: the driver then runs it itself and reports the failure as a serial run does."""
    if item.get("tolerate"):
        try:
            return wenet_accuracy(ctx, {k: v for k, v in item.items() if k != "tolerate"})
        except Exception as exc:  # noqa: BLE001 - an FP16 graph the backend cannot run is a result
            return {"error": str(exc)[:300]}
    from pipeline.wenet import KINDS, Experiment

    ctx = _memo(ctx)
    ws = _wenet_ws(ctx)
    models = {k: Path(p) for k, p in item["models"].items()} if "models" in item else \
        {k: ws.model(k, split_plan(item["flat"], k), item["method"]) for k in KINDS}
    data = _wenet_data(ctx)
    if item.get("hackathon") == "summary":  # a baseline record's part, with its per-utterance counts
        acc = Experiment.accuracy(data, ws, models, items=True)
        return {"accuracy": acc, "items": acc.pop("items"),
                "hackathon": {k: v for k, v in Experiment.hackathon(data, ws, models).items() if k != "rows"}}
    acc = Experiment.accuracy(data, ws, models)
    if item.get("hackathon"):  # the search's accuracy under the hackathon criterion
        h = Experiment.hackathon(data, ws, models)
        acc["hackathon_passed"], acc["hackathon_total"] = h["passed"], h["total"]
    return acc


def wenet_prepare(ctx: dict, item: dict) -> None:
    """Place a flat plan's models and build their engines (no timing: the driver times them alone)."""
    from pipeline.wenet import KINDS

    ws = _wenet_ws(_memo(ctx))
    for k in KINDS:
        ws.runner(ws.model(k, split_plan(item["flat"], k), item["method"]))


# --- any Task (pipeline.task_experiment) -------------------------------------------------------------------------
def _task_ws(ctx: dict):
    from graph.calib import load_table
    from pipeline.task_experiment import TaskWorkspace

    ws = _WS.get(ctx["ws_key"])
    if ws is None:
        graphs = SimpleNamespace(graphs=[SimpleNamespace(name=g, path=p) for g, p in ctx["fp32"].items()])
        ws = TaskWorkspace(Path(ctx["run_dir"]), ctx["cfg"], graphs)
        ws._shapes = dict(ctx["shapes"])  # the driver's (the task's own, or from its feeds)
        ws.tables = {m: {g: load_table(p) for g, p in t.items()} for m, t in ctx["tables"].items()}
        _WS[ctx["ws_key"]] = ws
    return ws


def task_probe(ctx: dict, item: tuple[str, str, str]) -> float:
    ctx = _memo(ctx)
    g, node, method = item
    ws = _task_ws(ctx)
    r = ws.runner(g, ws.model(g, {node: "int8"}, method))
    out, ref = ctx["refs"][g]
    return float(np.mean([noise_to_signal(r.run(f)[out], a) for f, a in zip(ctx["feeds"][g], ref)]))


def task_accuracy(ctx: dict, item: dict) -> dict:
    from tasks.base import check_metrics

    ctx = _memo(ctx)
    ws, task = _task_ws(ctx), ctx["task"]
    models = {g: Path(p) for g, p in item["models"].items()} if "models" in item else \
        {g: ws.model(g, split_plan(item["flat"], g), item["method"]) for g in ctx["fp32"]}
    return check_metrics(task, task.evaluate(ws.runners(models)), f"models {sorted(models)}")


def task_prepare(ctx: dict, item: dict) -> None:
    ws = _task_ws(_memo(ctx))
    for g in ctx["fp32"]:
        ws.runner(g, ws.model(g, split_plan(item["flat"], g), item["method"]))


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

    def probes(self, fn: Callable, ctx: dict, todo: list[tuple[str, str]], method: str, cache, prefix: str,
               key: Callable[[str, str], str]) -> dict[str, float]:
        """One sensitivity probe per (graph, node) on the workers; each score cached as it arrives (a resume
        probes only the rest), returned as the serial ranking's dict, in its order."""
        left = [(g, n) for g, n in todo if f"{prefix}{key(g, n)}" not in cache]
        self.map(fn, ctx, [(g, n, method) for g, n in left], desc=f"sensitivity ({self.parallel} workers)",
                 on_result=lambda i, s: cache.get_or_compute(f"{prefix}{key(*left[i])}", lambda: s))
        return {key(g, n): cache.entries[f"{prefix}{key(g, n)}"] for g, n in todo}

    def search(self, acc_fn: Callable, prep_fn: Callable, ctx: dict, method: str, extra: dict | None = None) -> dict:
        """SearchProblem's fan-out hooks for pipeline.search_stage (empty for a serial run: the serial search)."""
        if not self.distributed:
            return {}

        def accuracy_many(plans, on_result):
            self.map(acc_fn, ctx, [{"flat": p, "method": method, **(extra or {})} for p in plans], on_result,
                     desc="search candidates")

        def prepare_many(plans):
            self.map(prep_fn, ctx, [{"flat": p, "method": method} for p in plans], desc="latency probes (build)")

        return {"accuracy_many": accuracy_many, "prepare_many": prepare_many, "parallel": self.parallel}

    def close(self) -> None:
        self.executor.close()

