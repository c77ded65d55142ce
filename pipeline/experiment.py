"""The experiment on any Task (tasks.base): calibration -> baselines -> sensitivity -> precision search ->
side-by-side selection -> deliverables -> run.json, keyed by the task's graph names and metrics.

The one pipeline: the bundled WeNet model runs here as the `wenet_asr` task (tasks.wenet_asr), a user's model
as the generic `onnx` task, a built-in one or an entry point. Each stage is its own module (pipeline.calibration,
.baselines, .sensitivity, .search_stage, .selection, .deliverables); this one holds the run's state and the
evaluation primitives they share. Engines are built and run through `engines` (pipeline.workspace), never raw
sessions; every expensive result is cached in the run directory, so a killed run resumes.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as dt
import resource
import time
from pathlib import Path

from tqdm import tqdm

import engines
from core.fsutil import RunDirLock
from core.host import describe, host_info
from pipeline.baselines import baseline_key, baselines_stage, passes_of, verdicts
from pipeline.calibration import calibrate_stage
from pipeline.confirmation import confirm_stage
from pipeline.config import check_resume, resolve_backend_and_recipe
from pipeline.deliverables import finalize, write_models_index
from pipeline.runfile import RUN_FORMAT, save_run
from pipeline.search_stage import probe_groups, search_from
from pipeline.selection import select
from pipeline.sensitivity import sensitivity_stage
from pipeline.workspace import Workspace
from search.algorithm import flat_plan_hash, node_key, plan_counts, split_plan
from search.evalcache import EvalCache
from tasks.base import ALL, Task


def _case_key(key, feeds: dict) -> tuple[int, int]:
    """(bs, sl) of a latency case: the task's own key when it is one, else the leading two dimensions of its
    first input."""
    if isinstance(key, tuple) and len(key) == 2:
        return key
    shape = list(next(iter(feeds.values())).shape)
    return (shape[0] if shape else 1, shape[1] if len(shape) > 1 else 1)


class Experiment:
    key = staticmethod(node_key)  # "graph:node", the flat plans' and the sensitivity's key

    def __init__(self, cfg: dict, task: Task, run_dir: Path, progress: bool = True):
        # absolute: the paths in the workers' contexts must not depend on this process's working directory
        self.cfg, self.task, self.dir, self.progress = cfg, task, Path(run_dir).resolve(), progress
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = RunDirLock(self.dir).acquire()  # one run per directory (re-entrant: wb search holds it too)
        check_resume(self.dir, cfg)  # a resume keeps the config its cached results were computed with
        self.cache = EvalCache(self.dir / "cache.jsonl")
        self.ws = Workspace(self.dir, cfg, task)
        self.names = self.ws.names
        self._fanout = None
        self.stage_s: dict[str, float] = {}  # run() times its stages; a caller of search() alone gets them too

    # --- evaluation primitives ------------------------------------------------------------------------------
    def latency(self, models: dict[str, Path], search: bool = False) -> dict:
        """Median latency per case and their sum (the objective); `search` uses the search's fewer runs."""
        lat = self.cfg["latency"]
        warmup, iters = (lat["search_warmup"], lat["search_iters"]) if search else (lat["warmup"], lat["iters"])
        rows, total = [], 0.0
        for g in self.names:
            if not self.cases[g]:
                continue
            for r in engines.bench(self.ws.runner(g, models[g]), self.cases[g], warmup=warmup, iters=iters):
                rows.append({"model": g, **{k: r[k] for k in ("bs", "sl", "median_ms", "p90_ms", "throughput")}})
                total += r["median_ms"]
        return {"objective_ms": total, "cases": rows, "warmup": warmup, "iters": iters}

    def side_by_side(self, options: dict[str, dict[str, Path]], search: bool = False) -> dict[str, dict]:
        """Latency of each option ({label: models}) with all options interleaved run by run on each case
        (engines.bench_interleaved): their ratios measured side by side, not minutes apart. `search`: the
        search's shorter protocol (latency probes)."""
        lat = self.cfg["latency"]
        warmup, iters = (lat["search_warmup"], lat["search_iters"]) if search else (lat["warmup"], lat["iters"])
        out = {label: {"objective_ms": 0.0, "cases": [], "warmup": warmup, "iters": iters,
                       "interleaved": True} for label in options}
        todo = [(g, case) for g in self.names for case in self.cases[g]]
        for g, case in tqdm(todo, desc="side-by-side timing", disable=not self.progress):
            runners = {label: self.ws.runner(g, models[g]) for label, models in options.items()}
            for label, rows in engines.bench_interleaved(runners, {case: self.cases[g][case]}, warmup, iters).items():
                r = rows[0]
                out[label]["cases"].append({"model": g, **{k: r[k] for k in ("bs", "sl", "median_ms", "p90_ms",
                                                                              "latencies_ms", "throughput")}})
                out[label]["objective_ms"] += r["median_ms"]
        return out

    def full_record(self, label: str, models: dict[str, Path], timed_as: dict | None = None, **extra) -> dict:
        """A baseline's record: accuracy with per-item results, the reference check, latency (cached).
        Latency with the search's protocol, as every candidate: sequential timings only rank; what ships is
        decided (and its speedup reported) by the selection's side-by-side timing with the full protocol.
        `timed_as`: the record of a model of the same graph (same plan, same recipe; only the scales differ),
        whose latency this one takes instead of timing the same kernels again."""
        key = baseline_key(self.cfg, models, self.ws.fp32, self.task.fingerprint(), extra.get("calibrator"))
        part = self.cache.entries.get(key + ":accuracy")  # the workers' part of it (prefetch_baselines)

        def compute():
            rec = dict(part) if part else self.ws.accuracy_part(models)
            rec["latency"] = {**timed_as["latency"], "timed_as": timed_as["label"]} \
                if timed_as and "latency" in timed_as else self.latency(models, search=True)
            return rec

        rec = self.cache.get_or_compute(key, compute)
        return {"label": label, **extra, **{k: v for k, v in rec.items() if v is not None}}

    # --- fan-out (pipeline.fanout): the same work on an executor's workers --------------------------------------
    @property
    def fanout(self):
        if self._fanout is None:
            from pipeline.fanout import Fanout

            self._fanout = Fanout(self.cfg, self.dir, self.progress)
        return self._fanout

    def context(self, what: str, **data) -> dict:
        """Plain data (and the task) a worker rebuilds this run's Workspace from, plus `data`; keyed for the
        object store."""
        from pipeline.fanout import context_key

        s = lambda d: {m: {g: str(p) for g, p in t.items()} for m, t in d.items()}  # noqa: E731
        base = {"run_dir": str(self.dir), "cfg": self.cfg, "fp32": {g: str(p) for g, p in self.ws.fp32.items()},
                "tables": s(self.ws.tables), "sources": s(self.ws.sources),
                "shapes": {g: self.ws.shapes(g) for g in self.names}}
        base["ws_key"] = context_key(base)
        return {**base, "task": self.task, **data, "key": context_key(what, base["ws_key"])}

    def prefetch_baselines(self, specs: list[tuple[dict[str, Path], str | None]]) -> None:
        """The baselines' accuracy parts on the workers, cached as each arrives; full_record then times each in
        the driver, one at a time, after all of them are done (timing stays alone). A baseline that fails on a
        worker is left to the driver, which records it as a serial run does."""
        from pipeline.fanout import task_accuracy

        keys = [baseline_key(self.cfg, m, self.ws.fp32, self.task.fingerprint(), cal) for m, cal in specs]
        todo = [(k, m) for k, (m, _) in zip(keys, specs) if k not in self.cache and f"{k}:accuracy" not in self.cache]

        def got(i, part):
            if "error" not in part:
                self.cache.get_or_compute(f"{todo[i][0]}:accuracy", lambda: part)

        self.fanout.warm(self.context("warm"))  # all workers, also those the baselines leave idle
        self.fanout.map(task_accuracy, self.context("accuracy"),
                        [{"models": {g: str(p) for g, p in m.items()}, "part": True} for _, m in todo],
                        got, desc="baselines (accuracy)")

    # --- search and selection -----------------------------------------------------------------------------------
    def search(self, start: dict, crit: dict) -> dict:
        """The precision search from the all-INT8 baseline `start` (its calibrator's ranges and FP32 weights)."""
        method, check, recipe = start["calibrator"], crit["kind"] == "hackathon", start.get("recipe")
        tag = f"{method}.{recipe}" if recipe else method  # the search's files and cache keys
        if crit.get("mode") == "bound":  # its cached accuracy dicts carry the intervals the bound judges
            tag += ".bound"

        def models_of(flat):
            return {g: self.ws.model(g, split_plan(flat, g), method, recipe=recipe) for g in self.names}

        fan = {}
        if self.fanout.distributed:
            from pipeline.fanout import task_accuracy, task_prepare

            fan = self.fanout.search(task_accuracy, task_prepare, self.context("accuracy"), method,
                                     {"check": check, "recipe": recipe})
        with self._stage("sensitivity"):
            sensitivity = sensitivity_stage(self, method, recipe)
        return search_from(start, nodes=[self.key(g, n) for g in self.names for n in self.ws.int8_nodes(g)],
                           sensitivity=sensitivity,
                           groups=probe_groups(self.ws.analysis, self.key), models_of=models_of,
                           accuracy=lambda flat: self.ws.accuracy(models_of(flat), check=check),
                           latency=lambda flat: self.latency(models_of(flat), search=True), passes=passes_of(crit),
                           cfg=self.cfg, cache_path=self.dir / f"search_cache.{tag}.jsonl",
                           progress=self.progress, fanout=fan, recipe=recipe,
                           side_by_side=lambda options: self.side_by_side(options, search=True))

    def select(self, crit: dict, searches: list[dict], baselines: list[dict], models_of_label: dict,
               exclude: set[str] = frozenset()):
        """The fastest passing option (pipeline.selection): the passing baselines and every passing plan the
        searches evaluated, decided on paired side-by-side timings with FP32; `exclude`: labels ruled out (the
        confirmation stage's rejections). Returns (selected record, timing, its models)."""
        m = self.task.metric(crit["metric"])
        # Baselines first: a search that ends on a baseline's plan with its accuracy is reported as that baseline.
        options = [(b["label"], *models_of_label[b["label"]], b, b["calibrator"]) for b in baselines
                   if b.get("passed") and b["label"] in models_of_label]
        for x in searches:
            options += x.get("candidates", [])
        lat = self.cfg["latency"]
        picked = select(options, lambda rec: -rec["accuracy"][m.name] if m.higher_is_better else rec["accuracy"][m.name],
                        self.cache, self.side_by_side, self.ws.fp32, lat["tie_tolerance"], lat["side_by_side_max"],
                        exclude=exclude)
        if picked is None:
            return None, None, None
        (label, models, flat, rec, calibrator), latency, timing = picked
        self._picked = (models, flat)  # finalized once, after confirmation settled which pick ships (run)
        selected = {"label": "selected mix", "source": label, "plan_hash": flat_plan_hash(flat),
                    "calibrator": calibrator, "same_plan": timing["same_plan_as_selected"], **plan_counts(flat),
                    "fallback_nodes": sorted(k for k, v in flat.items() if v != "int8"),
                    "accuracy": rec["accuracy"], "passed": True, "latency": latency[label],
                    "reference_latency": latency["FP32"]}
        if self.task.check_name:
            selected[self.task.check_name] = self.ws.reference_check(models)
        if rec.get("recipe"):  # placed by an extra recipe, not the run's own
            selected["recipe"] = rec["recipe"]
        ivs = rec["accuracy"].get("intervals") or {}
        if ALL in ivs:  # the flat interval (per set: accuracy "intervals"), a baseline's or the search's
            selected["ci"] = ivs[ALL]
        if crit["kind"] != "hackathon":  # per set (or weighted): what passed
            selected["verdicts"] = rec.get("verdicts") or verdicts(crit, rec["accuracy"])
        return selected, timing, models

    # --- the whole run ------------------------------------------------------------------------------------------
    def device(self, host: dict) -> str:
        """One line naming what measured the run's numbers (the int8 ISA decides ONNX Runtime's int8 accuracy)."""
        cfg = self.cfg
        if cfg["backend"]["name"] != "onnxruntime":
            return f"TensorRT ({cfg['backend']['name']}) on the GPU; host CPU {describe(host)}"
        mode = f", int8 mode {cfg['quantize']['ort_mode']}" if cfg["quantize"]["recipe"] == "onnxruntime" else ""
        return f"CPU: {describe(host)}, {cfg['backend']['threads']} threads (ONNX Runtime{mode}); TensorRT not measured"

    @contextlib.contextmanager
    def _stage(self, name: str):
        """Times a stage into run.json's "stage_s": where a run's minutes went (a resume's cached stages are
        short)."""
        t0 = time.time()
        try:
            yield
        finally:
            self.stage_s[name] = round(self.stage_s.get(name, 0.0) + time.time() - t0, 1)

    def run(self) -> dict:
        t0 = time.time()
        cfg, task = self.cfg, self.task
        self.stage_s = {}
        with self._stage("calibration"):
            self.methods = calibrate_stage(self)
        self.cases = {g: {} for g in self.names}
        for g in self.names:
            for key, feeds in task.latency_cases(g).items():
                self.cases[g].setdefault(_case_key(key, feeds), feeds)
        with self._stage("baselines"):
            baselines, models_of_label, crit = baselines_stage(self)
        m = task.metric(crit["metric"])
        int8 = [b for b in baselines if b.get("precision") == "int8"]
        # the most accurate PTQ calibrator (ties: the faster), and QAT scales when the run has them
        best_of = lambda bs: min(bs, key=lambda b: (-b["accuracy"][m.name] if m.higher_is_better  # noqa: E731
                                                    else b["accuracy"][m.name], b["latency"]["objective_ms"]))
        ptq = [b for b in int8 if b["calibrator"] != "qat"]
        starts = ([best_of(ptq)] if ptq else []) + [b for b in int8 if b["calibrator"] == "qat"]
        with self._stage("search"):  # sensitivity is timed inside it (its own entry), and subtracted here
            searches = [self.search(b, crit) for b in starts]
        self.stage_s["search"] = round(self.stage_s["search"] - self.stage_s.get("sensitivity", 0.0), 1)
        with self._stage("selection and confirmation"):
            selected, timing, confirmation = confirm_stage(
                self, crit, baselines, models_of_label,
                lambda exclude: self.select(crit, searches, baselines, models_of_label, exclude))
        with self._stage("final engines"):
            if selected:  # the last pick is the one that ships (confirmed, or the last attempt when none was)
                finalize(self, *self._picked)
        first = searches[0]
        status = first["status"] if not selected else \
            "not_confirmed" if confirmation and not confirmation["confirmed"] else "passed"
        host = host_info()
        run = {"format": RUN_FORMAT, "id": self.dir.name, "created": dt.datetime.now(dt.timezone.utc).isoformat(),
               "model": task.model or task.name, "backend": cfg["backend"]["name"], "recipe": cfg["quantize"]["recipe"],
               "host": host, "device": self.device(host),
               "task": {"name": task.name, "graphs": self.names, "links": task.links,
                        "metrics": {x.name: {"higher_is_better": x.higher_is_better} for x in task.metrics},
                        "eval_sets": list(task.eval_sets), "confirm_set": task.confirm_set,
                        "shapes": {g: self.ws.shapes(g) for g in self.names},
                        "engine_kinds": {g: task.graph(g).engine_kind for g in self.names}},
               "status": status, "criterion": crit, "config": cfg,
               "baselines": baselines, "selected": selected, "side_by_side": timing,
               **({"confirmation": confirmation} if confirmation else {}),
               "searches": [{k: v for k, v in x.items() if k not in ("models", "flat", "trace", "sensitivity",
                                                                     "candidates")} for x in searches],
               "sensitivity": first["sensitivity"], "trace": first["trace"],
               "n_full_evals": sum(x["n_full_evals"] for x in searches),
               "n_computed_evals": sum(x["n_computed_evals"] for x in searches),
               "n_cache_hits": sum(x["n_cache_hits"] for x in searches), "wall_s": round(time.time() - t0, 1),
               "stage_s": dict(self.stage_s),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        if len(searches) > 1:
            run["traces"] = {x["calibrator"]: x["trace"] for x in searches}
        save_run(self.dir, run)
        deliverables = {label: models for label, (models, _) in models_of_label.items()}
        if selected:
            deliverables["selected"] = {g: self.dir / "final" / f"{g}.onnx" for g in self.names}
        write_models_index(self.dir, deliverables)
        return run


def run_experiment(cfg: dict, task: Task, run_dir: str | Path, progress: bool = True) -> dict:
    """Run the whole experiment for `task` (a loaded, checked Task) into `run_dir`."""
    cfg = resolve_backend_and_recipe(copy.deepcopy(cfg))  # a clear error when tensorrt is asked for and missing
    exp = Experiment(cfg, task, Path(run_dir), progress)
    try:
        return exp.run()
    finally:
        if exp._fanout is not None:
            exp._fanout.close()  # Ray's logs into run_dir/ray/
