"""Quantization-aware fine-tuning (QAT) of the PyTorch ASR model and export to a Q/DQ ONNX model (issue 8).

Why not NVIDIA ModelOpt (`modelopt.torch.quantization`, the successor of pytorch-quantization):
  * `nvidia-modelopt` pins older onnx/onnxruntime than the rest of the workbench (it lives in the separate
    `.venv-bench` used by experiments/bench_calibration.py for exactly that reason);
  * our precision plan is keyed by ONNX node, while ModelOpt picks quantizers by module-name wildcards: the
    node -> module mapping (`node_module_path`) is needed either way, and with it the quantizer itself is a
    few lines on PyTorch's own fake-quantize ops (which the ONNX exporter already turns into Q/DQ).

  * `FakeQuant`: symmetric INT8 (-128..127, zero point 0), per-tensor for activations, per-channel (output
    channel) for weights, straight-through estimator (PyTorch's fake-quantize ops pass the gradient through
    inside the clip range and zero it outside).  Activation amax is a fixed buffer initialised from our PTQ
    calibration table (as pytorch-quantization/ModelOpt QAT: ranges are calibrated, weights are trained);
    weight amax is dynamic, the per-channel max |w| of the current weights, which is exactly what the PTQ
    placement (`graph.placement`) computes from the fine-tuned weights later.  Every amax is floored at
    1e-8 so scales stay positive.
  * `insert_quantizers`: quantize exactly the nn.Linear / nn.Conv1d / nn.Conv2d whose ONNX node the plan
    marks int8 (input activation + weight).  The module's class is swapped in place (parameters, names and
    hence ONNX node names unchanged); `remove_quantizers` swaps it back.  Attention MatMuls (act_matmul) are
    fp32 in the default plans and refused with a clear error when a plan makes them int8.  The TensorRT
    recipe's residual-Add Q/DQ and the ONNX Runtime recipe's output Q/DQ are placement details, not modelled
    in training; their ranges come from the PTQ table.
  * `export_qat_onnx`: `models.export.export_onnx` of the quantized model (same names/dtypes/dynamic axes).
    The legacy exporter turns `torch.fake_quantize_per_{tensor,channel}_affine` into QuantizeLinear +
    DequantizeLinear (opset >= 13); the weights' float-initializer -> QuantizeLinear is then folded into an
    INT8 initializer so each weight reads INT8 -> DequantizeLinear(axis) as TensorRT and `graph.validate`
    expect.
  * `qat_table`: the calibration table the PTQ pipeline reads, with the QAT ranges as method "qat", so the
    precision search can start from QAT scales and fine-tuned weights.
Fine-tuning itself is `models.train.train` with the prepared model (and optionally an FP32 teacher).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from graph.analysis import analyze
from core.errors import WorkbenchError
from core.fsutil import atomic_path

from .methods import AMAX_FLOOR

QMIN, QMAX = -128, 127


# --------------------------------------------------------------------------------------------- quantizer
class FakeQuant(nn.Module):
    """Symmetric INT8 fake quantizer.  `axis=None`: per-tensor (0-d amax); else per-channel along `axis`
    (1-D amax).  `amax=None` (per-tensor only): set from max |x| of the first batch seen."""

    def __init__(self, amax: float | torch.Tensor | None = None, axis: int | None = None, dynamic: bool = False,
                 per_token: bool = False):
        super().__init__()
        self.axis = axis
        self.dynamic = dynamic
        # per_token: each row (last axis) quantized with its own max |x| / 127, as graph.per_token computes at run
        # time; `amax` is then only carried into the QAT table (for the placements that calibrate this input)
        self.per_token = per_token
        self.enabled = True
        if amax is None:
            if axis is not None:
                raise ValueError("a per-channel FakeQuant needs its amax")
            amax_t, init = torch.tensor(1.0), False
        else:
            amax_t, init = torch.as_tensor(amax, dtype=torch.float32).detach().clone(), True
        if axis is None and amax_t.ndim != 0:
            raise ValueError(f"per-tensor amax must be a scalar, got shape {tuple(amax_t.shape)}")
        if axis is not None and amax_t.ndim != 1:
            raise ValueError(f"per-channel amax must be 1-D, got shape {tuple(amax_t.shape)}")
        self.register_buffer("amax", amax_t.float().clamp(min=AMAX_FLOOR))
        self.register_buffer("initialized", torch.tensor(init))
        self._ready = init

    @property
    def scale(self) -> torch.Tensor:
        return self.amax.clamp(min=AMAX_FLOOR) / QMAX

    def learn_range(self) -> None:
        """Train this (per-tensor) range from now on: LSQ through PyTorch's learnable fake-quantize op, on the
        log of the range (positive, and steps relative to its size). `freeze_range` writes it back to `amax`."""
        if self.axis is not None or self.dynamic or self.per_token:
            raise WorkbenchError("only a fixed per-tensor range can be learned")
        self.log_amax = nn.Parameter(self.amax.detach().clone().log())

    def freeze_range(self) -> None:
        if getattr(self, "log_amax", None) is not None:
            with torch.no_grad():
                self.amax.copy_(self.log_amax.detach().exp().clamp(min=AMAX_FLOOR))
            del self.log_amax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.per_token:
            if torch.onnx.is_in_onnx_export():
                raise WorkbenchError("a per-token quantizer has no Q/DQ export: remove the quantizers first")
            s = (x.detach().abs().amax(-1, keepdim=True).float().clamp(min=AMAX_FLOOR) / QMAX)
            q = torch.clamp(torch.round(x.float() / s), -QMAX, QMAX) * s
            return (x.float() + (q - x.float()).detach()).to(x.dtype)  # straight-through: row max never clips
        if getattr(self, "log_amax", None) is not None and not torch.onnx.is_in_onnx_export():
            dtype = x.dtype
            scale = (self.log_amax.exp().clamp(min=AMAX_FLOOR) / QMAX).reshape(1)
            zp = torch.zeros(1, device=x.device)
            grad_factor = 1.0 / math.sqrt(x.numel() * QMAX)  # LSQ's step-size gradient scale
            y = torch._fake_quantize_learnable_per_tensor_affine(x.float(), scale, zp, QMIN, QMAX, grad_factor)
            return y.to(dtype)
        if self.dynamic:  # weights: amax follows the weights as they train (what placement computes later)
            with torch.no_grad():
                self.amax.copy_(weight_amax(x, self.axis))
        elif not self._ready:  # a Python flag: no device sync per step once initialised
            if not bool(self.initialized):
                with torch.no_grad():
                    self.amax.copy_(x.detach().abs().max().float().clamp(min=AMAX_FLOOR))
                    self.initialized.fill_(True)
            self._ready = True
        dtype = x.dtype
        if dtype != torch.float32:  # the fake-quantize kernels want float32 (fp16/bf16 under autocast)
            x = x.float()
        scale = self.scale
        if torch.onnx.is_in_onnx_export():
            # A constant in the traced graph: the exporter's constant folding leaves Clip(amax)/127 unfolded,
            # and Q/DQ scales must be initializers/Constants (TensorRT, graph.validate).
            scale = torch.tensor(scale.detach().cpu().numpy(), device=x.device)
        if self.axis is None:
            zp = torch.zeros((), dtype=torch.int32, device=x.device)
            y = torch.fake_quantize_per_tensor_affine(x, scale, zp, QMIN, QMAX)
        else:
            zp = torch.zeros(scale.shape, dtype=torch.int32, device=x.device)
            y = torch.fake_quantize_per_channel_affine(x, scale, zp, self.axis % x.ndim, QMIN, QMAX)
        return y if dtype == torch.float32 else y.to(dtype)

    def _load_from_state_dict(self, *args, **kwargs):
        self._ready = False  # re-read `initialized` from the loaded buffer
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        kind = "per-token" if self.per_token else "per-tensor" if self.axis is None else f"per-channel axis={self.axis}"
        return f"{kind}, amax {'shape ' + str(tuple(self.amax.shape)) if self.amax.ndim else float(self.amax):}"


def weight_amax(weight: torch.Tensor, axis: int | None = 0) -> torch.Tensor:
    """Per-channel max |w| along `axis` (the output channels; None: per-tensor), floored at AMAX_FLOOR."""
    if axis is None:
        return weight.detach().abs().amax().float().clamp(min=AMAX_FLOOR)
    dims = [d for d in range(weight.ndim) if d != axis % weight.ndim]
    return weight.detach().abs().amax(dim=dims).float().clamp(min=AMAX_FLOOR)


# --------------------------------------------------------------------------------------------- modules
class QuantLinear(nn.Linear):
    """nn.Linear with fake-quantized input and weight.  Computes x @ W^T + b with the weight transposed
    *before* quantizing (per-channel on axis 1 of W^T = output channels), so that the exported graph is
    INT8 W^T -> DequantizeLinear(axis=1) -> MatMul with no Transpose between DQ and MatMul (the layout
    `graph.analysis` gives an FP32 Linear's MatMul weight: [in, out], axis 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(self.input_quantizer(x), self.weight_quantizer(self.weight.t()))
        return y + self.bias if self.bias is not None else y


class QuantConv1d(nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


_QUANT_CLASS = {nn.Linear: QuantLinear, nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d}
_FLOAT_CLASS = {v: k for k, v in _QUANT_CLASS.items()}
_ONNX_OPS = {nn.Linear: ("MatMul",), nn.Conv1d: ("Conv",), nn.Conv2d: ("Conv",)}


def node_module_path(node_id: str) -> str:
    """ONNX node id -> module path of the ASRModel, inverting the legacy exporter's scope naming:
    `/encoder/encoders.0/feed_forward/w_1/MatMul` -> `encoder.encoders.0.feed_forward.w_1`;
    `/encoder/embed/conv/conv.0/Conv` -> `encoder.embed.conv.0` (a called container's child is named
    `<container>.<i>`).  The export wrappers hold `encoder`, `ctc`, `decoder` under the ASRModel's names."""
    parts = [p for p in node_id.split("/") if p][:-1]
    out: list[str] = []
    for p in parts:
        if out and p.startswith(out[-1] + "."):
            out[-1] = p
        else:
            out.append(p)
    return ".".join(out)


def _resolve_module(path: str, modules: dict[str, nn.Module]) -> str:
    """The module path itself, else the unique module whose path ends with it: a module called through a
    parent's method rather than its forward (`ctc.log_softmax` -> `ctc_lo`) gets no parent scope, so the
    node is `/ctc_lo/MatMul` for module `ctc.ctc_lo`."""
    if path in modules:
        return path
    hits = [p for p in modules if p.endswith("." + path)]
    return hits[0] if len(hits) == 1 else path


def module_of_node(node_id: str, modules: dict[str, nn.Module]) -> str:
    """The module path of ONNX node `node_id` among `modules` (node_module_path, then _resolve_module)."""
    return _resolve_module(node_module_path(node_id), modules)


def _act_amax(table, tensor: str, node_id: str) -> float | None:
    if table is None:
        return None
    if isinstance(table, Mapping):
        if tensor not in table:
            raise WorkbenchError(f"calibration table has no amax for tensor {tensor!r} (input of int8 node "
                                 f"{node_id!r})")
        a = float(table[tensor])
    else:  # quant.table.CalibrationTable (its amax is already floored)
        try:
            a = float(table.amax(tensor))
        except WorkbenchError as exc:
            raise WorkbenchError(f"int8 node {node_id!r}: {exc}") from None
    if not np.isfinite(a):
        raise WorkbenchError(f"amax of tensor {tensor!r} (node {node_id!r}) is {a}")
    return max(a, AMAX_FLOOR)


def insert_quantizers(model: nn.Module, plan: dict, table, onnx_fp32_path: str | Path, *,
                      analysis=None, per_token: set[str] = frozenset()) -> list[str]:
    """Quantize (in place) the input activation and weight of every Linear/Conv1d/Conv2d whose ONNX node
    in `onnx_fp32_path` (the FP32 export of this model) the plan marks int8.  `table`: a
    `quant.table.CalibrationTable`, a plain {tensor name: amax} dict, or None (activation amax = max |x| of
    the first batch).  Returns the quantized node ids.  Plan nodes of another model (not in this ONNX file)
    are ignored, so the encoder and decoder plans can be applied one after the other; an int8 node that no
    Linear/Conv module maps to (e.g. an attention act_matmul) is an error naming it.  `analysis`:
    `analyze(onnx_fp32_path)` when the caller has it. `per_token`: node ids whose input is quantized per token
    (graph.per_token's arithmetic) rather than with the table's range."""
    analysis = analysis or analyze(onnx_fp32_path)
    qnodes = {q.id: q for q in analysis.quantizable}
    modules = dict(model.named_modules())
    int8 = [nid for nid, p in plan["nodes"].items() if p == "int8" and nid in qnodes]
    missing = [nid for nid, p in plan["nodes"].items() if p == "int8" and nid not in qnodes]
    if missing and not int8:
        raise WorkbenchError(f"int8 plan node {missing[0]!r} is not a quantizable node of {onnx_fp32_path} "
                             f"(plan for another model?)")
    todo = []
    for nid in int8:
        q = qnodes[nid]
        path = module_of_node(nid, modules)
        mod = modules.get(path)
        if mod is None or type(mod) not in _QUANT_CLASS or q.op not in _ONNX_OPS[type(mod)] \
                or q.kind == "act_matmul":
            what = "no module" if mod is None else f"a {type(mod).__name__}"
            raise WorkbenchError(f"int8 node {nid!r} ({q.op}, {q.kind}) has no quantizable PyTorch module: "
                                 f"{path!r} is {what} (QAT quantizes only Linear->MatMul and Conv1d/Conv2d->Conv)")
        todo.append((nid, mod, _act_amax(table, q.act_inputs[0], nid)))
    for nid, mod, act in todo:  # everything checked first, then the model is changed
        cls = type(mod)
        w_axis = 1 if cls is nn.Linear else 0  # QuantLinear quantizes W^T
        w = mod.weight.t() if cls is nn.Linear else mod.weight
        mod.__class__ = _QUANT_CLASS[cls]
        dev = mod.weight.device
        mod.input_quantizer = FakeQuant(act, per_token=nid in per_token).to(dev)
        mod.weight_quantizer = FakeQuant(weight_amax(w, w_axis), axis=w_axis, dynamic=True).to(dev)
    return [nid for nid, _, _ in todo]


def quantizers(model: nn.Module) -> dict[str, FakeQuant]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuant)}


