"""The generic task: any ONNX graphs, feeds from .npz directories, fidelity metrics against FP32. No Python needed
from the user:

    [task]
    kind = "onnx"
    metric = ""                       # optional "module:callable": a user metric on top of the built-in ones
    [[task.graphs]]
    name = "model"
    path = "model.onnx"
    calib_data = "feeds/calib"       # .npz files, one feed dict each, keyed by input name
    eval_data = "feeds/eval"         # the metrics are computed on these (FP32 outputs are the reference)
    latency_data = ""                # default: the first two eval files
    main_output = ""                 # what single-layer sensitivity compares (default: the first output)

Graphs are independent here (each runs on its own feeds); the metrics of a multi-graph task are the worst over
its graphs. Relative paths are taken from the config file's directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from calibration_data.feeds import load_npz_feeds
from core.errors import WorkbenchError

from .base import Feeds, GraphSpec, Metric, Task
from .entry import call_metric, load_callable
from .fidelity import METRICS, fidelity

GRAPH_KEYS = {"name", "path", "calib_data", "eval_data", "latency_data", "main_output"}


class OnnxTask(Task):
    name = "onnx"

    def __init__(self, graphs: list[GraphSpec], data: dict[str, dict[str, Path]], metric: str = ""):
        self.graphs = graphs
        self.data = data
        self._user_metric = load_callable(metric, "task.metric") if metric else None
        self._user_names: list[str] = []
        self._feeds: dict[tuple[str, str], list[Feeds]] = {}
        self._reference: dict[str, list[dict]] = {}
        self.metrics = list(METRICS)
        self.links = "independent graphs, each on its own feeds"

    @classmethod
    def from_config(cls, t: dict, base_dir: str | Path | None = None) -> "OnnxTask":
        base = Path(base_dir or ".")
        rows = t.get("graphs") or []
        if not isinstance(rows, list) or not rows:
            raise WorkbenchError("config task.kind = 'onnx' needs at least one [[task.graphs]] table with name and "
                                 "path")
        graphs, data = [], {}
        for i, g in enumerate(rows):
            if not isinstance(g, dict):
                raise WorkbenchError(f"config task.graphs[{i}] must be a table")
            unknown = set(g) - GRAPH_KEYS
            if unknown:
                raise WorkbenchError(f"config task.graphs[{i}]: unknown key(s) {sorted(unknown)} (known: "
                                     f"{sorted(GRAPH_KEYS)})")
            for key in ("name", "path", "calib_data", "eval_data"):
                if not isinstance(g.get(key), str) or not g.get(key):
                    raise WorkbenchError(f"config task.graphs[{i}].{key} must be a non-empty string")
            p = lambda k: (base / g[k]) if g.get(k) else None  # noqa: E731
            graphs.append(GraphSpec(g["name"], p("path"), main_output=g.get("main_output") or None))
            data[g["name"]] = {"calib": p("calib_data"), "eval": p("eval_data"), "latency": p("latency_data")}
        return cls(graphs, data, t.get("metric") or "")

    # --- data -------------------------------------------------------------------------------------------
    def _inputs(self, graph: str) -> dict:
        from engines.base import onnx_io

        return onnx_io(self.graph(graph).path)["inputs"]

    def feeds(self, graph: str, which: str) -> list[Feeds]:
        key = (graph, which)
        if key not in self._feeds:
            directory = self.data[graph][which]
            if which == "latency" and directory is None:
                self._feeds[key] = self.feeds(graph, "eval")[:2]
            else:
                self._feeds[key] = load_npz_feeds(directory, self._inputs(graph))
        return self._feeds[key]

    def check(self) -> None:
        super().check()
        from engines.base import onnx_io

        for g in self.graphs:
            outputs = onnx_io(g.path)["outputs"]
            if g.main_output and g.main_output not in outputs:
                raise WorkbenchError(f"graph {g.name!r}: main_output {g.main_output!r} is not an output of {g.path} "
                                     f"({sorted(outputs)})")
            for which in ("calib", "eval", "latency"):
                if which != "latency" or self.data[g.name]["latency"] is not None:
                    self.feeds(g.name, which)  # reads and checks every file now, before any expensive work
        if self._user_metric is not None:  # its names join the metrics; it must work on FP32 against itself
            ref = self._reference_outputs()
            names = sorted(call_metric(self._user_metric, ref, ref, "task.metric"))
            self._user_names = names
            self.metrics = list(METRICS) + [Metric(n, True) for n in names if n not in {m.name for m in METRICS}]

    # --- Task -------------------------------------------------------------------------------------------
    def calibration_feeds(self, graph: str, runners: Mapping[str, Any] | None = None) -> list[Feeds]:
        return self.feeds(graph, "calib")

    def latency_cases(self, graph: str) -> dict[str, Feeds]:
        return {f"{graph}#{i}": f for i, f in enumerate(self.feeds(graph, "latency"))}

    def _reference_outputs(self) -> dict[str, list[dict]]:
        """FP32 outputs on the eval feeds, computed once with ONNX Runtime."""
        from engines import open_onnx

        for g in self.graphs:
            if g.name not in self._reference:
                runner = open_onnx(g.path, kind="generic")
                self._reference[g.name] = [runner.run(f) for f in self.feeds(g.name, "eval")]
        return self._reference

    def evaluate(self, runners: Mapping[str, Any]) -> dict[str, float]:
        ref = self._reference_outputs()
        per_graph = []
        cand_all = {}
        for g in self.graphs:
            cand = [runners[g.name].run(f) for f in self.feeds(g.name, "eval")]
            cand_all[g.name] = cand
            per_graph.append(fidelity(zip(ref[g.name], cand)))
        out = {m.name: (min if m.higher_is_better else max)(p[m.name] for p in per_graph) for m in METRICS}
        if self._user_metric is not None:
            out |= call_metric(self._user_metric, ref, cand_all, "task.metric")
        return out

    def shape_feeds(self, graph: str) -> list[Feeds]:
        return [*self.feeds(graph, "calib"), *self.feeds(graph, "eval"), *self.feeds(graph, "latency")]

    def ranking_feeds(self, graph: str, runners: Mapping[str, Any] | None = None,
                      int8: Mapping[str, Any] | None = None) -> list[Feeds]:
        return self.feeds(graph, "eval")[:4]
