"""Placement recipes: FP32 ONNX + calibration table + precision plan -> quantized ONNX.

`tensorrt` (explicit quantization, TensorRT's Q/DQ placement rules).  This recipe is checked by our
validator (graph.validate) and executed by ONNX Runtime's CPU EP in the tests — never by TensorRT, which
cannot be installed on this machine; whether TensorRT fuses every placement as intended is unverified.
  * every int8 Conv/ConvTranspose/MatMul/Gemm gets DequantizeLinear on all its inputs: activations
    per-tensor (scale = amax/127 from the table, zero point int8 0), weights per-channel (Conv axis 0,
    ConvTranspose axis 1, MatMul [K,N] axis 1, Gemm axis 0 with transB else 1); biases stay FP32;
  * weights are stored pre-quantized, INT8 initializer -> DequantizeLinear (as ModelOpt's `dq_only`
    export): TensorRT constant-folds a weight Q anyway, the file is 4x smaller for weights, and the stored
    integers are exactly what the engine uses (no second rounding of FP32 weights at build time);
  * an activation tensor gets one Q/DQ pair, shared by all its int8 consumers; its fp32/fp16 consumers
    keep reading the unquantized tensor;
  * no Q/DQ on outputs; BatchNorm/ReLU folding is not simulated;
  * residual Adds: when one input of an Add comes from an int8 GEMM/Conv (directly or through its bias Add
    or a constant-scale Mul), the other (residual) input gets Q/DQ so that TensorRT can fuse the add into
    the GEMM epilogue (plan option "residual_add", default on);
  * LayerNorm and Softmax inputs get no Q/DQ (an int8 MatMul *consuming* a softmax output, e.g. attention
    AV in the plan, is quantized on its own input as any int8 node);
  * fp16 nodes: the graph is FP16-typed first (graph.fp16, keep-FP32 rules, Casts at the boundaries);
    int8 nodes stay FP32-typed there so that their Q/DQ take float32 scales (opset < 19).

`onnxruntime`: ONNX Runtime's own QDQ quantizer (`QDQQuantizer`, what `quantize_static` runs after
calibration) fed with OUR ranges (tensors_range built from the table, scale/zero point forced through
`TensorQuantOverrides`) and `nodes_to_quantize` = the plan's int8 nodes.  It also quantizes the outputs of
int8 nodes, which ORT needs to fuse QLinearConv/QLinearMatMul, so the table must cover those tensors too.
Its int8 arithmetic is chosen per CPU (`ort_mode`, ORT_MODES; "auto" = `ort_mode_for(core.host.cpu_info())`):
  * "u8s8": uint8 activations (scale amax/127, zero point 128), int8 weights.  On x86 the CPU EP fuses every
    Conv and MatMul (attention and depthwise included) with U8S8, while S8S8 leaves activation MatMuls and
    depthwise Convs as DQ->float kernels (measured: tiny encoder 34/34 vs 23/34 integer kernels; trained
    small encoder 64/64 vs 43/64, decoder 30/30 vs 18/30, and U8S8 was the faster of the two);
  * "u8s8-rr": the same with 7-bit weights (`reduce_range`).  Without VNNI, ORT's x86 kernels add pairs of
    u8 x s8 products in int16 with saturation (VPMADDUBSW); 7-bit weights keep that sum in range
    (2 x 255 x 64 < 32768), at the cost of one bit of weight resolution;
  * "s8s8": int8 activations and weights (the TensorRT convention; it saturates the same way without VNNI).
The measurement behind "auto" is experiments/results/ort_int8_modes.md.
Which int8 MatMuls keep a float output (`ort_float_outputs`, ORT_FLOAT_OUTPUTS; `[quantize] ort_float_outputs`):
  * "none" (the default): every int8 node's output is quantized, as ORT's quantizer does (QLinearMatMul);
  * "residual": an int8 MatMul whose output reaches a residual Add (directly or through its bias Add, the
    analysis' residual_add patterns: a transformer's attention-output and FFN-output projections) keeps its
    output in float: its Q/DQ pair is removed and ORT fuses DQ -> MatMul into MatMulIntegerToFloat, the same
    integer GEMM with a float result.  Measured on all-MiniLM-L6-v2 (experiments/results/minilm_smooth/): the
    per-tensor quantization of the FFN-output MatMul's output (amax ~190: the residual stream's outlier
    channels) is what made this recipe's all-INT8 so much worse than the tensorrt recipe's (2 layers, exact
    Q/DQ: cosine 0.953 -> 0.9948 with only that output kept float; every other output costs < 0.001);
  * "matmul": every int8 MatMul's output stays float.
Which of those float-output MatMuls quantize their input per token (`ort_per_token_inputs`, the same choices;
`[quantize] ort_per_token_inputs`; graph.per_token): each row's scale is computed at run time, so their inputs need
no calibrated range. "none" (the default): every input takes the table's per-tensor scale.
A float-output MatMul with a calibrated input and a bias Add after it is written as one MatMulIntegerToFloat with
that bias (graph.matmul_bias): ORT's fusion would leave the Add a separate pass over the output.
Only MatMuls: ORT's CPU EP has no integer Conv/Gemm with a float output, so those keep their output Q/DQ.
(Where a model's input shapes are fully static, ORT 1.32 first fuses MatMul + bias Add into a float Gemm, and
such a MatMul then runs as DQ -> float Gemm: exports with dynamic batch/sequence axes, MiniLM's and WeNet's, fuse
as described; tests/test_ort_float_outputs.py.)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from core.host import cpu_info
from core.errors import WorkbenchError
from core.fsutil import atomic_path

from .analysis import Analysis, GraphIndex, analyze, prepare_model
from .calib import AMAX_FLOOR, QMAX, CalibTable, channel_amax, load_table
from .fp16 import convert_fp16, toposort
from .matmul_bias import fold_bias
from .per_token import apply_per_token
from .plan import create_plan, validate_plan

RECIPES = ("tensorrt", "onnxruntime")
WEIGHT_SUFFIX = "_quantized"
# ONNX Runtime recipe modes: (activation type, 7-bit weights)
ORT_MODES = {"u8s8": ("u8", False), "u8s8-rr": ("u8", True), "s8s8": ("s8", False)}
ORT_FLOAT_OUTPUTS = ("none", "residual", "matmul")  # which int8 MatMuls keep a float output (docstring)


def ort_mode_for(cpu: dict) -> str:
    """The ONNX Runtime recipe's mode for a CPU (`core.host.parse_cpuinfo`): full 8-bit U8S8 where int8
    products accumulate without saturation (VNNI, AMX, Arm dot product), else U8S8 with 7-bit weights
    (experiments/results/ort_int8_modes.md: on an AVX2-only CPU it is the mode that keeps the accuracy)."""
    return "u8s8" if cpu.get("vnni") else "u8s8-rr"


def resolve_ort_mode(mode: str) -> str:
    """A concrete ORT_MODES key: "auto" resolves for this machine's CPU."""
    if mode == "auto":
        return ort_mode_for(cpu_info())
    if mode not in ORT_MODES:
        raise WorkbenchError(f"unknown ONNX Runtime int8 mode {mode!r}: use auto or one of {', '.join(ORT_MODES)}")
    return mode


