"""Per-token activation scales for the onnxruntime recipe's int8 MatMuls (`ort_per_token_inputs`).

A calibrated per-tensor scale is one number for every token of every sentence; a transformer's FFN input (the GELU
output) and its LayerNorm outputs vary by an order of magnitude from token to token, so most tokens use a few of
the 256 levels. Per-token ("dynamic", as SmoothQuant's W8A8 O1-O3 and LLM.int8 do) computes each row's scale at run
time from that row's max |x| (measured on all-MiniLM-L6-v2: experiments/results/minilm_pertoken/).

ONNX Runtime's integer MatMuls take one activation scale (QLinearMatMul and MatMulIntegerToFloat a scalar a_scale,
DynamicQuantizeLinear is per tensor), and a Q/DQ pair with a computed scale is not fused into an integer kernel, so
the rewrite is written out, one quantization per int8 MatMul input (opset >= 13):

    x [.., K] -> Reshape [M, K] -> ReduceMax, ReduceMin over K -> amax = max(max, -min, floor) -> s = amax / 127 [M]
      -> QuantizeLinear(x2, s, 128 [M], axis=0)  (uint8, zero point 128: symmetric, the u8s8 kernels of every mode;
         ORT's s8s8 MatMulInteger was ~10x slower on x86)
    MatMulIntegerToFloat(xq, W int8 [K, N], 1, w_scale [N], 128, w_zero_point) -> * s [M, 1] -> Reshape [.., N]

MatMulIntegerToFloat is ONNX Runtime's com.microsoft op (what its own fusion makes of DQ -> MatMul); standard
MatMulInteger -> Cast -> Mul computes the same but ORT leaves it unfused (measured on MiniLM: Cast and Mul were 40 ms
of a 430 ms run). The node keeps the MatMul's name (the plan's node id), and every int8 MatMul reading one tensor
shares its quantization (query/key/value). The weights are the ones ORT's quantizer placed (`reduce_range` in
"u8s8-rr"). Not in the tensorrt recipe: TensorRT has no per-token INT8 activation quantization.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from core.errors import WorkbenchError

from .calib import AMAX_FLOOR, QMAX

MS_DOMAIN = "com.microsoft"
MIN_OPSET = 13  # per-axis QuantizeLinear, Unsqueeze/Slice with input axes


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def per_token_quantizer(idx, node: onnx.NodeProto):
    """(QuantizeLinear, scale tensor) of the per-token quantization feeding MatMulIntegerToFloat `node`, else None: what
    graph.validate recognises as the per-token form of an int8 MatMul."""
    if node.op_type != "MatMulIntegerToFloat" or node.domain != MS_DOMAIN:
        return None
    q = idx.producer.get(node.input[0])
    if q is None or q.op_type != "QuantizeLinear" or int(idx.attr(q, "axis", 1)) != 0:
        return None
    return q, q.input[1]


def qdq_matmul_parts(producer: dict, inits: dict, n: onnx.NodeProto):
    """(Q of x, DQ of x, DQ of the weight) of a MatMul in ORT's QDQ form, DQ(Q(x)) x DQ(int8 weight initializer),
    else None. The one matcher of that form for the rewrites that turn it into MatMulIntegerToFloat (here and
    graph.matmul_bias)."""
    a_dq, w_dq = producer.get(n.input[0]), producer.get(n.input[1])
    if a_dq is None or a_dq.op_type != "DequantizeLinear" or w_dq is None or w_dq.op_type != "DequantizeLinear":
        return None
    a_q = producer.get(a_dq.input[0])
    if a_q is None or a_q.op_type != "QuantizeLinear" or w_dq.input[0] not in inits:
        return None
    return a_q, a_dq, w_dq


def remove_bypassed(model: onnx.ModelProto, names: set[str], pending: list[onnx.NodeProto] = ()) -> None:
    """Remove the nodes of `names` (Q/DQ a rewrite bypassed) whose outputs nothing reads any more, a DQ before the Q
    it reads (`pending`: nodes about to be added, whose inputs count as read); then declare ORT's domain, which the
    rewrites' MatMulIntegerToFloat needs."""
    g = model.graph
    for op in ("DequantizeLinear", "QuantizeLinear"):
        used = {i for m in list(g.node) + list(pending) for i in m.input} | {o.name for o in g.output}
        for m in [m for m in g.node if m.name in names and m.op_type == op and m.output[0] not in used]:
            g.node.remove(m)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def apply_per_token(model: onnx.ModelProto, node_ids: set[str]) -> int:
    """Rewrite each int8 MatMul of `node_ids` (ORT's QDQ form: DQ(Q(x)) and DQ(int8 weight) -> MatMul) to the
    per-token form above, in place. Returns the number rewritten."""
    if not node_ids:
        return 0
    opset = _opset(model)
    if opset < MIN_OPSET:
        raise WorkbenchError(f"per-token activation scales need opset >= {MIN_OPSET} (per-axis QuantizeLinear); "
                             f"the model has opset {opset}")
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name: i for i in g.initializer}
    new_inits: list[onnx.TensorProto] = []
    added: list[onnx.NodeProto] = []
    shared: dict[str, tuple[str, str, str, str]] = {}

    def const(name: str, value) -> str:
        if name not in inits:
            t = numpy_helper.from_array(np.asarray(value), name)
            inits[name] = t
            new_inits.append(t)
        return name

    def node(op, ins, outs, name, **attrs):
        added.append(helper.make_node(op, ins, outs, name=name, **attrs))
        return outs[0]

    def reduce(op: str, x: str, name: str) -> str:
        if opset >= 18:
            return node(op, [x, const("per_token_axis1", np.array([1], np.int64))], [name], name, keepdims=0)
        return node(op, [x], [name], name, axes=[1], keepdims=0)

    def quantized(x: str, k: int) -> tuple[str, str, str, str]:
        """(uint8 rows [M, K], scale column [M, 1], the shape of x without its last axis, zero point) of `x`."""
        if x in shared:
            return shared[x]
        b = f"{x}_per_token"
        x2 = node("Reshape", [x, const(f"per_token_shape_k{k}", np.array([-1, k], np.int64))], [f"{b}_rows"],
                  f"{b}_Reshape")
        hi, lo = reduce("ReduceMax", x2, f"{b}_max"), reduce("ReduceMin", x2, f"{b}_min")
        neg = node("Neg", [lo], [f"{b}_neg_min"], f"{b}_Neg")
        amax = node("Max", [hi, neg, const("per_token_floor", np.float32(AMAX_FLOOR))], [f"{b}_amax"], f"{b}_Max")
        scale = node("Mul", [amax, const("per_token_inv_qmax", np.float32(1.0 / QMAX))], [f"{b}_scale"],
                     f"{b}_Scale")
        zp = node("ConstantOfShape", [node("Shape", [scale], [f"{b}_rows_shape"], f"{b}_Shape")], [f"{b}_zero_point"],
                  f"{b}_ZeroPoint", value=helper.make_tensor("v", TensorProto.UINT8, [1], [128]))
        xq = node("QuantizeLinear", [x2, scale, zp], [f"{b}_quantized"], f"{b}_QuantizeLinear", axis=0)
        col = node("Unsqueeze", [scale, const("per_token_axis1", np.array([1], np.int64))], [f"{b}_scale_col"],
                   f"{b}_Unsqueeze")
        lead = node("Slice", [node("Shape", [x], [f"{b}_shape"], f"{b}_InputShape"),
                              const("per_token_zero", np.array([0], np.int64)),
                              const("per_token_minus1", np.array([-1], np.int64))], [f"{b}_lead"], f"{b}_Lead")
        shared[x] = (xq, col, lead, const("per_token_zp", np.uint8(128)))
        return shared[x]

    done = 0
    dead: set[str] = set()
    for n in list(g.node):
        if n.name not in node_ids:
            continue
        if n.op_type != "MatMul":
            raise WorkbenchError(f"per-token scales: node {n.name!r} is {n.op_type}, not a MatMul")
        parts = qdq_matmul_parts(producer, inits, n)
        if parts is None:
            raise WorkbenchError(f"per-token scales: int8 MatMul {n.name!r} is not in ORT's QDQ form "
                                 "(DQ(Q(x)) x DQ(int8 weight))")
        a_q, a_dq, w_dq = parts
        w = numpy_helper.to_array(inits[w_dq.input[0]])
        if w.ndim != 2 or w.dtype != np.int8:
            raise WorkbenchError(f"per-token scales: MatMul {n.name!r} weight is {w.dtype} {w.shape}, not int8 [K, N]")
        k, cols = w.shape
        xq, col, lead, zp = quantized(a_q.input[0], k)
        b = f"{n.name}_per_token"
        yi = f"{b}_unscaled"
        w_zp = w_dq.input[2] if len(w_dq.input) > 2 and w_dq.input[2] else const("per_token_w_zp", np.int8(0))
        added.append(helper.make_node("MatMulIntegerToFloat", [xq, w_dq.input[0], const("per_token_one", np.float32(1)),
                                                               w_dq.input[1], zp, w_zp], [yi], name=n.name,
                                      domain=MS_DOMAIN))
        ys = node("Mul", [yi, col], [f"{b}_scaled"], f"{b}_RowScale")
        shape = node("Concat", [lead, const(f"per_token_cols{cols}", np.array([cols], np.int64))], [f"{b}_out_shape"],
                     f"{b}_OutShape", axis=0)
        node("Reshape", [ys, shape], [n.output[0]], f"{b}_Reshape")
        g.node.remove(n)
        dead.update((a_dq.name, a_q.name, w_dq.name))
        done += 1
    if done:
        remove_bypassed(model, dead, added)  # the static Q/DQ the rewrite replaced, where nothing else reads them
    g.node.extend(added)
    g.initializer.extend(new_inits)
    return done
