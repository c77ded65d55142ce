"""Check a quantized model against its recipe's constraints; every problem names the node.

Checked (recipe "tensorrt"; our checks, compared with TensorRT-RTX's parser and builder in tests/test_rtx.py):
  * every QuantizeLinear/DequantizeLinear: scale finite and > 0; zero point int8 and all zero;
    per-channel (non-scalar) scale is 1-D with the length of the quantized tensor along `axis`;
    an INT8 initializer behind a DQ lies in [-128, 127] (always true for int8, checked for the dtype);
  * every int8 node of the plan reads each activation input and its weight through a DequantizeLinear,
    the weight's per-channel on the expected axis;
  * fp32/fp16 nodes read no DequantizeLinear output, except a *shared* one (a DQ output that also feeds an
    int8 node or a residual Add of the plan; our placement never produces that, a foreign tool may);
  * no LayerNorm reads a DequantizeLinear output (TensorRT accepts one; our placement keeps LayerNorm float);
  * fp16 nodes compute in FP16 (their output is FLOAT16) and fp32/int8 nodes and LayerNorm in FP32; type
    inference (onnx full check) passes, so every FP32/FP16 boundary goes through a Cast;
  * graph inputs/outputs: same names and element types as the original.
Recipe "onnxruntime": the same, except that activation zero points may be 128 (uint8 activations),
outputs of int8 nodes (LayerNorm inputs among them) may be quantized (ORT needs them for QLinear kernels), and
Conv biases may be int32 behind a DequantizeLinear (ORT's quantizer; zero point 0, scale = input x weight scale),
and an int8 MatMul may be ONNX Runtime's MatMulIntegerToFloat of that name with an INT8 weight initializer, reading
either a QuantizeLinear with a computed per-row scale (axis 0; the per-token form, graph.per_token) or one with
the constant scale that is its a_scale (its bias folded in, graph.matmul_bias).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from core.errors import WorkbenchError

from .analysis import GraphIndex, analyze, load_model
from .matmul_bias import static_quantizer
from .per_token import per_token_quantizer


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inf = onnx.shape_inference.infer_shapes(model)
    ty = {vi.name: vi.type.tensor_type.elem_type for vi in
          list(inf.graph.value_info) + list(inf.graph.input) + list(inf.graph.output)}
    for i in model.graph.initializer:
        ty[i.name] = i.data_type
    return ty


def validate(model, plan: dict, recipe: str = "tensorrt", original=None) -> list[str]:
    """Problems found (empty list: valid).  `model` and `original` are paths or ModelProtos."""
    model = load_model(model)
    problems: list[str] = []
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # noqa: BLE001
        return [f"model fails onnx.checker / type inference: {str(exc).splitlines()[0][:300]}"]
    idx = GraphIndex(model)
    ty = _types(model)
    nodes = plan["nodes"]
    by_name = {n.name: n for n in model.graph.node}

    per_token = {n.name: per_token_quantizer(idx, n) for n in model.graph.node if n.op_type == "MatMulIntegerToFloat"}
    if recipe == "tensorrt":
        problems += [f"node {k!r}: MatMulIntegerToFloat (ONNX Runtime's op: per-token scales, folded bias) is not "
                     "in the tensorrt recipe" for k in per_token]
    dynamic_q = {pt[0].name for pt in per_token.values() if pt is not None}

    # Q/DQ constraints
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or n.name in dynamic_q:
            continue
        scale = idx.const_value(n.input[1]) if len(n.input) > 1 else None
        zp = idx.const_value(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if scale is None:
            problems.append(f"{n.op_type} {n.name!r}: scale is not a constant")
            continue
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            problems.append(f"{n.op_type} {n.name!r}: scale must be finite and > 0 (min {np.min(scale):g})")
        if zp is None:
            problems.append(f"{n.op_type} {n.name!r}: zero point missing (the type would default to uint8)")
        else:
            if recipe == "tensorrt" and zp.dtype != np.int8:
                problems.append(f"{n.op_type} {n.name!r}: zero point type {zp.dtype} is not int8")
            elif zp.dtype not in (np.int8, np.uint8, np.int32) or (zp.dtype == np.int32 and n.op_type != "DequantizeLinear"):
                problems.append(f"{n.op_type} {n.name!r}: zero point type {zp.dtype} is not int8/uint8 "
                                f"(int32: ORT's quantized bias DQ only)")
            allowed = {0} if (recipe == "tensorrt" or zp.dtype != np.uint8) else {128}
            if not set(np.unique(zp).tolist()) <= allowed:
                problems.append(f"{n.op_type} {n.name!r}: zero point must be {sorted(allowed)} (symmetric)")
            if zp.shape != scale.shape:
                problems.append(f"{n.op_type} {n.name!r}: zero point shape {zp.shape} != scale shape {scale.shape}")
        data = idx.const_value(n.input[0])  # the quantized constant (a weight), else None
        if scale.size > 1 or scale.ndim > 0:
            axis = int(idx.attr(n, "axis", 1))
            if scale.ndim != 1:
                problems.append(f"{n.op_type} {n.name!r}: per-channel scale must be 1-D, is {scale.shape}")
            elif data is not None and (axis >= data.ndim or data.shape[axis] != scale.shape[0]):
                problems.append(f"{n.op_type} {n.name!r}: per-channel scale length {scale.shape[0]} does not "
                                f"match axis {axis} of {data.shape}")
        if n.op_type == "DequantizeLinear":
            ok = (np.int8, np.uint8) if recipe == "tensorrt" else (np.int8, np.uint8, np.int32)
            if data is not None and data.dtype not in ok:
                problems.append(f"DequantizeLinear {n.name!r}: weight dtype {data.dtype} is not int8")

    def via_dq(t: str) -> onnx.NodeProto | None:
        p = idx.producer.get(t)
        return p if p is not None and p.op_type == "DequantizeLinear" else None

    # plan conformance
    now = analyze(_dequantized_view(model))
    qn = {q.id: q for q in now.quantizable}
    residual_adds = {p.nodes[0] for p in now.patterns_of("residual_add")}
    for nid, prec in nodes.items():
        n = by_name.get(nid)
        if n is None:
            problems.append(f"plan node {nid!r} is missing from the model")
            continue
        q = qn.get(nid)
        if prec == "int8" and recipe == "onnxruntime" and n.op_type == "MatMulIntegerToFloat":
            w = idx.const_value(n.input[1])
            if per_token.get(nid) is None and static_quantizer(idx, n) is None:
                problems.append(f"int8 node {nid!r}: MatMulIntegerToFloat input A is neither a per-row QuantizeLinear "
                                "(axis 0) nor one whose constant scale is its a_scale")
            if w is None or w.dtype != np.int8 or w.ndim != 2:
                problems.append(f"int8 node {nid!r}: MatMulIntegerToFloat weight is not an INT8 [K, N] initializer")
            continue
        if prec == "int8":
            if q is None:
                problems.append(f"node {nid!r} is int8 in the plan but not recognisable as quantizable")
                continue
            for t in q.act_inputs:
                if via_dq(t) is None:
                    problems.append(f"int8 node {nid!r}: activation input {t!r} does not come from DequantizeLinear")
            if q.weight is not None:
                dq = via_dq(n.input[q.weight_input_index])
                if dq is None:
                    problems.append(f"int8 node {nid!r}: weight {n.input[q.weight_input_index]!r} does not come "
                                    f"from DequantizeLinear")
                else:
                    s = idx.const_value(dq.input[1])
                    if s is None or s.ndim != 1 or int(idx.attr(dq, "axis", 1)) != q.weight_axis:
                        problems.append(f"int8 node {nid!r}: weight DequantizeLinear {dq.name!r} is not "
                                        f"per-channel on axis {q.weight_axis}")
        else:
            for t in n.input:
                dq = via_dq(t) if t else None
                if dq is None:
                    continue
                shared = any(c.name in residual_adds or nodes.get(c.name) == "int8"
                             for c in idx.consumers.get(t, []))
                if recipe == "onnxruntime":  # ORT quantizes int8 nodes' outputs: Q <- int8 node
                    qn_ = idx.producer.get(dq.input[0])
                    src = idx.producer.get(qn_.input[0]) if qn_ is not None and qn_.op_type == "QuantizeLinear" else None
                    shared = shared or (src is not None and nodes.get(src.name) == "int8")
                if not shared:
                    problems.append(f"{prec} node {nid!r}: input {t!r} comes from DequantizeLinear "
                                    f"{dq.name!r}")
            want = TensorProto.FLOAT16 if prec == "fp16" else TensorProto.FLOAT
            got = ty.get(n.output[0])
            if got != want:
                problems.append(f"{prec} node {nid!r}: output type {TensorProto.DataType.Name(got or 0)}, "
                                f"expected {TensorProto.DataType.Name(want)}")
    if recipe == "tensorrt":  # LayerNorm stays float: TensorRT may take a Q/DQ there, our rules place none
        for p in now.patterns_of("layernorm"):
            for t in {t for name in p.nodes for t in by_name[name].input if t and via_dq(t) is not None}:
                problems.append(f"LayerNorm {p.id!r} reads DequantizeLinear {via_dq(t).name!r} (input {t!r}): "
                                "the tensorrt recipe quantizes no LayerNorm input")
    if "fp16" in nodes.values():
        for p in now.patterns_of("layernorm"):
            for name in p.nodes:
                n = by_name[name]
                if ty.get(n.output[0]) != TensorProto.FLOAT:
                    problems.append(f"LayerNorm node {name!r} is not FP32 in an FP16 graph")
    if original is not None:
        orig = load_model(original)

        def sig(vs):
            return [(v.name, v.type.tensor_type.elem_type) for v in vs]
        if sig(orig.graph.input) != sig(model.graph.input):
            problems.append(f"graph inputs changed: {sig(orig.graph.input)} -> {sig(model.graph.input)}")
        if sig(orig.graph.output) != sig(model.graph.output):
            problems.append(f"graph outputs changed: {sig(orig.graph.output)} -> {sig(model.graph.output)}")
    return problems


def _dequantized_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where each weight DQ of an INT8 initializer reads a float initializer instead, so that the
    analysis recognises the weighted nodes (and their kinds/axes) of a quantized model."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    idx = GraphIndex(m)
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in idx.inits:
            n.op_type = "Identity"
            del n.input[1:]
            del n.attribute[:]
    return m


def check_or_raise(model, plan: dict, recipe: str = "tensorrt", original=None) -> None:
    problems = validate(model, plan, recipe, original)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise WorkbenchError(f"quantized model does not satisfy the {recipe} recipe: {problems[0]}{more}")