@dataclass
class Placement:
    model: onnx.ModelProto
    plan: dict
    recipe: str
    report: dict = field(default_factory=dict)


def _trace_table_name(idx: GraphIndex, t: str, table: CalibTable) -> str:
    """The table key of tensor `t`, following back through Casts inserted by FP16 typing."""
    cur = t
    for _ in range(4):
        if cur in table.amax:
            return cur
        p = idx.producer.get(cur)
        if p is None or p.op_type != "Cast":
            break
        cur = p.input[0]
    return t


def _weight_amax(w: np.ndarray, axis: int, source: str, table: CalibTable) -> np.ndarray:
    if source in table.weights:
        ax, am = table.weights[source]
        if ax == axis and len(am) == w.shape[axis]:
            return np.asarray(am, np.float32)
    return channel_amax(w, axis).astype(np.float32)


def quantize_weight(w: np.ndarray, axis: int, amax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel INT8: scale = max(amax, AMAX_FLOOR)/127 (strictly positive: a zero channel gets a
    tiny scale and quantizes to 0), q = clip(round_half_even(w/scale), -128, 127). The one weight quantizer:
    the tensorrt recipe's weights and `wb` tools go through it."""
    amax = np.maximum(np.asarray(amax, np.float32), np.float32(AMAX_FLOOR))
    scale = (amax / np.float32(QMAX)).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w.astype(np.float32) / scale.reshape(shape)), -128, 127).astype(np.int8)
    return q, scale


