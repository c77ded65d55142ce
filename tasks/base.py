"""The Task interface: the unit the search works on, so that it runs on any model and metric.

A task is small on purpose (NNCF's accuracy-control backend and Polygraphy's data loaders are the models):
  * `graphs`: its FP32 ONNX graphs in data-flow order, with engine shape ranges; `links` says in words how one
    graph's outputs feed the next (e.g. "encoder -> CTC prefix beam -> decoder"), for the report;
  * `metrics`: named metrics with a direction; `evaluate(runners)` computes all of them from one runner per
    graph (any object with input_names / output_names / run(feeds));
  * `calibration_feeds(graph, runners)`: the feed dicts of one graph (runners: the FP32 runners of the graphs
    before it, for chained tasks);
  * `latency_cases(graph)`: {case label: feeds} timed for the latency objective;
  * `ranking_feeds(graph, runners, int8)` (optional): a few feeds on which single-layer sensitivity is measured
    (given the FP32 and the all-INT8 runners, so a task can pick the items where they disagree most);
  * `shape_feeds(graph)` (optional): feeds whose shapes the engine must admit, when a graph gives no shapes;
  * `evaluate_items` and `delta_interval` (optional): per-item results and the paired bootstrap interval of the
    metric's change against FP32 that they give;
  * `eval_sets`, `confirm_set` and `evaluate_sets(runners, which)` (optional): named evaluation sets (domains)
    the criterion applies to, a confirmation set only the confirmation stage measures, and their metrics and
    per-item results (default: no named sets, `evaluate_items` as the one set ALL);
  * `reference_check(runners, reference)` (optional): an output check against the FP32 runners, recorded under
    `check_name` (the criterion kind "hackathon" asks every case of it to pass);
  * `extra_methods()` (optional): calibrators that come with their own FP32 weights and tables (QAT);
  * `qat_model()` (optional): the task's model as a PyTorch module and unlabelled training batches, for QAT by
    distillation of its FP32 outputs (`wb qat --config`, quant.qat_distill); its directory joins a run as "qat".
Every check of the task's own data happens in `check()`, which the pipeline calls before any expensive work.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from core.errors import WorkbenchError

Feeds = dict[str, np.ndarray]
ALL = "all"  # evaluate_sets' name of the flat (pooled) metrics over the union of the task's eval_sets


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    unit: str = ""  # "%" for rates shown as percent, "dB", "" for plain numbers

    def better(self, a: float, b: float) -> bool:
        """Whether `a` is strictly better than `b`."""
        return a > b if self.higher_is_better else a < b


@dataclass(frozen=True)
class GraphSpec:
    name: str                      # the key of this graph in plans, tables, engines and results
    path: Path                     # the FP32 ONNX file
    shapes: dict | None = None     # engine shape ranges {input: {"min","opt","max"}}; None: engines' defaults
    main_output: str | None = None  # the output single-layer sensitivity compares (None: the first)
    engine_kind: str = "generic"   # engines' kind: "encoder"/"decoder" check WeNet's interface and name the files
    padding: Any = None            # quant.collect.Padding of its calibration feeds (None: padding counted)
    info: dict = field(default_factory=dict)


class Task(ABC):
    """Subclasses set `name`, `graphs`, `metrics` and implement the abstract methods."""

    name: str = "task"
    links: str = ""
    check_name: str = ""  # the record key of reference_check's summary, when the task has one
    model: str = ""       # what run.json and the run index call the model (empty: the task's name)
    graphs: list[GraphSpec]
    metrics: list[Metric]
    eval_sets: tuple[str, ...] = ()  # named evaluation sets the criterion applies to (empty: the one set ALL)
    confirm_set: str = ""            # a set nothing but the confirmation stage measures (empty: none)

    def metric(self, name: str) -> Metric:
        for m in self.metrics:
            if m.name == name:
                return m
        raise WorkbenchError(f"task {self.name!r} has no metric {name!r}; it has {', '.join(self.metric_names)}")

    @property
    def metric_names(self) -> list[str]:
        return [m.name for m in self.metrics]

    def graph(self, name: str) -> GraphSpec:
        for g in self.graphs:
            if g.name == name:
                return g
        raise WorkbenchError(f"task {self.name!r} has no graph {name!r}; it has {', '.join(g.name for g in self.graphs)}")

    def check(self) -> None:
        """Validate the task's graphs and data before any expensive work (the default checks the graphs)."""
        check_task_shape(self)

    @abstractmethod
    def calibration_feeds(self, graph: str, runners: Mapping[str, Any]) -> Iterable[Feeds]:
        ...

    @abstractmethod
    def evaluate(self, runners: Mapping[str, Any]) -> dict[str, float]:
        ...

    @abstractmethod
    def latency_cases(self, graph: str) -> dict[str, Feeds]:
        ...

    def shape_feeds(self, graph: str) -> list[Feeds]:
        """Feeds whose shapes the graph's engine must admit when GraphSpec.shapes is not given (default: the
        ranking feeds and the latency cases)."""
        return list(self.ranking_feeds(graph, {})) + list(self.latency_cases(graph).values())

    def evaluate_items(self, runners: Mapping[str, Any]) -> tuple[dict[str, float], Any]:
        """The metrics and per-item results that `delta_interval` resamples (default: no items)."""
        return self.evaluate(runners), None

    def evaluate_sets(self, runners: Mapping[str, Any], which: Iterable[str]) -> dict[str, tuple[dict[str, float], Any]]:
        """{name: (metrics, per-item results)} of each set in `which`: ALL (the flat metrics over the union of
        `eval_sets`, e.g. a pooled CER), names of `eval_sets`, or `confirm_set`. Default: `evaluate_items` as
        the one set ALL."""
        which = list(which)
        if which != [ALL]:
            raise WorkbenchError(f"task {self.name!r} has no evaluation sets {which} (it evaluates one set)")
        return {ALL: self.evaluate_items(runners)}

    def delta_interval(self, items: Any, reference: Any) -> dict | None:
        """The paired bootstrap interval of the metric's change against FP32 from two `evaluate_items` results
        (evaluation.bootstrap; default: none)."""
        return None

    def reference_check(self, runners: Mapping[str, Any], reference: Mapping[str, Any]) -> dict | None:
        """{"passed", "total", ...} of an output check against the FP32 runners `reference` (default: none)."""
        return None

    def extra_methods(self) -> dict[str, dict[str, dict[str, Path]]]:
        """{method: {"sources": {graph: FP32 ONNX}, "tables": {graph: calibration table}}} of calibrators whose
        ranges come with their own weights (default: none)."""
        return {}

    def qat_model(self) -> dict | None:
        """{"graph": graph name, "build": () -> FP32 torch module (a fresh one per call), "write_onnx": (module,
        path) -> None (this graph's export), "train": (numpy Generator, n) -> feeds of n training items, "info":
        {what identifies the model: a QAT directory of another is refused}, "data": {what it trains on}} for
        quant.qat_distill (default: None, no PyTorch model)."""
        return None

    def fingerprint(self) -> dict:
        """What, besides the models, a cached result depends on (e.g. the evaluation data; default: nothing)."""
        return {}

    def ranking_feeds(self, graph: str, runners: Mapping[str, Any], int8: Mapping[str, Any] | None = None) -> list[Feeds]:
        """Feeds for the single-layer sensitivity ranking (default: the first few calibration feeds)."""
        out = []
        for f in self.calibration_feeds(graph, runners):
            out.append(f)
            if len(out) == 4:
                break
        return out


