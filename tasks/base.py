"""The Task interface: the unit the search works on, so that it runs on any model and metric.

A task is small on purpose (NNCF's accuracy-control backend and Polygraphy's data loaders are the models):
  * `graphs`: its FP32 ONNX graphs in data-flow order, with engine shape ranges; `links` says in words how one
    graph's outputs feed the next (e.g. "encoder -> CTC prefix beam -> decoder"), for the report;
  * `metrics`: named metrics with a direction; `evaluate(runners)` computes all of them from one runner per
    graph (any object with input_names / output_names / run(feeds));
  * `calibration_feeds(graph, runners)`: the feed dicts of one graph (runners: the FP32 runners of the graphs
    before it, for chained tasks);
  * `latency_cases(graph)`: {case label: feeds} timed for the latency objective;
  * `ranking_feeds(graph)` (optional): a few feeds on which single-layer sensitivity is measured;
  * `shape_feeds(graph)` (optional): feeds whose shapes the engine must admit, when a graph gives no shapes.
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
    info: dict = field(default_factory=dict)


class Task(ABC):
    """Subclasses set `name`, `graphs`, `metrics` and implement the abstract methods."""

    name: str = "task"
    links: str = ""
    graphs: list[GraphSpec]
    metrics: list[Metric]

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

    def ranking_feeds(self, graph: str, runners: Mapping[str, Any]) -> list[Feeds]:
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
