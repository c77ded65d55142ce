"""User code through entry points: `[task] entry = "mypkg.tasks:make_task"` (a callable returning a Task,
given the [task] options table) and `[task] metric = "mypkg.metrics:score"` for the generic task."""
from __future__ import annotations

import importlib
import math
from typing import Any, Callable

from core.errors import WorkbenchError

from .base import Task, check_task_shape


def load_callable(spec: str, what: str) -> Callable:
    """`module:attribute` -> the callable, with one clear error for each way it can be wrong."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise WorkbenchError(f"{what} {spec!r} must be 'module:callable' (e.g. mypkg.tasks:make_task)")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise WorkbenchError(f"{what} {spec!r}: cannot import {module!r} ({exc}); is it installed or on "
                             f"PYTHONPATH?") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise WorkbenchError(f"{what} {spec!r}: {module} has no callable {attr!r}")
    return fn


def load_task(cfg: dict, base_dir=None, run_dir=None, cache_dir=None, progress: bool = True) -> Task:
    """The task of an experiment config's [task] table: built in (`kind`) or a user entry point (`entry`).
    `wenet_asr` exports its graphs into `run_dir` and reads the speech corpus (generated into `cache_dir` when
    missing), so it is made inside the run."""
    t = cfg["task"]
    if t.get("entry"):
        fn = load_callable(t["entry"], "task entry point")
        task = fn(dict(t.get("options") or {}))
        if not isinstance(task, Task):
            raise WorkbenchError(f"task entry point {t['entry']!r} returned {type(task).__name__}, not a "
                                 f"tasks.base.Task")
    elif t["kind"] == "onnx":
        from .onnx_task import OnnxTask

        task = OnnxTask.from_config(t, base_dir)
    elif t["kind"] == "sentence_embedding":
        from .sentence_embedding import SentenceEmbeddingTask

        task = SentenceEmbeddingTask(t.get("options") or {})
    elif t["kind"] == "wenet_asr":
        from .wenet_asr import WenetAsrTask

        if run_dir is None:
            raise WorkbenchError("the wenet_asr task is made inside a run: give load_task a run_dir")
        task = WenetAsrTask(cfg, run_dir, cache_dir, progress)
    else:
        raise WorkbenchError(f"config task.kind = {t['kind']!r}: this pipeline knows 'wenet_asr', 'onnx' and "
                             f"'sentence_embedding', or give task.entry")
    check_task_shape(task)
    task.check()
    if (t.get("entry") or t["kind"] != "wenet_asr") and "qat" in cfg["calibration"]["methods"] \
            and "qat" not in task.extra_methods():
        from quant.qat_distill import check_task_qat_dir  # a task QAT directory must be of this task's model

        spec = task.qat_model()
        if spec is None:
            raise WorkbenchError(f"config qat.dir: task {task.name!r} has no PyTorch model, so no QAT directory "
                                 f"serves it")
        check_task_qat_dir(cfg["qat"]["dir"], task.name, spec["info"])
    task.metric(cfg["criterion"]["metric"])  # the criterion's metric must be one of the task's
    return task


def call_metric(fn: Callable, reference: list, candidate: list, where: str) -> dict[str, Any]:
    """A user metric: fn(reference outputs, candidate outputs) -> {name: float} or a float (named "user")."""
    value = fn(reference, candidate)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = {"user": float(value)}
    if not isinstance(value, dict):
        raise WorkbenchError(f"user metric {where} returned {type(value).__name__}; return a float or a dict of "
                             f"floats")
    out = {}
    for name, v in value.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise WorkbenchError(f"user metric {where}: {name!r} is {v!r}, not a number")
        if math.isnan(v):
            raise WorkbenchError(f"user metric {where}: {name!r} is NaN")
        out[str(name)] = float(v)
    return out
