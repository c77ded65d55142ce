"""The bias Add of the onnxruntime recipe's float-output int8 MatMuls, folded into the integer GEMM.

An int8 MatMul with a float output (`ort_float_outputs`) is, in ORT's QDQ form, DQ(Q(x)) x DQ(W int8) -> MatMul,
and a Linear layer's bias follows as an Add. ONNX Runtime's graph optimizer turns the DQ -> MatMul part into its
com.microsoft MatMulIntegerToFloat but leaves the Add a separate pass over the output (measured on
all-MiniLM-L6-v2: 24 of 36 such MatMuls followed by an unfused Add; its fusions only pull the bias into BiasGelu
and SkipLayerNormalization where those patterns follow). MatMulIntegerToFloat takes the bias itself, added in
the GEMM's output step (MLAS's scale-and-bias output processor), so the rewrite writes that node directly:

    Q(x) [static scale s_a] -> MatMulIntegerToFloat(xq, W, s_a, w_scale, zp_a, zp_w, bias) -> (the Add's output)

Same arithmetic as the fused form ORT makes, bias in FP32 after the scaled integer product. The node keeps the
MatMul's name (the plan's node id). Only for static (calibrated) inputs: with per-token inputs (graph.per_token)
the row scale multiplies the product after the GEMM, so the bias must come after it and stays an Add.
"""
from __future__ import annotations

import onnx
from onnx import helper

from .per_token import MS_DOMAIN, qdq_matmul_parts, remove_bypassed


def static_quantizer(idx, node: onnx.NodeProto):
    """The QuantizeLinear with one constant scale feeding MatMulIntegerToFloat `node` as its A input, with that
    scale as `node`'s a_scale, else None: what graph.validate recognises as this rewrite's form."""
    if node.op_type != "MatMulIntegerToFloat" or node.domain != MS_DOMAIN:
        return None
    q = idx.producer.get(node.input[0])
    if q is None or q.op_type != "QuantizeLinear":
        return None
    scale, a_scale = idx.const_value(q.input[1]), idx.const_value(node.input[2])
    if scale is None or a_scale is None or scale.size != 1 or a_scale.size != 1 or scale.item() != a_scale.item():
        return None
    return q


def fold_bias(model: onnx.ModelProto, node_ids: set[str]) -> int:
    """Rewrite each MatMul of `node_ids` (float output, static input Q/DQ, ORT's QDQ form) whose output only feeds
    an Add of a constant 1-D bias of its width into one MatMulIntegerToFloat with that bias, in place. A MatMul
    without such an Add is left to ORT's own fusion. Returns the number rewritten."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    inits = {i.name: i for i in g.initializer}
    outputs = {o.name for o in g.output}
    dead: set[str] = set()
    done = 0
    for n in [n for n in g.node if n.name in node_ids and n.op_type == "MatMul"]:
        parts = qdq_matmul_parts(producer, inits, n)
        if parts is None:
            continue
        _, a_dq, w_dq = parts
        add = readers.get(n.output[0], [])
        if len(add) != 1 or add[0].op_type != "Add" or n.output[0] in outputs:
            continue
        add = add[0]
        bias = add.input[1] if add.input[0] == n.output[0] else add.input[0]
        w = inits[w_dq.input[0]]
        if bias not in inits or list(inits[bias].dims) != [w.dims[-1]] or len(w.dims) != 2:
            continue
        w_zp = w_dq.input[2] if len(w_dq.input) > 2 else ""
        a_zp = a_dq.input[2] if len(a_dq.input) > 2 else ""
        fused = helper.make_node("MatMulIntegerToFloat", [a_dq.input[0], w_dq.input[0], a_dq.input[1], w_dq.input[1],
                                                          a_zp, w_zp, bias], [add.output[0]], name=n.name,
                                 domain=MS_DOMAIN)
        g.node.insert(list(g.node).index(n), fused)  # where the MatMul was: its inputs are computed before it
        g.node.remove(n)
        g.node.remove(add)
        dead.update((a_dq.name, w_dq.name))
        done += 1
    if done:
        remove_bypassed(model, dead)  # the DQs the rewrite bypassed, where nothing else reads them
    return done