def remove_quantizers(model: nn.Module) -> None:
    """Undo `insert_quantizers` (fine-tuned weights are kept)."""
    for m in model.modules():
        if type(m) in _FLOAT_CLASS:
            del m.input_quantizer, m.weight_quantizer
            m.__class__ = _FLOAT_CLASS[type(m)]


# --------------------------------------------------------------------------------------------- export
def fold_weight_quantize(model: onnx.ModelProto) -> int:
    """In place: every QuantizeLinear whose input is a float initializer becomes an INT8 initializer (the
    rounding ONNX's QuantizeLinear does: round half to even, saturate to -128..127); its DequantizeLinear
    consumers read it directly.  Returns how many were folded."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consts = dict(inits)
    for n in g.node:  # the exporter may leave scales/zero points as Constant nodes
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = n.attribute[0].t
    folded, keep = 0, []
    users = {}
    for n in g.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    for n in g.node:
        if n.op_type == "QuantizeLinear" and n.input[0] in inits and n.input[1] in consts:
            x = numpy_helper.to_array(inits[n.input[0]]).astype(np.float32)
            s = numpy_helper.to_array(consts[n.input[1]]).astype(np.float32)
            zp = numpy_helper.to_array(consts[n.input[2]]) if len(n.input) > 2 and n.input[2] else None
            if zp is not None and zp.dtype != np.int8:
                keep.append(n)
                continue
            if s.ndim == 1:
                axis = next((a.i for a in n.attribute if a.name == "axis"), 1) % x.ndim
                shape = [1] * x.ndim
                shape[axis] = -1
                s = s.reshape(shape)
            z = zp.astype(np.float32).reshape(s.shape) if zp is not None else 0.0
            q = np.clip(np.rint(x / s) + z, QMIN, QMAX).astype(np.int8)
            g.initializer.append(numpy_helper.from_array(q, n.output[0]))
            folded += 1
            if users.get(n.input[0], 0) == 1:
                g.initializer.remove(inits.pop(n.input[0]))
        else:
            keep.append(n)
    del g.node[:]
    g.node.extend(keep)
    return folded


def export_qat_onnx(model: nn.Module, out_dir: str | Path, opset: int = 13, **kwargs) -> tuple[Path, Path]:
    """`models.export.export_onnx` of a model with quantizers (same inputs/outputs/dynamic axes), then
    `fold_weight_quantize` on both files.  Returns (encoder.onnx, decoder.onnx)."""
    from models.export import export_onnx

    if not quantizers(model):
        raise WorkbenchError("the model has no quantizers: call insert_quantizers first (or export_onnx)")
    if any(not bool(q.initialized) for q in quantizers(model).values()):
        raise WorkbenchError("some activation quantizers have no amax yet (table=None and no forward pass)")
    paths = export_onnx(model, out_dir, opset=opset, **kwargs)
    for p in paths:
        m = onnx.load(str(p))
        if fold_weight_quantize(m):
            onnx.checker.check_model(m)
            with atomic_path(p) as tmp:
                onnx.save(m, str(tmp))
    return paths


def fp32_teacher(model: nn.Module) -> nn.Module:
    """A frozen FP32 copy (quantizers removed) to distil from."""
    t = copy.deepcopy(model)
    remove_quantizers(t)
    return t.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------- tables
def qat_table(model: nn.Module, base, onnx_fp32_path: str | Path, *, analysis=None):
    """`base` (a quant.table.CalibrationTable of this ONNX model) with a method "qat" added and made the
    default: each tensor a quantizer of `model` reads gets that quantizer's amax, every other tensor (residual
    inputs, node outputs) keeps its amax of the base table's chosen method.  The per-weight section is
    dropped: the weights were fine-tuned, and placement takes their per-channel max (as QAT did)."""
    from .table import QMAX, CalibrationTable

    analysis = analysis or analyze(onnx_fp32_path)
    modules = dict(model.named_modules())
    trained: dict[str, float] = {}
    for q in analysis.quantizable:
        mod = modules.get(module_of_node(q.id, modules))
        if mod is not None and type(mod) in _FLOAT_CLASS:
            trained.setdefault(q.act_inputs[0], float(mod.input_quantizer.amax))
    data = copy.deepcopy(base.data)
    missing = sorted(set(trained) - set(data["tensors"]))
    if missing:
        raise WorkbenchError(f"the base calibration table has no entry for quantized tensor {missing[0]!r}")
    for name, e in data["tensors"].items():
        a = trained.get(name, base.amax(name))
        e["amax"]["qat"] = max(a, AMAX_FLOOR)
        e["method"], e["scale"] = "qat", max(a, AMAX_FLOOR) / QMAX
    data["default_method"] = "qat"
    data.pop("weights", None)
    data["qat"] = {"base_method": base.default_method, "quantized_tensors": len(trained)}
    return CalibrationTable(data)