def check_task_shape(task: Task) -> None:
    """What every task must satisfy: graphs exist and are uniquely named, metrics are uniquely named."""
    if not isinstance(task, Task):
        raise WorkbenchError(f"a task must be a tasks.base.Task, got {type(task).__name__}")
    if not task.graphs:
        raise WorkbenchError(f"task {task.name!r} names no graphs")
    names = [g.name for g in task.graphs]
    if len(set(names)) != len(names) or any(not n or ":" in n for n in names):
        raise WorkbenchError(f"task {task.name!r}: graph names must be unique, non-empty and free of ':' ({names})")
    for g in task.graphs:
        if not Path(g.path).is_file():
            raise WorkbenchError(f"task {task.name!r}: graph {g.name!r} file {g.path} does not exist")
    mnames = [m.name for m in task.metrics]
    if not mnames or len(set(mnames)) != len(mnames):
        raise WorkbenchError(f"task {task.name!r}: metrics must be a non-empty list of unique names ({mnames})")
    sets = list(task.eval_sets) + ([task.confirm_set] if task.confirm_set else [])
    if len(set(sets)) != len(sets) or ALL in sets or any(not isinstance(n, str) or not n for n in sets):
        raise WorkbenchError(f"task {task.name!r}: evaluation and confirmation set names must be unique, non-empty "
                             f"and not {ALL!r} ({sets})")


def check_metrics(task: Task, values: Mapping[str, float], where: str) -> dict[str, float]:
    """The task's metrics as finite floats: a missing one or a NaN is one clear error, not a silent pass."""
    out = {}
    for m in task.metrics:
        if m.name not in values:
            raise WorkbenchError(f"task {task.name!r} returned no value for metric {m.name!r} ({where})")
        try:
            v = float(values[m.name])
        except (TypeError, ValueError):
            raise WorkbenchError(f"task {task.name!r}: metric {m.name!r} is {values[m.name]!r}, not a number "
                                 f"({where})") from None
        if math.isnan(v):
            raise WorkbenchError(f"task {task.name!r}: metric {m.name!r} is NaN ({where})")
        out[m.name] = v
    return out
