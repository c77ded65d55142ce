"""Which tensors `wb calibrate` calibrates on an arbitrary ONNX model.

`quantizable_activation_inputs(model)` lists the activation input of every Conv, MatMul and Gemm whose other
operand is a constant (an initializer, or a Constant node's output, possibly through Identity nodes), with that
weight's name and per-output-channel axis; `include_activation_matmuls=True` adds both inputs of MatMuls between
two activations (attention's QK^T and PV).  This overlaps `graph.analysis` (which the pipeline and placement use)
but its rules are wider (a constant *first* MatMul operand counts), and `wb calibrate`'s table covers them; the
two should become one classifier (known follow-up).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from graph.analysis import load_model
from workbench.errors import WorkbenchError

QUANTIZABLE_OPS = ("Conv", "MatMul", "Gemm")


@dataclass(frozen=True)
class QuantInput:
    tensor: str            # the activation tensor to calibrate
    node: str              # consuming node's name
    op_type: str
    weight: str | None     # constant operand (initializer / Constant output name), None for activation x activation
    weight_axis: int | None  # per-output-channel axis of the weight


def constant_tensors(model: onnx.ModelProto) -> dict[str, np.ndarray | None]:
    """Names of constant tensors -> array (initializers, Constant outputs, Identity of either).
    Arrays are loaded lazily: the value is None here; use `constant_value` to get it."""
    g = model.graph
    names: dict[str, np.ndarray | None] = {i.name: None for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            names[n.output[0]] = None
    changed = True
    while changed:  # Identity chains of constants
        changed = False
        for n in g.node:
            if n.op_type == "Identity" and n.input and n.input[0] in names and n.output[0] not in names:
                names[n.output[0]] = None
                changed = True
    return names


def constant_value(model: onnx.ModelProto, name: str) -> np.ndarray:
    g = model.graph
    for i in g.initializer:
        if i.name == name:
            return numpy_helper.to_array(i)
    for n in g.node:
        if n.op_type == "Constant" and n.output[0] == name:
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
            raise WorkbenchError(f"Constant node {n.name!r} has no tensor 'value' attribute")
        if n.op_type == "Identity" and n.output[0] == name:
            return constant_value(model, n.input[0])
    raise WorkbenchError(f"constant tensor {name!r} not found in the model")


def _rank(model: onnx.ModelProto, name: str) -> int | None:
    for i in model.graph.initializer:
        if i.name == name:
            return len(i.dims)
    return None


def quantizable_activation_inputs(model: str | onnx.ModelProto, include_activation_matmuls: bool = False,
                                  ops: tuple[str, ...] = QUANTIZABLE_OPS) -> list[QuantInput]:
    """Activation inputs of Conv/MatMul/Gemm nodes with a constant weight, in graph order (one entry per node)."""
    m = load_model(model, load_external_data=False)
    consts = constant_tensors(m)
    out: list[QuantInput] = []
    for n in m.graph.node:
        if n.op_type not in ops or len(n.input) < 2:
            continue
        a, b = n.input[0], n.input[1]
        if n.op_type == "Conv":
            if b in consts and a not in consts:
                out.append(QuantInput(a, n.name, n.op_type, b, 0))  # W [Cout, Cin/g, k...]
        elif n.op_type == "Gemm":
            trans_b = next((at.i for at in n.attribute if at.name == "transB"), 0)
            if b in consts and a not in consts:
                out.append(QuantInput(a, n.name, n.op_type, b, 0 if trans_b else 1))
        else:  # MatMul
            if b in consts and a not in consts:
                rank = _rank(m, b)
                out.append(QuantInput(a, n.name, n.op_type, b, (rank - 1) if rank else 1))  # W [.., K, N]: N
            elif a in consts and b not in consts:
                rank = _rank(m, a)
                out.append(QuantInput(b, n.name, n.op_type, a, (rank - 2) if rank and rank >= 2 else 0))  # W [M, K]
            elif include_activation_matmuls and a not in consts and b not in consts:
                out.append(QuantInput(a, n.name, n.op_type, None, None))
                out.append(QuantInput(b, n.name, n.op_type, None, None))
    return out


def activation_tensor_names(inputs: list[QuantInput]) -> list[str]:
    """Unique tensor names in first-seen order (one tensor often feeds several nodes, e.g. Q, K and V)."""
    return list(dict.fromkeys(q.tensor for q in inputs))
