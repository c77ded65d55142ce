"""SmoothQuant's graph transform (Xiao et al. 2023): move per-channel activation outliers into the weights.

For an activation tensor X [..., K] read by weighted MatMuls X @ W (W [K, N], constant), with per-channel scales
s [K] (quant.smooth computes them from calibration data):

    X @ W  =  (X * (1/s)) @ (diag(s) W)

`smooth_model` inserts one Mul(X, 1/s) -> X_smoothed, shared by every smoothed MatMul reading X, and scales their
weights' rows by s (a new initializer per weight). Exact in real arithmetic; in FP32 it changes the result only by
rounding (tests/test_smoothquant.py). Quantization then sees X_smoothed, whose channels are more alike, and
per-channel-quantized weights whose rows carry the outliers instead.

Why a Mul and not the usual fold into the preceding LayerNorm's gamma/beta: in a post-LN encoder (BERT, MiniLM)
a LayerNorm's output is also the next residual branch (x + Attention(x), x + FFN(x)), so scaling gamma/beta by
1/s would scale the residual stream too, and the next LayerNorm is not invariant to per-channel scales: the fold
is not exact there. (A GELU output cannot be folded into anything before it either.) The Mul is one elementwise
pass per smoothed tensor; the nodes that read X for anything else (the residual Add, an FP32 fallback of another
consumer) still read X unchanged.

Written here rather than taken from a library: ONNX Runtime's SmoothQuant (`quantize_static(...,
extra_options={"SmoothQuant": True})`) needs Intel Neural Compressor and smooths inside its own quantizer, so its
scales could not be shared by this workbench's calibrators, recipes and plans; NVIDIA ModelOpt's works on torch
modules, not on an ONNX graph.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from core.errors import WorkbenchError

from .analysis import Analysis, GraphIndex, QuantNode, analyze
from .fp16 import toposort
from .placement import prune_weight_paths

SUFFIX = "_smoothed"
TARGETS = ("none", "layernorm", "all")  # which activation tensors are smoothed (smoothing_groups)


def _smoothable(q: QuantNode) -> bool:
    """A MatMul X @ W with a constant 2-D weight W [K, N] as its second input (the output channels on axis 1)."""
    return (q.op == "MatMul" and q.kind == "linear" and q.weight is not None and q.weight_input_index == 1
            and q.weight_axis == 1 and q.weight_shape is not None and len(q.weight_shape) == 2
            and len(q.act_inputs) == 1)


def smoothing_groups(model: onnx.ModelProto, targets: str = "all",
                     analysis: Analysis | None = None) -> dict[str, list[QuantNode]]:
    """{activation tensor: the MatMuls that read it and would be smoothed with it}. `targets`: "layernorm" (only
    tensors a LayerNorm produces: the QKV and FFN-input projections' inputs of a transformer), "all" (every
    smoothable MatMul's input: also the attention context and the FFN's activation output), "none"."""
    if targets not in TARGETS:
        raise WorkbenchError(f"unknown smoothquant targets {targets!r}: use one of {', '.join(TARGETS)}")
    if targets == "none":
        return {}
    analysis = analysis or analyze(model)
    idx = GraphIndex(model)
    ln_out = set()
    for p in analysis.patterns_of("layernorm"):
        last = next(n for n in model.graph.node if n.name == p.nodes[-1])
        ln_out.add(last.output[0])
    groups: dict[str, list[QuantNode]] = {}
    for q in analysis.quantizable:
        if not _smoothable(q):
            continue
        x = q.act_inputs[0]
        if targets == "layernorm" and x not in ln_out:
            continue
        if idx.const_value(x) is not None:
            continue
        groups.setdefault(x, []).append(q)
    return groups


def weight_row_amax(model: onnx.ModelProto, nodes: list[QuantNode]) -> np.ndarray:
    """max |W[k, :]| over the weights of `nodes` (which read one tensor): the per-input-channel weight range."""
    idx = GraphIndex(model)
    rows = []
    for q in nodes:
        _, _, w = idx.resolve_weight(q.weight)
        rows.append(np.abs(np.asarray(w, np.float64)).max(axis=1))
    return np.max(rows, axis=0)


def smooth_model(model: onnx.ModelProto, scales: Mapping[str, np.ndarray], targets: str = "all") -> onnx.ModelProto:
    """A copy of `model` with each tensor of `scales` ({tensor: s [K]}, from quant.smooth) smoothed for the
    MatMuls of `smoothing_groups(model, targets)` that read it. Node names, the quantizable structure (and so
    plans and the structure fingerprint) and the graph's inputs/outputs are unchanged."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    groups = smoothing_groups(m, targets)
    unknown = set(scales) - set(groups)
    if unknown:
        raise WorkbenchError(f"smoothquant scales given for {sorted(unknown)[0]!r}, which no smoothable MatMul reads")
    idx = GraphIndex(m)
    by_name = {n.name: n for n in m.graph.node}
    names = {i.name for i in m.graph.initializer} | {o for n in m.graph.node for o in n.output}
    new_nodes = []
    for x, s in scales.items():
        s = np.asarray(s, np.float32)
        nodes = groups[x]
        k = nodes[0].weight_shape[0]
        if s.shape != (k,) or not np.all(np.isfinite(s)) or np.any(s <= 0):
            raise WorkbenchError(f"smoothquant scales of {x!r}: need {k} finite positive values, got shape "
                                 f"{s.shape}")
        out = f"{x}{SUFFIX}"
        if out in names:
            raise WorkbenchError(f"tensor {x!r} is smoothed already ({out!r} exists)")
        inv = numpy_helper.from_array((1.0 / s).astype(np.float32), f"{x}_smooth_inv")
        m.graph.initializer.append(inv)
        new_nodes.append(helper.make_node("Mul", [x, inv.name], [out], name=f"{x}_SmoothQuant"))
        for q in nodes:
            _, _, w = idx.resolve_weight(q.weight)
            ws = numpy_helper.from_array((np.asarray(w, np.float32) * s[:, None]).astype(np.float32),
                                         f"{q.weight}{SUFFIX}")
            m.graph.initializer.append(ws)
            n = by_name[q.id]
            n.input[0 if n.input[0] == x else list(n.input).index(x)] = out
            n.input[q.weight_input_index] = ws.name
    ordered = toposort(list(m.graph.node) + new_nodes, m.graph)
    del m.graph.node[:]
    m.graph.node.extend(ordered)
    prune_weight_paths(m.graph)  # the unsmoothed weights (and their Transposes) nothing reads
    return m
