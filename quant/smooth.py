"""SmoothQuant's calibration-driven scales (graph.smooth applies them; see its docstring for the method and why
it is written here).

    s_k = max|X_k| ** alpha / max|W_k,:| ** (1 - alpha)

per input channel k of each smoothed tensor X (max over the calibration data, padding counted as the
calibrators count it), with the weight range over every MatMul that reads X. alpha = 0 leaves activations as
they are; 1 moves their whole range into the weights. Channels that never fire (max |X_k| = 0) or have no weight
keep s_k = 1; s is clipped to [1e-4, 1e4].

Pipeline: `[calibration] smoothquant = "none" | "layernorm" | "all"` and `smoothquant_alpha` (pipeline.calibration):
when on, every PTQ calibrator calibrates and places on the smoothed FP32 graph (a run's source of those
methods), while the FP32 reference stays the original graph.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx

from core.errors import WorkbenchError
from graph.analysis import prepare_model
from graph.smooth import smooth_model, smoothing_groups, weight_row_amax

from .collect import observer_session

S_MIN, S_MAX = 1e-4, 1e4


def channel_amax(model: onnx.ModelProto, tensors: list[str], feeds: Iterable[Mapping]) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |x| of each of `tensors` over `feeds`, one ONNX Runtime pass of `model`
    (calibration's observer session, quant.collect)."""
    sess = observer_session(model, tensors, optimize=False)
    inputs = {i.name for i in sess.get_inputs()}
    amax: dict[str, np.ndarray] = {}
    n = 0
    for feed in feeds:
        n += 1
        for t, v in zip(tensors, sess.run(tensors, {k: v for k, v in feed.items() if k in inputs})):
            v = np.abs(np.asarray(v, np.float32))
            c = v.reshape(-1, v.shape[-1]).max(axis=0) if v.size else np.zeros(v.shape[-1], np.float32)
            if not np.all(np.isfinite(c)):
                raise WorkbenchError(f"smoothquant: tensor {t!r} has non-finite values on the calibration data")
            amax[t] = np.maximum(amax[t], c) if t in amax else c
    if not n:
        raise WorkbenchError("smoothquant: no calibration feeds")
    return amax


def smoothing_scales(act_amax: np.ndarray, w_amax: np.ndarray, alpha: float) -> np.ndarray:
    """s [K] from per-channel activation and weight ranges (module docstring)."""
    if not 0.0 <= alpha <= 1.0:
        raise WorkbenchError(f"smoothquant alpha must be in [0, 1], got {alpha!r}")
    a, w = np.asarray(act_amax, np.float64), np.asarray(w_amax, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = a ** alpha / w ** (1.0 - alpha)
    s = np.where((a > 0) & (w > 0) & np.isfinite(s), s, 1.0)
    return np.clip(s, S_MIN, S_MAX).astype(np.float32)


def smooth(model: str | Path | onnx.ModelProto, feeds: Iterable[Mapping], alpha: float = 0.5,
           targets: str = "all") -> tuple[onnx.ModelProto, dict]:
    """(smoothed model, report) for `model` on calibration `feeds`: scales from one FP32 pass, applied by
    graph.smooth.smooth_model. The report gives, per smoothed tensor, its range before and after (the largest
    channel against the median channel)."""
    m = prepare_model(model)  # a copy, every node named
    groups = smoothing_groups(m, targets)
    if not groups:
        return m, {"targets": targets, "alpha": alpha, "tensors": {}}
    amax = channel_amax(m, sorted(groups), feeds)
    scales, info = {}, {}
    for x, nodes in groups.items():
        s = smoothing_scales(amax[x], weight_row_amax(m, nodes), alpha)
        scales[x] = s
        after = amax[x] / s
        info[x] = {"nodes": [q.id for q in nodes], "amax": round(float(amax[x].max()), 4),
                   "amax_over_median": round(float(amax[x].max() / max(np.median(amax[x]), 1e-12)), 2),
                   "smoothed_amax_over_median": round(float(after.max() / max(np.median(after), 1e-12)), 2)}
    return smooth_model(m, scales, targets), {"targets": targets, "alpha": alpha, "tensors": info}