def calibration_tensors(analysis: Analysis) -> list[str]:
    """Every activation tensor placement may need a range for, whatever the recipe and plan: the inputs of
    every quantizable node (attention MatMuls included), their outputs (the onnxruntime recipe quantizes
    those) and the residual-Add inputs (the tensorrt recipe). A table covering these serves every plan of the
    model; `wb calibrate` and the pipeline both calibrate exactly this set."""
    names: set[str] = set()
    for q in analysis.quantizable:
        names.update(q.act_inputs)
        names.add(q.output)
    names.update(p.residual_input for p in analysis.patterns_of("residual_add"))
    return sorted(n for n in names if n)


def float_output_nodes(analysis: Analysis, plan: dict, which: str = "none") -> set[str]:
    """The int8 MatMuls whose output the onnxruntime recipe leaves in float for `which` (ORT_FLOAT_OUTPUTS)."""
    if which not in ORT_FLOAT_OUTPUTS:
        raise WorkbenchError(f"unknown ort_float_outputs {which!r}: use one of {', '.join(ORT_FLOAT_OUTPUTS)}")
    int8 = {q.id for q in analysis.quantizable if plan["nodes"].get(q.id) == "int8" and q.op == "MatMul"
            and q.kind != "act_matmul"}
    if which == "none":
        return set()
    if which == "matmul":
        return int8
    return {p.gemm for p in analysis.patterns_of("residual_add")} & int8


def check_per_token(per_token: str, float_outputs: str) -> None:
    """Per-token inputs only where the output stays float (a quantized output would need a calibrated range and
    QLinearMatMul, which takes one input scale): `per_token` is one of ORT_FLOAT_OUTPUTS naming a subset of
    `float_outputs`, or a regex of node ids (searched among the float-output MatMuls)."""
    if float_outputs not in ORT_FLOAT_OUTPUTS:
        raise WorkbenchError(f"unknown ort_float_outputs {float_outputs!r}: use one of {', '.join(ORT_FLOAT_OUTPUTS)}")
    if per_token == "none":
        return
    if per_token in ORT_FLOAT_OUTPUTS:
        if ORT_FLOAT_OUTPUTS.index(per_token) > ORT_FLOAT_OUTPUTS.index(float_outputs):
            raise WorkbenchError(f"ort_per_token_inputs {per_token!r} needs those MatMuls' outputs float: set "
                                 f"ort_float_outputs to {per_token!r}" + (' or "matmul"' if per_token == "residual"
                                                                          else ""))
        return
    try:
        re.compile(per_token)
    except re.error as e:
        raise WorkbenchError(f"ort_per_token_inputs {per_token!r} is neither one of {', '.join(ORT_FLOAT_OUTPUTS)} "
                             f"nor a regex of node ids: {e}") from None
    if float_outputs == "none":
        raise WorkbenchError(f"ort_per_token_inputs {per_token!r} (a regex) is searched among the float-output "
                             f"MatMuls: set ort_float_outputs to \"residual\" or \"matmul\"")


def per_token_nodes(analysis: Analysis, plan: dict, float_outputs: str = "none", per_token: str = "none") -> set[str]:
    """The int8 MatMuls whose inputs the onnxruntime recipe quantizes per token (`per_token`, checked against
    `float_outputs` by check_per_token)."""
    check_per_token(per_token, float_outputs)
    if per_token in ORT_FLOAT_OUTPUTS:
        return float_output_nodes(analysis, plan, per_token)
    return {n for n in float_output_nodes(analysis, plan, float_outputs) if re.search(per_token, n)}


def required_tensors(analysis: Analysis, plan: dict, recipe: str = "tensorrt",
                     ort_float_outputs: str = "none", ort_per_token_inputs: str = "none") -> dict[str, str]:
    """{tensor: node that needs it}: the activation tensors a calibration table must cover for `plan`."""
    nodes = plan["nodes"]
    need: dict[str, str] = {}
    floats = float_output_nodes(analysis, plan, ort_float_outputs) if recipe == "onnxruntime" else set()
    dynamic = (per_token_nodes(analysis, plan, ort_float_outputs, ort_per_token_inputs)
               if recipe == "onnxruntime" else set())
    for q in analysis.quantizable:
        if nodes.get(q.id) != "int8":
            continue
        for t in q.act_inputs if q.id not in dynamic else ():
            need.setdefault(t, q.id)
        if recipe == "onnxruntime" and q.id not in floats:  # ORT quantizes outputs, to fuse QLinear kernels
            need.setdefault(q.output, q.id)
    if recipe == "tensorrt" and plan.get("options", {}).get("residual_add", True):
        for p in analysis.patterns_of("residual_add"):
            if nodes.get(p.gemm) == "int8":
                need.setdefault(p.residual_input, p.nodes[0])
    return need


