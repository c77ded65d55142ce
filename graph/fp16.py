"""FP16 typing of a graph for the plan's fp16 nodes, with keep-FP32 rules.

TensorRT 11 has no FP16 builder flag: FP16 compute comes only from an FP16-typed ONNX graph.  We type the
graph ourselves (`convert_fp16` below): each node outside the keep-FP32 block list computes in FP16, FP32
initializers used only by FP16 nodes are stored FP16, and a Cast is inserted at every FP32/FP16 boundary.

Why hand-written: the brief prefers a well-kept converter.  ModelOpt AutoCast (`modelopt.onnx.autocast`) does
not install here without breaking the project (`nvidia-modelopt[onnx]` pins onnx 1.21 and onnxruntime-gpu
1.24 over our onnx 1.23 / onnxruntime 1.32 CPU).  `onnxconverter_common.float16.convert_float_to_float16`
(1.16, keep_io_types=True, op_block_list, node_block_list) was tried on the WeNet encoder and produced
invalid models: a graph output also consumed inside the graph (encoder_out -> ctc_lo) got mixed
FP32/FP16 inputs, and shared initializers behind the exporter's Identity nodes were left FP32 while their
outputs were declared FP16 (ONNX Runtime: "Type (tensor(float16)) of output arg (encoder.after_norm.bias)
of node (Identity_134) does not match expected type"), even with value_info cleared.  The rules here are
the same block-list semantics in ~100 lines that the tests cover; revisit AutoCast when it installs
alongside our pins.

Kept FP32 (block list):
  * every quantizable node whose plan precision is not fp16 (fp32 nodes, and int8 nodes: their Q/DQ
    operate on FP32 tensors, since QuantizeLinear before opset 19 takes only float32 scales);
  * LayerNorm: the whole decomposed opset-13 chain (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul,
    Add) and native LayerNormalization — the FP16 failures seen on this model came from the variance
    reduction (Pow + ReduceMean overflows FP16), and TensorRT itself warns to keep LayerNorm in FP32;
  * every reduction op (ReduceMean/ReduceSum/...), and the converter's own default block list (TopK,
    Range, CumSum, ...);
  * the producers and consumers of tensors whose calibrated |max| (table "max" when available, else the
    amax) exceeds `overflow_threshold` (default 32768: half of FP16's 65504, as headroom over calibration).
Softmax/LogSoftmax are not blocked: TensorRT's FP16 softmax accumulates in FP32.

Unverified here: TensorRT itself (not installable on this machine).  The result is checked by our validator
and executed by ONNX Runtime's CPU EP (which runs FP16 nodes by inserting its own casts).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .analysis import Analysis, GraphIndex
from .calib import CalibTable

REDUCE_OPS = ["ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
              "ReduceLogSumExp", "ReduceProd", "ReduceMax", "ReduceMin"]
KEEP_FP32_OPS = REDUCE_OPS + ["LayerNormalization"]
# never typed FP16: ops whose float inputs are index/shape-like or that TensorRT/ORT run poorly in FP16
# (the onnxconverter-common default block list's relevant members)
BLOCK_OPS = set(KEEP_FP32_OPS) | {"TopK", "Range", "CumSum", "NonMaxSuppression", "RoiAlign", "Resize",
                                  "RandomUniformLike", "Upsample", "QuantizeLinear", "DequantizeLinear"}
# ops whose first input only contributes its shape: no Cast needed
SHAPE_ONLY_INPUT0 = {"Shape", "Size"}


def fp32_block_list(model: onnx.ModelProto, analysis: Analysis, nodes: dict[str, str],
                    table: CalibTable | None, overflow_threshold: float) -> tuple[list[str], dict[str, str]]:
    """Names of the nodes to keep FP32 and, for reporting, why each is kept."""
    why: dict[str, str] = {}
    for q in analysis.quantizable:
        if nodes[q.id] != "fp16":
            why[q.id] = f"plan: {nodes[q.id]}"
    for p in analysis.patterns_of("layernorm"):
        for n in p.nodes:
            why.setdefault(n, "layernorm")
    for n in model.graph.node:
        if n.op_type in KEEP_FP32_OPS:
            why.setdefault(n.name, "reduction")
    if table is not None:
        idx = GraphIndex(model)
        for t in list(idx.producer) + list(idx.graph_inputs):
            mag = table.magnitude(t)
            if mag is not None and mag > overflow_threshold:
                if t in idx.producer:
                    why.setdefault(idx.producer[t].name, f"overflow: |{t}| = {mag:g}")
                for c in idx.consumers.get(t, []):
                    why.setdefault(c.name, f"overflow: |{t}| = {mag:g}")
    return sorted(why), why


def convert_fp16(model: onnx.ModelProto, analysis: Analysis, nodes: dict[str, str],
                 table: CalibTable | None = None, overflow_threshold: float = 32768.0) -> onnx.ModelProto:
    """FP16-typed copy of `model` (graph I/O types kept) with the block list above kept FP32: every node
    outside the block list computes in FP16, FP32 initializers used only by FP16 nodes are stored FP16, and a
    Cast is inserted at every FP32/FP16 boundary (one per tensor and direction)."""
    block, _ = fp32_block_list(model, analysis, nodes, table, overflow_threshold)
    return _retype(model, set(block))


def _retype(model: onnx.ModelProto, block: set[str]) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    _detach_consumed_outputs(model)
    g = model.graph
    inferred = onnx.shape_inference.infer_shapes(model)
    ty = {vi.name: vi.type.tensor_type.elem_type for vi in
          list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    for init in g.initializer:
        ty[init.name] = init.data_type
    F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
    for n in g.node:  # Constant outputs are not always in value_info
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    ty[n.output[0]] = a.t.data_type
    half = [n for n in g.node if n.name not in block and n.op_type not in BLOCK_OPS]
    half_names = {n.name for n in half}
    # 1) outputs of FP16 nodes become FP16; their float attributes with them
    actual: dict[str, int] = dict(ty)
    for n in half:
        if n.op_type == "Cast":
            to = next(a for a in n.attribute if a.name == "to")
            if to.i == F32:
                to.i = F16
        elif n.op_type == "ConstantOfShape" and ty.get(n.output[0]) == F32 and not any(
                a.name == "value" for a in n.attribute):
            n.attribute.append(onnx.helper.make_attribute(
                "value", numpy_helper.from_array(np.zeros(1, np.float16))))
        elif n.op_type in ("Constant", "ConstantOfShape"):
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == F32:
                    a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
        for o in n.output:
            if ty.get(o) == F32 or (n.op_type == "Cast" and actual.get(o) == F32):
                actual[o] = F16
    # 2) FP32 initializers whose consumers are all FP16 nodes are stored FP16
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    for init in g.initializer:
        cs = consumers.get(init.name, [])
        if init.data_type == F32 and cs and all(c.name in half_names for c in cs):
            arr = numpy_helper.to_array(init).astype(np.float32)
            arr = np.clip(arr, -65504, 65504).astype(np.float16)
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
            actual[init.name] = F16
    # 3) a Cast wherever a node's float input has the other float type
    new_nodes: list[onnx.NodeProto] = []
    made: dict[tuple[str, int], str] = {}
    for n in g.node:
        want = F16 if n.name in half_names else F32
        for k, i in enumerate(n.input):
            if not i or actual.get(i) not in (F32, F16) or actual[i] == want:
                continue
            if n.op_type == "Cast" or (n.op_type in SHAPE_ONLY_INPUT0 and k == 0):
                continue
            key = (i, want)
            if key not in made:
                out = f"{i}__cast_{'fp16' if want == F16 else 'fp32'}"
                new_nodes.append(onnx.helper.make_node("Cast", [i], [out], to=want,
                                                       name=f"{i}__Cast_{'fp16' if want == F16 else 'fp32'}"))
                made[key] = out
                actual[out] = want
            n.input[k] = made[key]
        new_nodes.append(n)
    # 4) graph outputs keep their type: an FP16 producer writes an internal tensor, then a Cast
    for o in g.output:
        orig = o.type.tensor_type.elem_type
        if actual.get(o.name) in (F32, F16) and actual[o.name] != orig:
            inner = f"{o.name}__fp16"
            for n in new_nodes:
                for k, x in enumerate(n.output):
                    if x == o.name:
                        n.output[k] = inner
                for k, x in enumerate(n.input):
                    if x == o.name:
                        n.input[k] = inner
            new_nodes.append(onnx.helper.make_node("Cast", [inner], [o.name], to=orig, name=f"{o.name}__Cast_out"))
    del g.node[:]
    g.node.extend(toposort(new_nodes, g))
    del g.value_info[:]  # stale types; shape inference recomputes them
    return model


def toposort(nodes: list[onnx.NodeProto], g: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Stable topological order (original order wherever it is already valid). Written here rather than taken
    from onnx-graphsurgeon: its toposort orders nodes by depth, which reshuffles a graph that is already valid,
    so placed models would not diff cleanly against their FP32 graph (and a graphsurgeon round trip rewrites
    the whole model for what is one pass over the node list)."""
    avail = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    prod = {o: k for k, n in enumerate(nodes) for o in n.output}
    order, state = [], [0] * len(nodes)

    def visit(k: int) -> None:
        stack = [(k, False)]
        while stack:
            j, done = stack.pop()
            if done:
                if state[j] != 2:
                    state[j] = 2
                    order.append(nodes[j])
                continue
            if state[j]:
                continue
            state[j] = 1
            stack.append((j, True))
            for i in reversed(nodes[j].input):
                p = prod.get(i)
                if i not in avail and p is not None and not state[p]:
                    stack.append((p, False))

    for k in range(len(nodes)):
        visit(k)
    return order


def _detach_consumed_outputs(model: onnx.ModelProto) -> None:
    """A graph output that other nodes also consume (encoder_out feeds ctc_lo) confuses the converter with
    keep_io_types (the consumer sees FP32 beside FP16 weights).  Give the producer an internal output and
    feed the graph output through an Identity, so the output gets its own boundary Cast."""
    g = model.graph
    outs = {o.name for o in g.output}
    consumed = {i for n in g.node for i in n.input}
    for t in outs & consumed:
        if t in {i.name for i in g.input} or t in {i.name for i in g.initializer}:
            continue
        inner = f"{t}__fp16_internal"
        for n in g.node:
            for k, o in enumerate(n.output):
                if o == t:
                    n.output[k] = inner
            for k, i in enumerate(n.input):
                if i == t:
                    n.input[k] = inner
        g.node.append(onnx.helper.make_node("Identity", [inner], [t], name=f"{t}__output_identity"))
