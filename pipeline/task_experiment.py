"""The experiment on any Task (tasks.base): calibration -> baselines -> sensitivity -> precision search ->
side-by-side selection -> deliverables -> run.json, keyed by the task's graph names and metrics.

The same stages as the bundled WeNet pipeline (quant/pipeline.py, which will become the `wenet_asr` task on
this one), written against the Task interface only: graphs, feeds, metrics and latency cases come from the
task. Engines are built and run through `engines` (never raw sessions); every expensive result is cached in
the run directory, so a killed run resumes.
"""
from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import resource
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import engines
from core.host import describe, host_info
from graph.analysis import analyze, prepare_model
from graph.calib import load_table
from graph.placement import quantize
from graph.plan import create_plan, edit_plan, save_plan
from quant.calibrate import calibrate
from search.evalcache import EvalCache
from quant.methods import method_key
from search.algorithm import node_key, plan_counts, flat_plan_hash, split_plan
from quant.table import CalibrationTable
from pipeline.runners import RunnerCache
from pipeline.search_stage import probe_groups, search_from
from pipeline.selection import select
from tasks.base import Task, check_metrics
from tasks.fidelity import noise_to_signal
from core.errors import WorkbenchError
from core.fsutil import RunDirLock, sha256_file, write_json
from pipeline.config import check_resume


def criterion_of(cfg: dict, task: Task, reference: float) -> dict:
    """The pass rule as data, in the metric's own direction: absolute (FP32 -/+ delta), relative (FP32 x (1 -/+
    delta)) or fixed (the value delta itself, e.g. cosine >= 0.99)."""
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
    else:
        raise WorkbenchError(f"config criterion.kind = {kind!r} is not one of absolute, relative, fixed for a task")
    if not np.isfinite(thr):
        raise WorkbenchError(f"criterion {text} gives the threshold {thr} (FP32 {m.name} is {reference}): use "
                             f"criterion.kind = \"fixed\" for this metric")
    return {"metric": m.name, "kind": kind, "delta": d, "reference": reference, "threshold": thr,
            "higher_is_better": hi, "text": text}


def _latency_key(feeds: dict) -> tuple[int, int]:
    """(bs, sl) for the report: the leading two dimensions of the first input."""
    shape = list(np.shape(next(iter(feeds.values()))))
    return (shape[0] if shape else 1, shape[1] if len(shape) > 1 else 1)


class TaskWorkspace:
    """Placed models and engines of the run, cached on disk by (graph, plan hash, method, recipe, mode)."""

    def __init__(self, run_dir: Path, cfg: dict, task: Task):
        self.dir, self.cfg, self.task = run_dir, cfg, task
        self.fp32 = {g.name: Path(g.path) for g in task.graphs}
        self.loaded = {name: prepare_model(p) for name, p in self.fp32.items()}
        self.analysis = {name: analyze(m) for name, m in self.loaded.items()}
        self.tables: dict[str, dict[str, object]] = {}  # method -> graph -> loaded CalibTable
        self._runners = RunnerCache()
        self._shapes: dict[str, dict] = {}

    def int8_nodes(self, graph: str) -> list[str]:
        return [n for n, p in create_plan(self.analysis[graph], "int8")["nodes"].items() if p == "int8"]

    def model(self, graph: str, nodes: dict[str, str], method: str, default: str = "fp32") -> Path:
        if default == "fp32" and all(p == "fp32" for p in nodes.values()):
            return self.fp32[graph]
        plan = edit_plan(create_plan(self.analysis[graph], default=default), set_nodes=nodes)
        recipe = "tensorrt" if "fp16" in plan["nodes"].values() else self.cfg["quantize"]["recipe"]
        mode = self.cfg["quantize"]["ort_mode"] if recipe == "onnxruntime" else None
        tag = hashlib.sha256(json.dumps([plan["hash"], method, recipe, mode]).encode()).hexdigest()[:16]
        out = self.dir / "models" / graph / f"{tag}.onnx"
        if not out.is_file():
            quantize(self.loaded[graph], self.tables[method][graph], plan=plan, recipe=recipe, out=out,
                     analysis=self.analysis[graph], ort_mode=mode or "auto")
            save_plan(plan, out.with_suffix(".plan.json"))
        return out

    def shapes(self, graph: str) -> dict:
        """The task's shape ranges, else ranges that admit every feed of `task.shape_feeds`."""
        if graph not in self._shapes:
            spec = self.task.graph(graph)
            if spec.shapes:
                self._shapes[graph] = spec.shapes
            else:
                self._shapes[graph] = engines.base.shapes_from_feeds(self.task.shape_feeds(graph))
        return self._shapes[graph]

    def runner(self, graph: str, model: Path):
        """The engine runner of `model`, kept while it is among the most recently used (pipeline.runners)."""
        def make():
            art = engines.build(model, self.shapes(graph), self.dir / "engines" / graph / model.stem,
                                backend=self.cfg["backend"]["name"], kind="generic",
                                threads=self.cfg["backend"]["threads"])
            return engines.load(art)

        return self._runners.get(model, make, self.fp32.values())

    def runners(self, models: dict[str, Path]) -> dict:
        return {g: self.runner(g, p) for g, p in models.items()}