def prune_weight_paths(g: onnx.GraphProto) -> None:
    """Drop initializers and weight-path nodes (Constant/Identity/Transpose/Cast) nothing reads anymore. Only
    those: unlike onnx-graphsurgeon's cleanup, which drops any dead node, this leaves the rest of a user's
    graph exactly as it came."""
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if n.op_type in ("Constant", "Identity", "Transpose", "Cast")
                and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


def _place_tensorrt(model: onnx.ModelProto, analysis: Analysis, plan: dict, table: CalibTable) -> dict:
    g = model.graph
    idx = GraphIndex(model)
    by_name = {n.name: n for n in g.node}
    nodes = plan["nodes"]
    new_nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    act_dq: dict[str, str] = {}
    w_dq: dict[tuple[str, int], str] = {}
    report = {"activation_qdq": 0, "weight_dq": 0, "residual_qdq": 0}

    def act(t: str, needed_by: str) -> str:
        if t in act_dq:
            return act_dq[t]
        key = _trace_table_name(idx, t, table)
        scale = table.scale(key, needed_by)
        base = t
        s_name, z_name = f"{base}_scale", f"{base}_zero_point"
        inits.append(numpy_helper.from_array(np.array(scale, np.float32), s_name))
        inits.append(numpy_helper.from_array(np.array(0, np.int8), z_name))
        qo, dqo = f"{base}_QuantizeLinear_Output", f"{base}_DequantizeLinear_Output"
        new_nodes.append(helper.make_node("QuantizeLinear", [t, s_name, z_name], [qo], name=f"{base}_QuantizeLinear"))
        new_nodes.append(helper.make_node("DequantizeLinear", [qo, s_name, z_name], [dqo],
                                          name=f"{base}_DequantizeLinear"))
        act_dq[t] = dqo
        report["activation_qdq"] += 1
        return dqo

    def weight(q) -> str:
        key = (q.weight, q.weight_axis)
        if key in w_dq:
            return w_dq[key]
        resolved = idx.resolve_weight(q.weight)
        if resolved is None:
            raise WorkbenchError(f"node {q.id!r}: weight {q.weight!r} is not constant")
        src, _, w = resolved
        if w.dtype != np.float32:
            w = w.astype(np.float32)
        q8, scale = quantize_weight(w, q.weight_axis, _weight_amax(w, q.weight_axis, src, table))
        base = q.weight
        qi, s_name, z_name = f"{base}{WEIGHT_SUFFIX}", f"{base}_weight_scale", f"{base}_weight_zero_point"
        inits.append(numpy_helper.from_array(q8, qi))
        inits.append(numpy_helper.from_array(scale, s_name))
        inits.append(numpy_helper.from_array(np.zeros(scale.shape, np.int8), z_name))
        dqo = f"{base}_DequantizeLinear_Output"
        new_nodes.append(helper.make_node("DequantizeLinear", [qi, s_name, z_name], [dqo],
                                          name=f"{base}_DequantizeLinear", axis=q.weight_axis))
        w_dq[key] = dqo
        report["weight_dq"] += 1
        return dqo

    for q in analysis.quantizable:
        if nodes[q.id] != "int8":
            continue
        n = by_name[q.id]
        for k, i in enumerate(n.input):
            if i in q.act_inputs:
                n.input[k] = act(i, q.id)
        if q.weight is not None:
            n.input[q.weight_input_index] = weight(q)
    if plan["options"].get("residual_add", True):
        for p in analysis.patterns_of("residual_add"):
            if nodes.get(p.gemm) != "int8":
                continue
            add = by_name[p.nodes[0]]
            if add.input[p.residual_input_index] != p.residual_input:
                continue
            before = len(act_dq)
            add.input[p.residual_input_index] = act(p.residual_input, add.name)
            report["residual_qdq"] += 1 if len(act_dq) > before else 0
    g.initializer.extend(inits)
    all_nodes = list(g.node) + new_nodes
    del g.node[:]
    g.node.extend(toposort(all_nodes, g))
    prune_weight_paths(g)
    return report


