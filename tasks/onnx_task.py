"""The generic task: any ONNX graphs, feeds from .npz directories, fidelity metrics against FP32. No Python needed
from the user:

    [task]
    kind = "onnx"
    metric = ""                       # optional "module:callable": a user metric on top of the built-in ones
    [[task.graphs]]
    name = "model"
    path = "model.onnx"
    calib_data = "feeds/calib"       # .npz files, one feed dict each, keyed by input name
    eval_data = "feeds/eval"         # the metrics are computed on these (FP32 outputs are the reference); or
                                     # named evaluation sets {a = "feeds/a", b = "feeds/b"}, each judged by the
                                     # criterion ([criterion] sets), the flat metrics pooled over all of them
    confirm_data = ""                # optional: a confirmation set only the confirmation stage reads
    latency_data = ""                # default: the first two eval files
    main_output = ""                 # what single-layer sensitivity compares (default: the first output)

Graphs are independent here (each runs on its own feeds); the metrics of a multi-graph task are the worst over
its graphs, and every graph names the same evaluation sets. Per-item cosines (of the worst output) give the
paired bootstrap interval of the cosine's change, which [criterion] mode = "bound" judges. Relative paths are
taken from the config file's directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from calibration_data.feeds import load_npz_feeds
from core.errors import WorkbenchError
from evaluation.bootstrap import paired_delta_ci

from .base import ALL, Feeds, GraphSpec, Metric, Task
from .entry import call_metric, load_callable
from .fidelity import METRICS, fidelity, item_cosines

GRAPH_KEYS = {"name", "path", "calib_data", "eval_data", "confirm_data", "latency_data", "main_output"}
CONFIRM_SET = "confirm"


class OnnxTask(Task):
    name = "onnx"

    def __init__(self, graphs: list[GraphSpec], data: dict[str, dict], metric: str = ""):
        """`data`: {graph: {"calib": dir, "eval": dir or {set: dir}, "latency": dir or None, "confirm": dir or
        None (optional)}}."""
        self.graphs = graphs
        self.data = {g: {**d, "eval": d["eval"] if isinstance(d["eval"], dict) else {ALL: d["eval"]}}
                     for g, d in data.items()}
        sets = {g: list(d["eval"]) for g, d in self.data.items()}
        first = next(iter(sets.values()))
        if any(v != first for v in sets.values()):
            raise WorkbenchError(f"task {self.name!r}: every graph must name the same evaluation sets ({sets})")
        self.eval_sets = tuple(n for n in first if n != ALL)
        confirms = {g: d.get("confirm") is not None for g, d in self.data.items()}
        if len(set(confirms.values())) > 1:
            raise WorkbenchError(f"task {self.name!r}: confirm_data must be given for every graph or none ({confirms})")
        self.confirm_set = CONFIRM_SET if all(confirms.values()) else ""
        self._user_metric = load_callable(metric, "task.metric") if metric else None
        self._user_names: list[str] = []
        self._feeds: dict[tuple[str, str], list[Feeds]] = {}
        self._reference: dict[str, dict[str, list[dict]]] = {}
        self.metrics = list(METRICS)
        self.links = "independent graphs, each on its own feeds"

    @classmethod
    def from_config(cls, t: dict, base_dir: str | Path | None = None) -> "OnnxTask":
        base = Path(base_dir or ".").resolve()  # absolute: Ray workers (another cwd, another node) read them too
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
                if not (isinstance(g.get(key), dict) and key == "eval_data") and \
                        (not isinstance(g.get(key), str) or not g.get(key)):
                    raise WorkbenchError(f"config task.graphs[{i}].{key} must be a non-empty string"
                                         + (" or a table {set = directory}" if key == "eval_data" else ""))
            ev = g["eval_data"]
            if isinstance(ev, dict) and (not ev or any(not isinstance(v, str) or not v for v in ev.values())
                                         or ALL in ev or CONFIRM_SET in ev or any(not k for k in ev)):
                raise WorkbenchError(f"config task.graphs[{i}].eval_data: a table of set names to directories, at "
                                     f"least one, not named {ALL!r} or {CONFIRM_SET!r} (got {ev!r})")
            p = lambda v: (base / v) if v else None  # noqa: E731
            graphs.append(GraphSpec(g["name"], p(g["path"]), main_output=g.get("main_output") or None))
            data[g["name"]] = {"calib": p(g["calib_data"]), "latency": p(g.get("latency_data")),
                               "eval": {k: p(v) for k, v in ev.items()} if isinstance(ev, dict) else p(ev),
                               "confirm": p(g.get("confirm_data"))}
        return cls(graphs, data, t.get("metric") or "")

    # --- data -------------------------------------------------------------------------------------------
    def _inputs(self, graph: str) -> dict:
        from engines.base import onnx_io

        return onnx_io(self.graph(graph).path)["inputs"]

    def _dir(self, graph: str, which: str) -> Path | None:
        """The directory of `which`: "calib", "latency", the confirmation set, or an evaluation set's name."""
        d = self.data[graph]
        if which in ("calib", "latency"):
            return d[which]
        return d.get("confirm") if which == CONFIRM_SET else d["eval"][which]

    def feeds(self, graph: str, which: str) -> list[Feeds]:
        """The feeds of `which` (see _dir; ALL, or "eval": every evaluation set's, in order)."""
        which = ALL if which == "eval" else which
        key = (graph, which)
        if key not in self._feeds:
            if which == "latency" and self.data[graph]["latency"] is None:
                self._feeds[key] = self.feeds(graph, self._eval_names[0])[:2]
            elif which == ALL and ALL not in self.data[graph]["eval"]:
                self._feeds[key] = [f for n in self.eval_sets for f in self.feeds(graph, n)]
            else:
                self._feeds[key] = load_npz_feeds(self._dir(graph, which), self._inputs(graph))
        return self._feeds[key]

    @property
    def _eval_names(self) -> list[str]:
        return list(self.eval_sets) or [ALL]

    def check(self) -> None:
        super().check()
        from engines.base import onnx_io

        for g in self.graphs:
            outputs = onnx_io(g.path)["outputs"]
            if g.main_output and g.main_output not in outputs:
                raise WorkbenchError(f"graph {g.name!r}: main_output {g.main_output!r} is not an output of {g.path} "
                                     f"({sorted(outputs)})")
            for which in ["calib", *self._eval_names, "latency"] + ([CONFIRM_SET] if self.confirm_set else []):
                if which != "latency" or self.data[g.name]["latency"] is not None:
                    self.feeds(g.name, which)  # reads and checks every file now, before any expensive work
        if self._user_metric is not None:  # its names join the metrics; it must work on FP32 against itself
            ref = self._reference_outputs(ALL)
            names = sorted(call_metric(self._user_metric, ref, ref, "task.metric"))
            self._user_names = names
            self.metrics = list(METRICS) + [Metric(n, True) for n in names if n not in {m.name for m in METRICS}]

    # --- Task -------------------------------------------------------------------------------------------
    def calibration_feeds(self, graph: str, runners: Mapping[str, Any] | None = None) -> list[Feeds]:
        return self.feeds(graph, "calib")

    def latency_cases(self, graph: str) -> dict[str, Feeds]:
        return {f"{graph}#{i}": f for i, f in enumerate(self.feeds(graph, "latency"))}

    def _reference_outputs(self, which: str) -> dict[str, list[dict]]:
        """FP32 outputs on the feeds of `which` per graph, computed once with ONNX Runtime."""
        from engines import open_onnx

        ref = self._reference.setdefault(which, {})
        for g in self.graphs:
            if g.name not in ref:
                runner = open_onnx(g.path, kind="generic")
                ref[g.name] = [runner.run(f) for f in self.feeds(g.name, which)]
        return ref

    def evaluate(self, runners: Mapping[str, Any]) -> dict[str, float]:
        return self.evaluate_sets(runners, [ALL])[ALL][0]

    def evaluate_sets(self, runners: Mapping[str, Any], which) -> dict[str, tuple[dict[str, float], dict]]:
        """{set: (metrics, {"cosine": per-item cosines of the worst output})} of ALL (every evaluation set's
        feeds), the named sets and the confirmation set."""
        out = {}
        for name in which:
            if name != ALL and name not in self.eval_sets and name != (self.confirm_set or None):
                raise WorkbenchError(f"task {self.name!r} has no evaluation set {name!r}")
            ref = self._reference_outputs(name)
            per_graph, cand_all, worst = [], {}, None
            for g in self.graphs:
                cand = [runners[g.name].run(f) for f in self.feeds(g.name, name)]
                cand_all[g.name] = cand
                values = fidelity(zip(ref[g.name], cand))
                per_graph.append(values)
                items = min(item_cosines(zip(ref[g.name], cand)).values(), key=np.mean)
                worst = items if worst is None or np.mean(items) < np.mean(worst) else worst
            values = {m.name: (min if m.higher_is_better else max)(p[m.name] for p in per_graph) for m in METRICS}
            if self._user_metric is not None:
                values |= call_metric(self._user_metric, ref, cand_all, "task.metric")
            out[name] = (values, {"cosine": [float(c) for c in worst]})
        return out

    def delta_interval(self, items: dict, reference: dict) -> dict | None:
        """The paired bootstrap interval of the mean cosine's change (FP32's own items: 1 each)."""
        if len(items["cosine"]) != len(reference["cosine"]):
            return None
        return {"metric": "cosine", **paired_delta_ci(items["cosine"], reference["cosine"])}

    def shape_feeds(self, graph: str) -> list[Feeds]:
        sets = [*self._eval_names] + ([CONFIRM_SET] if self.confirm_set else [])
        return [*self.feeds(graph, "calib"), *(f for n in sets for f in self.feeds(graph, n)),
                *self.feeds(graph, "latency")]

    def ranking_feeds(self, graph: str, runners: Mapping[str, Any] | None = None,
                      int8: Mapping[str, Any] | None = None) -> list[Feeds]:
        return self.feeds(graph, self._eval_names[0])[:4]
