"""The one runner base of every backend: input/output specs, optional built shape ranges, feeds checked once.

A backend's runner subclasses `EngineRunner`, calls its `__init__` with the model's specs (and, for a built
engine, the built shape ranges) once its session or engine is ready, and implements `_run(feeds, outputs)`
(and `_time_runs` when it has its own timer). The public `run` and `time_runs` check the feeds first, here and
only here, so every backend rejects the same bad feeds with the same message:
  * names: a missing or an unexpected input (every input the model has is required, the WeNet interface's
    optional ones included);
  * dtype, rank and fixed last dimension, against the spec;
  * shape outside the engine's built min..max range (as a TensorRT engine would).
Runners follow the `evaluation.runners.Runner` protocol (`input_names`, `output_names`, `run(feeds)`).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from core.errors import WorkbenchError
from evaluation.interface import INTERFACES, TensorSpec
from evaluation.runners import interface_mismatch

Shapes = dict[str, dict[str, list[int]]]  # input name -> {"min": dims, "opt": dims, "max": dims}


def check_interface(kind: str, where: str, input_names: Sequence[str], output_names: Sequence[str]) -> None:
    """WorkbenchError when a model of WeNet's `kind` ("encoder"/"decoder") misses or adds inputs or outputs."""
    ins, outs = INTERFACES[kind]
    problems = "; ".join(p for p in (interface_mismatch(kind, "inputs", ins, input_names),
                                     interface_mismatch(kind, "outputs", outs, output_names)) if p)
    if problems:
        raise WorkbenchError(f"{where} does not have WeNet's {kind} interface: {problems}")


def interface_specs(kind: str, names: Sequence[str], outputs: bool = False) -> list[TensorSpec]:
    """WeNet's specs of `kind` for the tensors `names` (after `check_interface`), in the model's order."""
    by_name = {s.name: s for s in INTERFACES[kind][1 if outputs else 0]}
    return [by_name[n] for n in names]


def check_in_range(shapes: Shapes, feeds: Mapping[str, np.ndarray], where: str) -> None:
    """WorkbenchError naming the input when a feed's shape is outside the engine's built range."""
    for name, value in feeds.items():
        rng = shapes.get(name)
        if rng is None:
            continue
        shape = list(np.shape(value))
        if len(shape) != len(rng["min"]) or any(not lo <= s <= hi for s, lo, hi in zip(shape, rng["min"], rng["max"])):
            raise WorkbenchError(
                f"input {name} of {where} has shape {shape}, outside the engine's built range "
                f"{rng['min']}..{rng['max']}: rebuild with wider shape ranges")


class EngineRunner:
    """Base of every backend's runner: specs, built ranges, `run`/`time_runs` checking feeds once.

    Subclasses call `EngineRunner.__init__` once their model is loaded, then implement `_run`."""

    def __init__(self, path: str | Path, kind: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 shapes: Shapes | None = None, shapes_where: str | None = None):
        """`inputs`/`outputs`: one spec per model tensor, in the model's order (dtype None: not checked);
        `shapes`: the built ranges of a built engine (None: any shape); `shapes_where`: how range errors name
        the engine (default: `path`)."""
        self.path = Path(path)
        self.kind = kind
        self.input_specs: dict[str, TensorSpec] = {s.name: s for s in inputs}
        self.output_specs: dict[str, TensorSpec] = {s.name: s for s in outputs}
        self.input_names = [s.name for s in inputs]
        self.output_names = [s.name for s in outputs]
        self.shapes = shapes
        self.shapes_where = shapes_where or str(self.path)

    # ---------------------------------------------------------------- checks (once per run / time_runs)

    def check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Names, dtypes, ranks and fixed last dimensions of `feeds` against the input specs."""
        if not isinstance(feeds, Mapping):
            raise WorkbenchError(f"feeds for {self.path} must be a dict of input name -> array, "
                                 f"got {type(feeds).__name__}")
        missing = [n for n in self.input_names if n not in feeds]
        unexpected = [n for n in feeds if n not in self.input_specs]
        if missing or unexpected:
            raise WorkbenchError(f"feeds for {self.path}: missing inputs {missing or 'none'}, "
                                 f"unexpected inputs {unexpected or 'none'}")
        for name, value in feeds.items():
            spec = self.input_specs[name]
            if not isinstance(value, np.ndarray) or (spec.dtype is not None and value.dtype != spec.dtype):
                got = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
                want = np.dtype(spec.dtype) if spec.dtype is not None else "a numpy array"
                raise WorkbenchError(f"input {name} of {self.path} must be {want}, got {got}")
            if value.ndim != spec.rank:
                raise WorkbenchError(f"input {name} of {self.path} must have rank {spec.rank}, got shape {value.shape}")
            if spec.last_dim is not None and value.shape[-1] != spec.last_dim:
                raise WorkbenchError(f"input {name} of {self.path} must have last dimension {spec.last_dim}, "
                                     f"got shape {value.shape}")

    def check(self, feeds: Mapping[str, np.ndarray]) -> None:
        """`check_feeds`, then the built shape ranges (if any)."""
        self.check_feeds(feeds)
        if self.shapes is not None:
            check_in_range(self.shapes, feeds, self.shapes_where)

    def _outputs(self, outputs: Sequence[str] | None) -> list[str]:
        if outputs is None:
            return self.output_names
        names = [outputs] if isinstance(outputs, str) else list(outputs)
        unknown = [n for n in names if n not in self.output_specs]
        if unknown or not names:
            raise WorkbenchError(f"outputs {unknown or names} are not outputs of {self.path} "
                                 f"(its outputs: {', '.join(self.output_names)})")
        return names

    # ---------------------------------------------------------------- public API

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """{output name: array} for `feeds` (checked first); `outputs`: only these (default: all)."""
        names = self._outputs(outputs)
        self.check(feeds)
        return self._run(feeds, names)

    def time_runs(self, feeds: Mapping[str, np.ndarray], warmup: int, iters: int) -> tuple[list[float], str]:
        """(seconds per run, timer name); the feeds are checked once, before (not inside) the timed loop."""
        self.check(feeds)
        return self._time_runs(feeds, warmup, iters)

    # ---------------------------------------------------------------- what a backend implements

    def _run(self, feeds: Mapping[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _time_runs(self, feeds: Mapping[str, np.ndarray], warmup: int, iters: int) -> tuple[list[float], str]:
        """Wall clock around `_run` (a backend with a device timer overrides this)."""
        for _ in range(warmup):
            self._run(feeds, self.output_names)
        out = []
        for _ in range(iters):
            t0 = time.perf_counter()
            self._run(feeds, self.output_names)
            out.append(time.perf_counter() - t0)
        return out, "perf_counter"