class TaskExperiment:
    def __init__(self, cfg: dict, task: Task, run_dir: Path, progress: bool = True):
        self.cfg, self.task, self.dir, self.progress = cfg, task, Path(run_dir), progress
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = RunDirLock(self.dir).acquire()  # one run per directory (re-entrant: wb search holds it too)
        check_resume(self.dir, cfg)  # a resume keeps the config its cached results were computed with
        self.cache = EvalCache(self.dir / "cache.jsonl")
        self.ws = TaskWorkspace(self.dir, cfg, task)
        self.names = [g.name for g in task.graphs]

    # --- stages -------------------------------------------------------------------------------------------
    def calibrate_all(self) -> None:
        c = self.cfg["calibration"]
        methods = [m for m in c["methods"] if m != "qat"]
        if not methods:
            raise WorkbenchError("config calibration.methods names no PTQ calibrator (max, percentile, entropy, mse)")
        keys = [method_key(m, c["percentile"]) for m in methods]
        self.methods = keys
        fp32_runners = {}
        for g in self.names:
            path = self.dir / "calibration" / f"{g}.json"
            if not path.is_file():
                feeds = list(self.task.calibration_feeds(g, fp32_runners))
                table = calibrate(self.ws.fp32[g], feeds, methods=",".join(methods), percentiles=(c["percentile"],),
                                  default_method=keys[0], padding=None, progress=self.progress,
                                  data_info={"task": self.task.name, "graph": g, "feeds": len(feeds)})
                table.save(path)
            table = CalibrationTable.load(path)
            for key in keys:
                p = self.dir / "calibration" / f"{g}.{key}.json"
                if not p.is_file():
                    table.with_method(key).save(p)
                self.ws.tables.setdefault(key, {})[g] = load_table(p)
            fp32_runners[g] = self.ws.runner(g, self.ws.fp32[g])

    def accuracy(self, models: dict[str, Path]) -> dict:
        return check_metrics(self.task, self.task.evaluate(self.ws.runners(models)), f"models {sorted(models)}")

    def latency(self, models: dict[str, Path], search: bool = False) -> dict:
        lat = self.cfg["latency"]
        warmup, iters = (lat["search_warmup"], lat["search_iters"]) if search else (lat["warmup"], lat["iters"])
        rows, total = [], 0.0
        for g, path in models.items():
            for r in engines.bench(self.ws.runner(g, path), self.cases[g], warmup=warmup, iters=iters):
                rows.append({"model": g, **{k: r[k] for k in ("bs", "sl", "median_ms", "p90_ms", "throughput")}})
                total += r["median_ms"]
        return {"objective_ms": total, "cases": rows, "warmup": warmup, "iters": iters}

    def _content_key(self, prefix: str, models: dict[str, Path]) -> str:
        return prefix + hashlib.sha256(json.dumps({g: sha256_file(p) for g, p in sorted(models.items())})
                                       .encode()).hexdigest()[:24]

    def _baseline_key(self, models: dict[str, Path], calibrator: str | None) -> str:
        # the models' content plus the config that changes the result (pipeline.wenet.baseline_key's rule)
        sections = {s: self.cfg[s] for s in ("task", "data", "backend", "quantize")} | {
            "latency": {k: self.cfg["latency"][k] for k in ("batch_sizes", "seq_lens", "warmup", "iters", "models")}}
        if calibrator:
            sections["calibration"] = self.cfg["calibration"]
        config = hashlib.sha256(json.dumps(sections, sort_keys=True, default=str).encode()).hexdigest()[:24]
        return self._content_key("baseline:", models) + ":" + config

    def full_record(self, label: str, models: dict[str, Path], **extra) -> dict:
        key = self._baseline_key(models, extra.get("calibrator"))
        part = self.cache.entries.get(key + ":accuracy")  # the workers' part of it (_prefetch_baselines)
        rec = self.cache.get_or_compute(key, lambda: {
            "accuracy": part if part else self.accuracy(models), "latency": self.latency(models)})
        return {"label": label, **extra, **rec}

    # --- fan-out (pipeline.fanout): the same work on an executor's workers ------------------------------------
    @property
    def fanout(self):
        if getattr(self, "_fanout", None) is None:
            from pipeline.fanout import Fanout

            self._fanout = Fanout(self.cfg, self.dir, self.progress)
        return self._fanout

    def _context(self, what: str, **data) -> dict:
        """Plain data a worker rebuilds this run's TaskWorkspace from, plus `data`; keyed for the object store."""
        from pipeline.fanout import context_key

        base = {"run_dir": str(self.dir), "cfg": self.cfg, "fp32": {g: str(p) for g, p in self.ws.fp32.items()},
                "tables": {m: {g: str(self.dir / "calibration" / f"{g}.{m}.json") for g in t}
                           for m, t in self.ws.tables.items()},
                "shapes": {g: self.ws.shapes(g) for g in self.names}}
        base["ws_key"] = context_key(base)
        return {**base, **data, "key": context_key(what, base["ws_key"])}

    def _prefetch_baselines(self, specs: list[tuple[dict[str, Path], str | None]]) -> None:
        """The baselines' accuracies on the workers, cached as each arrives; full_record then times each in the
        driver, one at a time, after all of them are done (timing stays alone)."""
        from pipeline.fanout import task_accuracy

        keys = [self._baseline_key(models, cal) for models, cal in specs]
        todo = [(k, m) for k, (m, _) in zip(keys, specs) if k not in self.cache and f"{k}:accuracy" not in self.cache]
        self.fanout.map(task_accuracy, self._context("accuracy", task=self.task),
                        [{"models": {g: str(p) for g, p in m.items()}} for _, m in todo],
                        lambda i, acc: self.cache.get_or_compute(f"{todo[i][0]}:accuracy", lambda: acc),
                        desc="baselines (accuracy)")

    def sensitivity(self, method: str) -> dict[str, float]:
        """Noise-to-signal ratio of each graph's main output with only one node in INT8, on the task's ranking
        feeds (a cheap ranking; the task's metric decides)."""
        cached = self.cache.entries.get(f"sensitivity:{method}")
        if cached is not None:
            return cached
        scores = {}
        todo = [(g, n) for g in self.names for n in self.ws.int8_nodes(g)]
        feeds = {g: self.task.ranking_feeds(g, {}) for g in self.names}
        refs = {}
        for g in self.names:
            r = self.ws.runner(g, self.ws.fp32[g])
            out = self.task.graph(g).main_output or r.output_names[0]
            refs[g] = (out, [r.run(f)[out] for f in feeds[g]])
        if self.fanout.distributed:  # one probe per node on the workers, each cached as it arrives
            from pipeline.fanout import task_probe

            ctx = self._context(f"sensitivity:{method}", feeds=feeds, refs=refs)
            scores = self.fanout.probes(task_probe, ctx, todo, method, self.cache, f"sensitivity:{method}:", node_key)
        for g, node in tqdm(todo if not scores else [], desc="sensitivity", disable=not self.progress):
            r = self.ws.runner(g, self.ws.model(g, {node: "int8"}, method))
            out, ref = refs[g]
            scores[node_key(g, node)] = float(np.mean([noise_to_signal(r.run(f)[out], a)
                                                       for f, a in zip(feeds[g], ref)]))
        return self.cache.get_or_compute(f"sensitivity:{method}", lambda: scores)

    def _better(self, a: dict, b: dict) -> bool:
        m = self.task.metric(self.crit["metric"])
        return m.better(a["accuracy"][m.name], b["accuracy"][m.name])

    def _most_accurate(self, records: list[dict]) -> dict:
        best = records[0]
        for r in records[1:]:
            if self._better(r, best):
                best = r
        return best

    def run(self) -> dict:
        t0 = time.time()
        cfg = self.cfg
        self.calibrate_all()
        self.cases = {}
        for g in self.names:
            cases = {}
            for feeds in self.task.latency_cases(g).values():
                cases.setdefault(_latency_key(feeds), feeds)
            self.cases[g] = cases
        all_of = lambda g, prec: {n: prec for n in self.ws.int8_nodes(g)}  # noqa: E731
        fp32 = dict(self.ws.fp32)
        if self.fanout.distributed:  # accuracies on the workers first; the records below time them here, alone
            specs = [(fp32, None)]
            try:
                specs.append(({g: self.ws.model(g, all_of(g, "fp16"), self.methods[0], default="fp16")
                               for g in self.names}, None))
            except WorkbenchError:
                pass  # recorded below as the serial run records it
            specs += [({g: self.ws.model(g, all_of(g, "int8"), m) for g in self.names}, m) for m in self.methods]
            self._prefetch_baselines(specs)
        baselines = [self.full_record("FP32", fp32, precision="fp32", calibrator=None)]
        models_of_label = {"FP32": (fp32, {node_key(g, n): "fp32" for g in self.names for n in self.ws.int8_nodes(g)})}
        self.crit = crit = criterion_of(cfg, self.task, baselines[0]["accuracy"][cfg["criterion"]["metric"]])
        hi = crit["higher_is_better"]
        passes = (lambda acc: acc[crit["metric"]] >= crit["threshold"] - 1e-12) if hi else \
            (lambda acc: acc[crit["metric"]] <= crit["threshold"] + 1e-12)
        try:
            fp16 = {g: self.ws.model(g, all_of(g, "fp16"), self.methods[0], default="fp16") for g in self.names}
            baselines.append(self.full_record("FP16", fp16, precision="fp16", calibrator=None))
            models_of_label["FP16"] = (fp16, {node_key(g, n): "fp16" for g in self.names for n in self.ws.int8_nodes(g)})
        except WorkbenchError as exc:  # an FP16 graph the backend cannot build or run is a result, not a crash
            baselines.append({"label": "FP16", "precision": "fp16", "calibrator": None, "error": str(exc)[:300]})
        for m in tqdm(self.methods, desc="baselines", disable=not self.progress):
            models = {g: self.ws.model(g, all_of(g, "int8"), m) for g in self.names}
            label = f"INT8 all ({m})"
            baselines.append(self.full_record(label, models, precision="int8", calibrator=m))
            models_of_label[label] = (models, {node_key(g, n): "int8" for g in self.names for n in self.ws.int8_nodes(g)})
        for b in baselines:
            if "accuracy" in b:
                b["passed"] = passes(b["accuracy"])
        int8 = [b for b in baselines if b.get("precision") == "int8"]
        start = self._most_accurate(int8)
        search_rec = self.search_from(start, passes)
        selected, timing = self.select(search_rec, baselines, models_of_label)
        host = host_info()
        run = {"format": "wb-run/1", "id": self.dir.name, "created": dt.datetime.now(dt.timezone.utc).isoformat(),
               "model": self.task.name, "backend": cfg["backend"]["name"], "recipe": cfg["quantize"]["recipe"],
               "host": host, "device": f"CPU: {describe(host)}, {cfg['backend']['threads']} threads (ONNX Runtime"
                                       f"{', int8 mode ' + cfg['quantize']['ort_mode'] if cfg['quantize']['recipe'] == 'onnxruntime' else ''}"
                                       f"); TensorRT not measured",
               "task": {"name": self.task.name, "graphs": self.names, "links": self.task.links,
                        "shapes": {g: self.ws.shapes(g) for g in self.names},
                        "metrics": {m.name: {"higher_is_better": m.higher_is_better} for m in self.task.metrics}},
               "status": "passed" if selected else search_rec["status"], "criterion": crit, "config": cfg,
               "baselines": baselines, "selected": selected, "side_by_side": timing,
               "searches": [{k: v for k, v in search_rec.items()
                             if k not in ("models", "flat", "trace", "sensitivity", "candidates")}],
               "sensitivity": search_rec["sensitivity"], "trace": search_rec["trace"],
               "n_full_evals": search_rec["n_full_evals"], "n_computed_evals": search_rec["n_computed_evals"],
               "n_cache_hits": search_rec["n_cache_hits"],
               "wall_s": round(time.time() - t0, 1),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        write_json(self.dir / "run.json", run)
        # The ONNX models behind each baseline and the selection (run-relative), for tools that rebuild them
        # with another builder (`wb rtx-check`); the same file the WeNet pipeline writes.
        deliverables = {label: models for label, (models, _) in models_of_label.items()}
        if selected:
            deliverables["selected"] = {g: self.dir / "final" / f"{g}.onnx" for g in self.names}
        def where(p: Path) -> str:  # run-relative; a user's FP32 graph outside the run stays absolute
            p, root = Path(p).resolve(), self.dir.resolve()
            return p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)

        write_json(self.dir / "models.json", {label: {g: where(p) for g, p in models.items()}
                                              for label, models in deliverables.items()})
        return run

    def search_from(self, start: dict, passes) -> dict:
        method = start["calibrator"]

        def models_of(flat):
            return {g: self.ws.model(g, split_plan(flat, g), method) for g in self.names}

        return search_from(start, nodes=[node_key(g, n) for g in self.names for n in self.ws.int8_nodes(g)],
                           sensitivity=self.sensitivity(method), groups=probe_groups(self.ws.analysis, node_key),
                           models_of=models_of, accuracy=lambda flat: self.accuracy(models_of(flat)),
                           latency=lambda flat: self.latency(models_of(flat), search=True), passes=passes,
                           cfg=self.cfg, cache_path=self.dir / f"search_cache.{method}.jsonl",
                           progress=self.progress, fanout=self._search_fanout(method),
                           side_by_side=lambda options: self.side_by_side(options, search=True))

    def _search_fanout(self, method: str) -> dict:
        from pipeline.fanout import task_accuracy, task_prepare

        if not self.fanout.distributed:
            return {}
        return self.fanout.search(task_accuracy, task_prepare, self._context("accuracy", task=self.task), method)

    def select(self, search_rec: dict, baselines: list[dict], models_of_label: dict) -> tuple[dict | None, dict | None]:
        """The fastest passing option (pipeline.selection), decided on paired side-by-side timings with FP32."""
        options = [(b["label"], *models_of_label[b["label"]], b, b.get("calibrator")) for b in baselines
                   if b.get("passed") and b["label"] in models_of_label] + search_rec.get("candidates", [])
        m = self.task.metric(self.crit["metric"])
        lat_cfg = self.cfg["latency"]
        picked = select(options, lambda rec: -rec["accuracy"][m.name] if m.higher_is_better else rec["accuracy"][m.name],
                        self.cache, self.side_by_side, self.ws.fp32, lat_cfg["tie_tolerance"],
                        lat_cfg["side_by_side_max"])
        if picked is None:
            return None, None
        (label, models, flat, rec, calibrator), lat, timing = picked
        self.finalize(models, flat)
        selected = {"label": "selected mix", "source": label, "plan_hash": flat_plan_hash(flat),
                    "calibrator": calibrator, "same_plan": timing["same_plan_as_selected"], **plan_counts(flat),
                    "fallback_nodes": sorted(k for k, v in flat.items() if v != "int8"),
                    "accuracy": rec["accuracy"], "passed": True, "latency": lat[label], "reference_latency": lat["FP32"]}
        return selected, timing

    def side_by_side(self, options: dict[str, dict[str, Path]], search: bool = False) -> dict[str, dict]:
        """Each option ({label: models}) timed interleaved run by run (`search`: the search's protocol)."""
        lat = self.cfg["latency"]
        warmup, iters = (lat["search_warmup"], lat["search_iters"]) if search else (lat["warmup"], lat["iters"])
        out = {label: {"objective_ms": 0.0, "cases": [], "warmup": warmup, "iters": iters,
                       "interleaved": True} for label in options}
        for g in self.names:
            runners = {label: self.ws.runner(g, models[g]) for label, models in options.items()}
            for label, rows in engines.bench_interleaved(runners, self.cases[g], warmup, iters).items():
                for r in rows:
                    out[label]["cases"].append({"model": g, **{k: r[k] for k in ("bs", "sl", "median_ms", "p90_ms",
                                                                                  "latencies_ms", "throughput")}})
                    out[label]["objective_ms"] += r["median_ms"]
        return out

    def finalize(self, models: dict[str, Path], flat: dict[str, str]) -> None:
        """The selected mix's models, plans and engines under run_dir/final/."""
        import shutil

        final = self.dir / "final"
        final.mkdir(exist_ok=True)
        for g in self.names:
            shutil.copyfile(models[g], final / f"{g}.onnx")
            save_plan(edit_plan(create_plan(self.ws.analysis[g], "fp32"), set_nodes=split_plan(flat, g)),
                      final / f"{g}.plan.json")
            engines.build(final / f"{g}.onnx", self.ws.shapes(g), final / f"{g}_engine",
                          backend=self.cfg["backend"]["name"], kind="generic", threads=self.cfg["backend"]["threads"])


def run_task_experiment(cfg: dict, task: Task, run_dir: str | Path, progress: bool = True) -> dict:
    """Run the whole experiment for `task` (a loaded, checked Task) into `run_dir`."""
    from pipeline.config import resolve_backend_and_recipe

    cfg = resolve_backend_and_recipe(copy.deepcopy(cfg))
    if cfg["backend"]["name"] != "onnxruntime":
        raise WorkbenchError("the task pipeline runs on the onnxruntime backend for now (TensorRT runners need "
                             "WeNet's interface); set backend.name = \"onnxruntime\"")
    exp = TaskExperiment(cfg, task, Path(run_dir), progress)
    try:
        return exp.run()
    finally:
        if getattr(exp, "_fanout", None) is not None:
            exp._fanout.close()  # Ray's logs into run_dir/ray/
