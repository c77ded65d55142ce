"""Find the quantizable nodes of an ONNX model and the patterns that Q/DQ placement must respect.

Everything returned is plain data (dataclasses of str/int/list) so that plans, recipes and reports can be
written as JSON.  Node identifiers are the node names, which the PyTorch exporter derives from module paths
(`/encoder/encoders.0/feed_forward/w_1/MatMul`) and which therefore survive re-export; nodes without a name
get a deterministic one, `<op>_<index of that op type in topological order>` (see `assign_node_names`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from core.errors import WorkbenchError

WEIGHTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (`axis`) needs opset 13
# Ops a constant weight may sit behind (TensorRT constant-folds them; so do we when quantizing the weight).
WEIGHT_PASSTHROUGH = ("Identity", "Transpose", "Cast")
LAYERNORM_CHAIN = ("ReduceMean", "Sub", "Pow", "ReduceMean", "Add", "Sqrt", "Div", "Mul", "Add")


@dataclass
class QuantNode:
    """One quantizable node.  `act_inputs` are the activation inputs to quantize per-tensor (one for a
    weighted op, two for an activation MatMul); `weight` is the tensor that feeds the node's weight input,
    `weight_source` the initializer/Constant it is computed from (equal to `weight` unless behind
    Identity/Transpose/Cast), `weight_axis` the output-channel axis of `weight` for per-channel scales."""
    id: str
    op: str
    kind: str  # conv | depthwise_conv | conv_transpose | linear (MatMul/Gemm with constant weight) | act_matmul
    act_inputs: list[str]
    weight: str | None = None
    weight_input_index: int | None = None
    weight_source: str | None = None
    weight_axis: int | None = None
    weight_shape: list[int] | None = None
    patterns: list[str] = field(default_factory=list)  # ids of patterns this node feeds or belongs to
    output: str | None = None  # the node's (first) output tensor


@dataclass
class Pattern:
    """A recognised subgraph: kind is layernorm | softmax | residual_add | glu | silu."""
    id: str
    kind: str
    nodes: list[str]
    # residual_add only: the Add's input index and tensor of the residual branch, and the quantizable
    # node whose output reaches the other input (only through a bias Add / constant-scale Mul).
    residual_input: str | None = None
    residual_input_index: int | None = None
    gemm: str | None = None


@dataclass
class Analysis:
    opset: int
    quantizable: list[QuantNode]
    patterns: list[Pattern]
    fingerprint: str  # sha256 of the quantizable structure (see `structure_fingerprint`)

    def node(self, node_id: str) -> QuantNode:
        for q in self.quantizable:
            if q.id == node_id:
                return q
        raise KeyError(node_id)

    @property
    def ids(self) -> list[str]:
        return [q.id for q in self.quantizable]

    def patterns_of(self, kind: str) -> list[Pattern]:
        return [p for p in self.patterns if p.kind == kind]

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------- helpers
def load_model(model: str | Path | onnx.ModelProto, load_external_data: bool = True) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise WorkbenchError(f"model not found: {path}")
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types
        raise WorkbenchError(f"{path} is not a readable ONNX model: {exc}") from exc


def model_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def check_opset(model: onnx.ModelProto) -> int:
    opset = model_opset(model)
    if opset < MIN_OPSET:
        raise WorkbenchError(f"model opset {opset} is below {MIN_OPSET}: per-channel Q/DQ (QuantizeLinear/"
                             f"DequantizeLinear with `axis`) needs opset >= {MIN_OPSET}; re-export with --opset 13+")
    return opset


def assign_node_names(model: onnx.ModelProto) -> int:
    """Give every unnamed node (in place) the name `<op>_<k>` where k counts that op type in graph order
    (ONNX requires topological order), skipping names already taken.  Returns how many were named."""
    taken = {n.name for n in model.graph.node if n.name}
    counts: dict[str, int] = {}
    named = 0
    for n in model.graph.node:
        k = counts.get(n.op_type, 0)
        counts[n.op_type] = k + 1
        if n.name:
            continue
        name, j = f"{n.op_type}_{k}", k
        while name in taken:
            j += 1
            name = f"{n.op_type}_{k}_{j}"
        n.name = name
        taken.add(name)
        named += 1
    return named


def check_unique_names(model: onnx.ModelProto) -> None:
    seen: set[str] = set()
    for n in model.graph.node:
        if n.name in seen:
            raise WorkbenchError(f"node name {n.name!r} ({n.op_type}) occurs twice: node ids must be unique")
        seen.add(n.name)


class GraphIndex:
    """Producer/consumer maps and constant lookup for one graph."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.inits = {i.name: i for i in g.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for o in n.output:
                if o:
                    self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.graph_outputs = {o.name for o in g.output}
        self.graph_inputs = {i.name for i in g.input}

    def const_value(self, name: str) -> np.ndarray | None:
        """Value of an initializer or Constant-node output, else None."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        p = self.producer.get(name)
        if p is not None and p.op_type == "Constant":
            for a in p.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def is_const(self, name: str) -> bool:
        return self.const_value(name) is not None

    def resolve_weight(self, name: str) -> tuple[str, list[onnx.NodeProto], np.ndarray] | None:
        """Follow Identity/Transpose/Cast back to a constant.  Returns (source name, chain of nodes from
        source to `name`, value of `name` with the chain applied) or None if `name` is not constant."""
        chain: list[onnx.NodeProto] = []
        cur = name
        while True:
            v = self.const_value(cur)
            if v is not None:
                break
            p = self.producer.get(cur)
            if p is None or p.op_type not in WEIGHT_PASSTHROUGH or not p.input:
                return None
            chain.append(p)
            cur = p.input[0]
        chain.reverse()
        for node in chain:
            if node.op_type == "Transpose":
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                v = np.transpose(v, perm)
            elif node.op_type == "Cast":
                to = next(a.i for a in node.attribute if a.name == "to")
                v = v.astype(onnx.helper.tensor_dtype_to_np_dtype(to))
        return cur, chain, v

    def attr(self, node: onnx.NodeProto, name: str, default=None):
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default


# ------------------------------------------------------------------------------------------ analysis
def _classify(idx: GraphIndex, n: onnx.NodeProto, include_act_matmul: bool) -> QuantNode | None:
    op = n.op_type
    if op in ("Conv", "ConvTranspose"):
        if len(n.input) < 2:
            return None
        w = idx.resolve_weight(n.input[1])
        if w is None:
            return None  # dynamic Conv weights: not a placement we support
        src, _, val = w
        group = int(idx.attr(n, "group", 1))
        if op == "Conv":
            kind = "depthwise_conv" if group > 1 and group == val.shape[0] and val.shape[1] == 1 else "conv"
            axis = 0  # [O, I/g, k...]
        else:
            kind, axis = "conv_transpose", 1  # [I, O/g, k...]: output channels on axis 1 (TensorRT, ModelOpt)
        return QuantNode(n.name, op, kind, [n.input[0]], n.input[1], 1, src, axis, list(val.shape))
    if op == "Gemm":
        if int(idx.attr(n, "transA", 0)):
            return None
        w = idx.resolve_weight(n.input[1])
        if w is None or idx.is_const(n.input[0]):
            return None
        src, _, val = w
        axis = 0 if int(idx.attr(n, "transB", 0)) else 1  # B is [N,K] with transB, else [K,N]
        return QuantNode(n.name, op, "linear", [n.input[0]], n.input[1], 1, src, axis, list(val.shape))
    if op == "MatMul":
        a, b = n.input[0], n.input[1]
        wa, wb = idx.resolve_weight(a), idx.resolve_weight(b)
        if wb is not None and wa is None:
            src, _, val = wb
            if val.ndim < 2:
                return None
            return QuantNode(n.name, op, "linear", [a], b, 1, src, val.ndim - 1, list(val.shape))
        if wa is None and wb is None and include_act_matmul:
            return QuantNode(n.name, op, "act_matmul", [a, b])
    return None


def _layernorm_patterns(idx: GraphIndex) -> list[Pattern]:
    out = []
    for n in idx.model.graph.node:
        if n.op_type == "LayerNormalization":
            out.append(Pattern(n.name, "layernorm", [n.name]))
            continue
        if n.op_type != "ReduceMean":
            continue
        # x -> ReduceMean -> Sub(x, mean) -> Pow(.,2) -> ReduceMean -> Add(eps) -> Sqrt -> Div(sub, sqrt)
        #   -> [Mul(gamma)] -> [Add(beta)]
        x = n.input[0]
        subs = [c for c in idx.consumers.get(n.output[0], []) if c.op_type == "Sub" and c.input[0] == x]
        if len(subs) != 1:
            continue
        sub = subs[0]
        nodes = [n, sub]
        pw = [c for c in idx.consumers.get(sub.output[0], []) if c.op_type == "Pow"]
        div = [c for c in idx.consumers.get(sub.output[0], []) if c.op_type == "Div"]
        if len(pw) != 1 or len(div) != 1:
            continue
        rm2 = [c for c in idx.consumers.get(pw[0].output[0], []) if c.op_type == "ReduceMean"]
        if len(rm2) != 1:
            continue
        add = [c for c in idx.consumers.get(rm2[0].output[0], []) if c.op_type == "Add"]
        if len(add) != 1:
            continue
        sq = [c for c in idx.consumers.get(add[0].output[0], []) if c.op_type == "Sqrt"]
        if len(sq) != 1 or div[0].input[1] != sq[0].output[0]:
            continue
        nodes += [pw[0], rm2[0], add[0], sq[0], div[0]]
        tail = div[0]
        for op in ("Mul", "Add"):
            nxt = idx.consumers.get(tail.output[0], [])
            if len(nxt) == 1 and nxt[0].op_type == op and any(idx.is_const(i) for i in nxt[0].input):
                tail = nxt[0]
                nodes.append(tail)
            else:
                break
        out.append(Pattern(f"layernorm:{tail.name}", "layernorm", [m.name for m in nodes]))
    return out


def _activation_patterns(idx: GraphIndex) -> list[Pattern]:
    out = []
    for n in idx.model.graph.node:
        if n.op_type in ("Softmax", "LogSoftmax"):
            out.append(Pattern(f"softmax:{n.name}", "softmax", [n.name]))
        if n.op_type == "Sigmoid":
            src = n.input[0]
            for m in idx.consumers.get(n.output[0], []):
                if m.op_type == "Mul" and set(m.input) == {src, n.output[0]}:
                    out.append(Pattern(f"silu:{m.name}", "silu", [n.name, m.name]))
                    continue
                if m.op_type != "Mul":
                    continue
                # GLU: Split(x) -> (a, b); Mul(a, Sigmoid(b))
                split = idx.producer.get(src)
                other = m.input[0] if m.input[1] == n.output[0] else m.input[1]
                if split is not None and split.op_type == "Split" and other in split.output:
                    out.append(Pattern(f"glu:{m.name}", "glu", [split.name, n.name, m.name]))
    return out


def _residual_patterns(idx: GraphIndex, qnodes: dict[str, QuantNode]) -> list[Pattern]:
    """Adds of two activations where one input is the output of a weighted op, directly or through a bias
    Add and/or a constant-scale Mul (TensorRT fuses GEMM/Conv + bias + scale + elementwise add); the other
    input is the residual branch.  A Transpose, Where, etc. in between breaks the fusion: not listed."""
    out = []
    for n in idx.model.graph.node:
        if n.op_type != "Add" or len(n.input) != 2 or any(idx.is_const(i) for i in n.input):
            continue
        for j in (0, 1):
            t = n.input[j]
            gemm = None
            for _ in range(3):
                p = idx.producer.get(t)
                if p is None:
                    break
                if p.name in qnodes and qnodes[p.name].kind != "act_matmul":
                    gemm = p.name
                    break
                if p.op_type in ("Add", "Mul") and len(idx.consumers.get(t, [])) == 1:
                    nonconst = [i for i in p.input if not idx.is_const(i)]
                    if len(nonconst) == 1:
                        t = nonconst[0]
                        continue
                break
            if gemm is not None:
                r = n.input[1 - j]
                out.append(Pattern(f"residual_add:{n.name}", "residual_add", [n.name], r, 1 - j, gemm))
                break
    return out


def structure_fingerprint(qnodes: Iterable[QuantNode], opset: int) -> str:
    """sha256 of the quantizable structure: opset and (id, op, kind, weight shape) of each node.  It is the
    same for a re-export or a re-training of one architecture and differs between models (encoder vs
    decoder, tiny vs small); it deliberately ignores weight values, which a plan does not depend on."""
    rows = [[q.id, q.op, q.kind, q.weight_shape] for q in qnodes]
    blob = json.dumps({"opset": opset, "nodes": rows}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def analyze(model: str | Path | onnx.ModelProto, include_act_matmul: bool = True) -> Analysis:
    """Quantizable nodes (Conv/ConvTranspose/Gemm/MatMul with a constant weight; MatMuls of two activations
    as kind "act_matmul" when `include_act_matmul`) and patterns (layernorm, softmax, residual_add, glu,
    silu).  A model object is analysed as is: call `assign_node_names` first if nodes may be unnamed
    (`prepare_model` does both)."""
    model = load_model(model)
    opset = check_opset(model)
    if any(not n.name for n in model.graph.node):
        model = onnx.ModelProto.FromString(model.SerializeToString())
        assign_node_names(model)
    check_unique_names(model)
    idx = GraphIndex(model)
    qnodes: dict[str, QuantNode] = {}
    for n in model.graph.node:
        q = _classify(idx, n, include_act_matmul)
        if q is not None:
            q.output = n.output[0]
            qnodes[q.id] = q
    patterns = _layernorm_patterns(idx) + _activation_patterns(idx) + _residual_patterns(idx, qnodes)
    # pattern membership: a node belongs to a pattern it is part of, or whose output it consumes
    by_name = {n.name: n for n in model.graph.node}
    for p in patterns:
        if p.kind == "residual_add" and p.gemm in qnodes:
            qnodes[p.gemm].patterns.append(p.id)
            continue
        outs = {o for name in p.nodes for o in by_name[name].output}
        for q in qnodes.values():
            if q.id in p.nodes or set(q.act_inputs) & outs:
                q.patterns.append(p.id)
    ql = list(qnodes.values())
    return Analysis(opset, ql, patterns, structure_fingerprint(ql, opset))


def prepare_model(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model with opset checked and every node named (deterministically)."""
    model = load_model(model)
    check_opset(model)
    model = onnx.ModelProto.FromString(model.SerializeToString())
    assign_node_names(model)
    check_unique_names(model)
    return model
