"""Per-output-channel weight ranges, read from the initializers directly (no data needed).

The channel axis is that of the consuming op (`graph.analysis.QuantNode.weight_axis`): Conv W [Cout, Cin/g, k..]
axis 0; MatMul x @ W with W [K, N] axis 1 (output columns; the last axis for batched W); Gemm B axis 1, or 0 with
transB=1. amax is max |w| over every other axis, floored at `quant.methods.AMAX_FLOOR` (an all-zero channel still
gets a usable scale). `method="mse"` picks, per channel, the amax among 100 candidates in (0, max] that minimises
the squared error of symmetric fake quantisation of that channel (a plain search, not pytorch-quantization's).
"""
from __future__ import annotations

import numpy as np
import onnx

from graph.analysis import Analysis, GraphIndex, load_model
from graph.calib import AMAX_FLOOR, channel_amax
from core.errors import WorkbenchError


def per_channel_amax(w: np.ndarray, axis: int, method: str = "max", num_bits: int = 8) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    if w.ndim == 0:
        w = w.reshape(1)
        axis = 0
    axis = axis % w.ndim
    if not np.isfinite(w).all():
        raise ValueError("non-finite weight")
    if method == "max":
        return channel_amax(w, axis)  # the same range placement takes when a table has none
    flat = np.moveaxis(np.abs(w), axis, 0).reshape(w.shape[axis], -1)
    amax = flat.max(axis=1)
    if method == "mse":
        qmax = float((1 << (num_bits - 1)) - 1)
        best = amax.copy()
        for c in range(flat.shape[0]):
            if amax[c] == 0:
                continue
            cands = amax[c] * np.linspace(0.3, 1.0, 100)
            s = qmax / cands[:, None]
            err = ((np.clip(np.round(flat[c][None] * s), -qmax, qmax) / s - flat[c][None]) ** 2).sum(axis=1)
            best[c] = cands[int(np.argmin(err))]
        amax = best
    else:
        raise WorkbenchError(f"unknown weight calibration method {method!r}: choose max or mse")
    return np.maximum(amax, AMAX_FLOOR)


def weight_ranges(model: str | onnx.ModelProto, analysis: Analysis, method: str = "max") -> dict[str, dict]:
    """{weight source: {"axis": int, "amax": [per-channel floats], "method": str, "node": str}} for each weighted
    quantizable node. Keyed by the initializer (or Constant) the weight is computed from, with the axis and
    values of the tensor the node reads (after any Identity/Transpose/Cast), which is what placement looks up."""
    m = load_model(model)
    idx = GraphIndex(m)
    out: dict[str, dict] = {}
    for q in analysis.quantizable:
        if q.weight is None or q.weight_source in out:
            continue
        resolved = idx.resolve_weight(q.weight)
        if resolved is None:
            raise WorkbenchError(f"node {q.id!r}: weight {q.weight!r} is not constant")
        w = resolved[2]
        try:
            amax = per_channel_amax(w, q.weight_axis, method)
        except ValueError:
            raise WorkbenchError(f"weight {q.weight_source!r} (of node {q.id!r}) has NaN or Inf values") from None
        out[q.weight_source] = {"axis": int(q.weight_axis % max(w.ndim, 1)), "node": q.id, "method": method,
                                "amax": [float(a) for a in amax]}
    return out