def _fold_weight_paths(model: onnx.ModelProto, nodes: list) -> None:
    """Point each node whose weight sits behind Identity/Transpose/Cast (as in WeNet's own exports) at an
    initializer holding the folded value: ORT's quantizer only recognises weights that are initializers, and
    would otherwise ask for activation ranges of the weight path."""
    idx = GraphIndex(model)
    by_name = {n.name: n for n in model.graph.node}
    for q in nodes:
        if q.weight is None or q.weight == q.weight_source or q.weight in idx.inits:
            continue
        _, _, value = idx.resolve_weight(q.weight)
        name = f"{q.weight}_folded"
        if name not in idx.inits:
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
            idx.inits[name] = model.graph.initializer[-1]
        by_name[q.id].input[q.weight_input_index] = name
    prune_weight_paths(model.graph)


def _unquantize_outputs(model: onnx.ModelProto, tensors: set[str]) -> int:
    """Remove the Q -> DQ pair(s) ORT's quantizer put on each of `tensors`: its consumers read the float tensor
    again (and the scale/zero-point initializers nothing reads anymore go). Returns the pairs removed."""
    g = model.graph
    outputs = {o.name for o in g.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    drop, rewire = [], {}
    for n in g.node:
        if n.op_type != "QuantizeLinear" or n.input[0] not in tensors:
            continue
        dqs = consumers.get(n.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" or d.output[0] in outputs for d in dqs):
            continue  # not a plain Q -> DQ pair (a graph output, or a Q read directly): left as placed
        drop += [n, *dqs]
        rewire.update({d.output[0]: n.input[0] for d in dqs})
    for n in g.node:
        for k, i in enumerate(n.input):
            if i in rewire:
                n.input[k] = rewire[i]
    for n in drop:
        g.node.remove(n)
    prune_weight_paths(g)
    return len(drop) - len(rewire)  # one Q per pair


def _place_onnxruntime(model: onnx.ModelProto, analysis: Analysis, plan: dict, table: CalibTable,
                       mode: str, float_outputs: str = "none",
                       per_token_inputs: str = "none") -> tuple[onnx.ModelProto, dict]:
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    int8 = [q for q in analysis.quantizable if plan["nodes"][q.id] == "int8"]
    if not int8:
        return model, {"int8_nodes": 0}
    _fold_weight_paths(model, int8)
    idx = GraphIndex(model)
    need = required_tensors(analysis, plan, "onnxruntime")  # inputs and outputs of the int8 nodes (every output:
    # the quantizer places them all; the float ones lose their Q/DQ below)
    activation_type, reduce_range = ORT_MODES[mode]
    u8 = activation_type == "u8"
    zp = np.array(128, np.uint8) if u8 else np.array(0, np.int8)
    ranges, overrides = {}, {}
    dynamic = per_token_nodes(analysis, plan, float_outputs, per_token_inputs)
    # inputs only per-token MatMuls read: ORT's quantizer places a Q/DQ there that the rewrite replaces, so a
    # table without their range still places (any scale does)
    static_inputs = {t for q in int8 if q.id not in dynamic for t in q.act_inputs}
    placeholder = {t for q in int8 if q.id in dynamic for t in q.act_inputs} - static_inputs
    for t, who in need.items():
        s = 1.0 / QMAX if t in placeholder and t not in table.amax else table.scale(t, who)
        a = s * QMAX
        ranges[t] = TensorData(lowest=np.float32(-a), highest=np.float32(a))
        overrides[t] = [{"scale": np.array(s, np.float32), "zero_point": zp}]
    for t, a in table.amax.items():  # other covered tensors: harmless extra ranges
        if t not in ranges and a > 0 and t in idx.producer:
            ranges[t] = TensorData(lowest=np.float32(-a), highest=np.float32(a))
    ops = sorted({q.op for q in int8})
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy overflow/NaN warnings on zero points of unused ranges
        quantizer = QDQQuantizer(
            model=model, per_channel=True, reduce_range=reduce_range, weight_qType=QuantType.QInt8,
            activation_qType=QuantType.QUInt8 if u8 else QuantType.QInt8,
            tensors_range=TensorsData(CalibrationMethod.MinMax, ranges),
            nodes_to_quantize=[q.id for q in int8],
            nodes_to_exclude=[q.id for q in analysis.quantizable if plan["nodes"][q.id] != "int8"],
            op_types_to_quantize=ops,
            extra_options={"ActivationSymmetric": not u8, "WeightSymmetric": True,
                           "TensorQuantOverrides": overrides})
        quantizer.quantize_model()
    out = quantizer.model.model
    floats = float_output_nodes(analysis, plan, float_outputs)
    removed = _unquantize_outputs(out, {q.output for q in int8 if q.id in floats}) if floats else 0
    per_token = apply_per_token(out, dynamic)
    biased = fold_bias(out, {q.id for q in int8 if q.id in floats and q.id not in dynamic})
    if per_token or biased:
        prune_weight_paths(out.graph)  # the scales and zero points of the static Q/DQ the rewrites replaced
    ordered = toposort(list(out.graph.node), out.graph)  # the quantizer appends its nodes at the end
    del out.graph.node[:]
    out.graph.node.extend(ordered)
    report = {"int8_nodes": len(int8), "ort_mode": mode}
    if float_outputs != "none":
        report |= {"ort_float_outputs": float_outputs, "float_output_nodes": removed, "bias_folded_nodes": biased}
    if per_token_inputs != "none":
        report |= {"ort_per_token_inputs": per_token_inputs, "per_token_nodes": per_token}
    return out, report


def quantize(model: str | Path | onnx.ModelProto, table, plan: dict | None = None, recipe: str = "tensorrt",
             default_plan: str = "int8", out: str | Path | None = None, ort_mode: str = "auto",
             analysis: Analysis | None = None, ort_float_outputs: str = "none",
             ort_per_token_inputs: str = "none") -> Placement:
    """Apply `plan` (or a default plan of `default_plan`) with calibration `table` (path, table dict,
    {tensor: amax} or a loaded CalibTable).  `ort_mode`: the onnxruntime recipe's int8 arithmetic (ORT_MODES
    or "auto" for this CPU; the report names the one used).  `ort_float_outputs`: which of the onnxruntime
    recipe's int8 MatMuls keep a float output (ORT_FLOAT_OUTPUTS; "none": ORT's own placement);
    `ort_per_token_inputs`: which of those quantize their input per token at run time (graph.per_token).  `analysis`: `analyze(model)` when the caller already has it (a
    search places one model many times).  Everything is checked before anything is written; `out` is
    written atomically."""
    if recipe not in RECIPES:
        raise WorkbenchError(f"unknown recipe {recipe!r}: use one of {', '.join(RECIPES)}")
    m = prepare_model(model)  # a copy: the caller's model is never changed
    original_io = _io_signature(m)
    analysis = analysis or analyze(m)
    plan = (create_plan(analysis, default_plan) if plan is None else
            validate_plan(plan, analysis, node_ops={n.name: n.op_type for n in m.graph.node}))
    table = load_table(table)
    table.check_model(analysis.fingerprint)
    nodes = plan["nodes"]
    if recipe == "onnxruntime":
        bad = [n for n, p in nodes.items() if p == "fp16"]
        if bad:
            raise WorkbenchError(f"the onnxruntime recipe has no fp16 (the CPU EP computes FP16 by casting to "
                                 f"FP32): node {bad[0]!r} is fp16 in the plan; use fp32 or int8")
    # check the table covers everything before doing any work
    for t, who in required_tensors(analysis, plan, recipe, ort_float_outputs, ort_per_token_inputs).items():
        table.scale(t, who)
    report: dict = {"recipe": recipe, "plan_hash": plan["hash"]}
    if recipe == "tensorrt":
        if "fp16" in nodes.values():
            m = convert_fp16(m, analysis, nodes, table, float(plan["options"]["fp16_overflow_threshold"]))
            analysis_now = _reanalyze(m, analysis)
        else:
            analysis_now = analysis
        if "int8" in nodes.values():
            report |= _place_tensorrt(m, analysis_now, plan, table)
    else:
        m, r = _place_onnxruntime(m, analysis, plan, table, resolve_ort_mode(ort_mode), ort_float_outputs,
                                  ort_per_token_inputs)
        report |= r
    if _io_signature(m) != original_io:
        raise WorkbenchError("internal error: the graph inputs/outputs changed during placement")
    if out is not None:
        with atomic_path(out) as tmp:
            onnx.save(m, str(tmp))
    return Placement(m, plan, recipe, report)


def _reanalyze(m: onnx.ModelProto, before: Analysis) -> Analysis:
    """Analysis of the FP16-typed graph: same node ids, act inputs now possibly Cast outputs."""
    a = analyze(m)
    missing = set(before.ids) - set(a.ids)
    if missing:
        raise WorkbenchError(f"node {sorted(missing)[0]!r} is no longer quantizable after FP16 typing")
    return a


def _io_signature(m: onnx.ModelProto):
    def sig(vs):
        return [(v.name, v.type.tensor_type.elem_type) for v in vs]
    return sig(m.graph.input), sig(m.graph.output)
