"""The run's placed models and engines: one ONNX file per (graph, plan, calibrator, recipe, weights), one engine
per model, cached on disk under the run directory by content-defining tags, so a resumed run and a Ray worker
(pipeline.fanout) find the driver's files."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import engines
from core.errors import WorkbenchError
from graph.analysis import analyze, prepare_model
from graph.calib import load_table
from graph.placement import quantize
from graph.plan import create_plan, edit_plan, save_plan
from core.fsutil import read_json, write_json
from pipeline.runners import RunnerCache
from tasks.base import ALL, Task, check_metrics

REFERENCE_ITEMS = "reference_items.json"  # FP32's per-item results per set, for the workers' intervals too


class Workspace:
    def __init__(self, run_dir: Path, cfg: dict, task: Task):
        self.dir, self.cfg, self.task = Path(run_dir), cfg, task
        self.names = [g.name for g in task.graphs]
        self.fp32 = {g.name: Path(g.path) for g in task.graphs}
        self._loaded: dict[Path, tuple] = {}  # FP32 path -> (ModelProto, Analysis): read once, placed many times
        self.analysis = {g: self._load(p)[1] for g, p in self.fp32.items()}
        self.tables: dict[str, dict[str, Path]] = {}   # method -> graph -> calibration table file
        self.sources: dict[str, dict[str, Path]] = {}  # method -> graph -> the FP32 model it places (default fp32)
        self._tables: dict[Path, object] = {}          # table file -> graph.calib.CalibTable
        self._plans: dict[tuple[str, str], dict] = {}
        self._shapes: dict[str, dict] = {}
        self._runners = RunnerCache()
        self._reference: dict | None = None

    def _load(self, path: Path) -> tuple:
        if path not in self._loaded:
            m = prepare_model(path)
            self._loaded[path] = (m, analyze(m))
        return self._loaded[path]

    def add_source(self, method: str, models: dict[str, Path]) -> None:
        """Models of `method` are placed on these FP32 models (QAT: the fine-tuned weights), which must have
        the structure of the run's FP32 models so that one plan fits both."""
        for g, path in models.items():
            if analyze(str(path)).fingerprint != self.analysis[g].fingerprint:
                raise WorkbenchError(f"{path}: not the architecture of the run's FP32 {g} (plans would not fit)")
        self.sources[method] = {g: Path(p) for g, p in models.items()}

    def source(self, method: str) -> dict[str, Path]:
        return self.sources.get(method, self.fp32)

    def base_plan(self, graph: str, default: str) -> dict:
        """Every node at `default` (callers derive new plans with edit_plan; this one is never mutated)."""
        if (graph, default) not in self._plans:
            self._plans[graph, default] = create_plan(self.analysis[graph], default=default)
        return self._plans[graph, default]

    def int8_nodes(self, graph: str) -> list[str]:
        return [n for n, p in self.base_plan(graph, "int8")["nodes"].items() if p == "int8"]

    def model(self, graph: str, nodes: dict[str, str], method: str, default: str = "fp32",
              source: str | None = None, recipe: str | None = None) -> Path:
        """The ONNX model of `graph` with `nodes` ({id: precision}) over a `default` plan, placed with the
        ranges of `method` on the FP32 models of method `source` (default: `method`'s own, see add_source;
        "fp32": the run's FP32 models) by `recipe` (default: the run's)."""
        base = self.source(source or method)[graph]
        if all(p == "fp32" for p in nodes.values()) and default == "fp32":
            return base
        plan = edit_plan(self.base_plan(graph, default), set_nodes=nodes)
        recipe = recipe or self.cfg["quantize"]["recipe"]
        if any(p == "fp16" for p in plan["nodes"].values()):
            recipe = "tensorrt"  # the ONNX Runtime recipe has no FP16; the TensorRT one writes FP16-typed graphs
        ort_mode = self.cfg["quantize"]["ort_mode"] if recipe == "onnxruntime" else None  # part of the graph
        floats = self.cfg["quantize"].get("ort_float_outputs", "none") if recipe == "onnxruntime" else "none"
        per_token = self.cfg["quantize"].get("ort_per_token_inputs", "none") if recipe == "onnxruntime" else "none"
        tag = hashlib.sha256(json.dumps([plan["hash"], method, recipe, base.parent.name] + ([ort_mode] if ort_mode else [])
                                        + ([floats] if floats != "none" else [])  # defaults: the tags of before
                                        + ([f"per_token {per_token}"] if per_token != "none" else []))
                             .encode()).hexdigest()[:16]
        out = self.dir / "models" / graph / f"{tag}.onnx"
        if not out.is_file():
            table = self.tables[method][graph]
            if table not in self._tables:
                self._tables[table] = load_table(table)
            m, analysis = self._load(base)
            quantize(m, self._tables[table], plan=plan, recipe=recipe, out=out, analysis=analysis,
                     ort_mode=ort_mode or "auto", ort_float_outputs=floats, ort_per_token_inputs=per_token)
            save_plan(plan, out.with_suffix(".plan.json"))
        return out

    def discard(self, graph: str, model: Path) -> None:
        """Delete a placed model that nothing reads again (a sensitivity probe's, once scored), its plan and its
        engine: a WeNet run's 74 single-node models were 2.3 GB of placed models and, with their engines, most
        of a run's 7 GB. FP32 sources are never deleted; a later ws.model of that plan places it again."""
        model = Path(model)
        if model in self._source_models():
            return
        self._runners.drop(model)
        shutil.rmtree(self.engine_dir(graph, model), ignore_errors=True)
        model.with_suffix(".plan.json").unlink(missing_ok=True)
        model.unlink(missing_ok=True)

    def shapes(self, graph: str) -> dict:
        """The task's shape ranges, else ranges that admit every feed of `task.shape_feeds`."""
        if graph not in self._shapes:
            spec = self.task.graph(graph)
            self._shapes[graph] = spec.shapes or engines.base.shapes_from_feeds(self.task.shape_feeds(graph))
        return self._shapes[graph]

    def build(self, graph: str, model: Path, out_dir: Path):
        """The engine artifact of `model` (a placement of `graph`) in `out_dir`, built or reused (engines.build)."""
        return engines.build(model, self.shapes(graph), out_dir, backend=self.cfg["backend"]["name"],
                             kind=self.task.graph(graph).engine_kind, threads=self.cfg["backend"]["threads"])

    def engine_dir(self, graph: str, model: Path) -> Path:
        """engines/<graph>/<tag> for a placed model models/<graph>/<tag>.onnx; an FP32 source (fp32/, qat_fp32/,
        a user's) keeps its folder's name, so that two sources of one graph never share a directory."""
        model = Path(model)
        return self.dir / "engines" / graph / (model.stem if model.parent.name == graph else
                                                f"{model.parent.name}.{model.stem}")

    def runner(self, graph: str, model: Path):
        """The engine runner of `model`, kept while it is among the most recently used (pipeline.runners)."""
        def make():
            return engines.load(self.build(graph, model, self.engine_dir(graph, model)))

        return self._runners.get(model, make, self._source_models())

    def _source_models(self) -> set[Path]:
        """Every FP32 model placements start from (the run's, QAT's, SmoothQuant's): kept open, never deleted."""
        return {p for models in (self.fp32, *self.sources.values()) for p in models.values()}

    def runners(self, models: dict[str, Path]) -> dict:
        return {g: self.runner(g, p) for g, p in models.items()}

    # --- evaluation through the task (the driver's and the workers' one implementation) --------------------------
    @property
    def search_sets(self) -> list[str]:
        """What the accuracy path measures: the flat metrics (ALL) and each of the task's named eval_sets."""
        return [ALL, *self.task.eval_sets]

    def measure(self, models: dict[str, Path], which: list[str]) -> dict[str, tuple[dict, object]]:
        """{set: (checked metrics, per-item results)} of `which` (task.evaluate_sets)."""
        res = self.task.evaluate_sets(self.runners(models), which)
        out = {}
        for name in which:
            if name not in res:
                raise WorkbenchError(f"task {self.task.name!r} returned no results for evaluation set {name!r}")
            values, items = res[name]
            out[name] = (check_metrics(self.task, values, f"set {name!r}, models {sorted(models)}"), items)
        return out

    def set_reference(self, items: dict | None) -> None:
        """FP32's per-item results per set ({set: items}), which intervals compare with; kept in the run
        directory too, so that a worker's Workspace (pipeline.fanout) finds them."""
        self._reference = items
        if items:
            write_json(self.dir / REFERENCE_ITEMS, items)

    @property
    def reference_items(self) -> dict | None:
        if self._reference is None and (self.dir / REFERENCE_ITEMS).is_file():
            self._reference = read_json(self.dir / REFERENCE_ITEMS)
        return self._reference

    def intervals(self, items: dict | None, reference: dict | None = None) -> dict:
        """{set: paired bootstrap interval of the metric's change against FP32} (task.delta_interval, seeded)
        of every set with per-item results on both sides."""
        ref = reference if reference is not None else self.reference_items
        out = {}
        for name, it in (items or {}).items():
            if it is not None and ref and ref.get(name) is not None:
                ci = self.task.delta_interval(it, ref[name])
                if ci:
                    out[name] = ci
        return out

    def _record(self, res: dict) -> tuple[dict, dict | None]:
        """(accuracy dict, {set: items} or None) of measure(search_sets): the flat metrics, "sets" {name:
        {metric: value}} when the task names sets, "intervals" {set: interval} when FP32's items are known."""
        acc = dict(res[ALL][0])
        if self.task.eval_sets:
            acc["sets"] = {n: res[n][0] for n in self.task.eval_sets}
        items = {n: it for n, (_, it) in res.items() if it is not None} or None
        ivs = self.intervals(items)
        if ivs:
            acc["intervals"] = ivs
        return acc, items

    def accuracy(self, models: dict[str, Path], check: bool = False) -> dict:
        """The task's metrics (per set, with intervals: _record); `check`: with the counts of its reference
        check (the hackathon criterion). Per-item results are not kept (the search caches this dict)."""
        acc, _ = self._record(self.measure(models, self.search_sets))
        if check:
            c = self.reference_check(models)
            acc["hackathon_passed"], acc["hackathon_total"] = c["passed"], c["total"]
        return acc

    def reference_check(self, models: dict[str, Path]) -> dict | None:
        """The task's output check against the FP32 models, without its per-case rows (None: the task has none)."""
        c = self.task.reference_check(self.runners(models), self.runners(self.fp32))
        return None if c is None else {k: v for k, v in c.items() if k != "rows"}

    def accuracy_part(self, models: dict[str, Path]) -> dict:
        """What a baseline record holds besides latency: metrics, per-item results ({set: items}), the
        reference check."""
        acc, items = self._record(self.measure(models, self.search_sets))
        rec = {"accuracy": acc, "items": items}
        if self.task.check_name:
            rec[self.task.check_name] = self.reference_check(models)
        return rec
