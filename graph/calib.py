"""A minimal reader of calibration tables for placement (independent of `quant.table` on purpose).

Accepts a path to a `wb-calibration-table/1` JSON file, the parsed dict, or a plain `{tensor: amax}` dict.
The activation scale of a tensor is `amax[method] / 127` with method = the tensor's "method" or the table's
"default_method" (symmetric INT8: zero point 0)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import WorkbenchError
from core.fsutil import read_json

TABLE_FORMAT = "wb-calibration-table/1"
QMAX = 127.0


@dataclass
class CalibTable:
    amax: dict[str, float]  # activation tensor -> amax used for its scale
    max_abs: dict[str, float] = field(default_factory=dict)  # observed max |x| (for FP16 overflow), when known
    weights: dict[str, tuple[int, list[float]]] = field(default_factory=dict)  # init -> (axis, per-channel amax)
    source: str = "<dict>"
    fingerprint: str | None = None  # structure fingerprint of the model it was calibrated on, when recorded

    def check_model(self, fingerprint: str) -> None:
        """A table of another model (its recorded structure fingerprint differs) is refused in one line."""
        if self.fingerprint is not None and self.fingerprint != fingerprint:
            raise WorkbenchError(f"calibration table {self.source} was made for another model (structure "
                                 f"{self.fingerprint[:12]}…, this model's is {fingerprint[:12]}…): calibrate this "
                                 f"model with `wb calibrate --model ...`")

    def scale(self, tensor: str, needed_by: str) -> float:
        if tensor not in self.amax:
            raise WorkbenchError(f"calibration table {self.source} has no entry for tensor {tensor!r}, "
                                 f"needed by node {needed_by!r}")
        a = self.amax[tensor]
        if not (math.isfinite(a) and a > 0):
            raise WorkbenchError(f"calibration table {self.source}: amax of tensor {tensor!r} (node "
                                 f"{needed_by!r}) is {a}; it must be finite and > 0")
        return a / QMAX

    def magnitude(self, tensor: str) -> float | None:
        if tensor in self.max_abs:
            return self.max_abs[tensor]
        return self.amax.get(tensor)


def load_table(table: str | Path | dict | CalibTable) -> CalibTable:
    if isinstance(table, CalibTable):
        return table
    source = "<dict>"
    if isinstance(table, (str, Path)):
        source = str(table)
        table = read_json(table)
    if not isinstance(table, dict):
        raise WorkbenchError(f"calibration table {source} is not a JSON object")
    if "format" not in table:  # plain {tensor: amax}
        try:
            return CalibTable({str(k): float(v) for k, v in table.items()}, source=source)
        except (TypeError, ValueError) as exc:
            raise WorkbenchError(f"calibration table {source}: expected {{tensor: amax}} numbers") from exc
    if table["format"] != TABLE_FORMAT:
        raise WorkbenchError(f"calibration table {source} has format {table['format']!r}, expected {TABLE_FORMAT!r}")
    default = table.get("default_method", "entropy")
    amax, max_abs, weights = {}, {}, {}
    for name, e in (table.get("tensors") or {}).items():
        method = e.get("method") or default
        a = (e.get("amax") or {}).get(method)
        if a is None:
            if "scale" in e:  # fall back to the stored scale
                a = float(e["scale"]) * QMAX
            else:
                raise WorkbenchError(f"calibration table {source}: tensor {name!r} has no amax for method {method!r}")
        amax[name] = float(a)
        if "min" in e and "max" in e:
            max_abs[name] = max(abs(float(e["min"])), abs(float(e["max"])))
        elif "max" in (e.get("amax") or {}):
            max_abs[name] = float(e["amax"]["max"])
    for name, e in (table.get("weights") or {}).items():
        weights[name] = (int(e["axis"]), [float(x) for x in e["amax"]])
    return CalibTable(amax, max_abs, weights, source, (table.get("model") or {}).get("fingerprint"))


def observe_amax(model, feeds: list[dict], tensors: list[str] | None = None) -> dict[str, float]:
    """A rough max-calibration: run ONNX Runtime (CPU) over `feeds` exposing every float tensor (or only
    `tensors`) as an output, and return {tensor: max |x|}.  For tests and quick experiments; the real
    calibrators live in `quant/`."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from .analysis import load_model

    model = onnx.ModelProto.FromString(load_model(model).SerializeToString())
    inferred = onnx.shape_inference.infer_shapes(model)
    ftypes = {vi.name: vi.type.tensor_type.elem_type for vi in
              list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    present = {o.name for o in model.graph.output}
    if tensors is None:
        tensors = [t for t, ty in ftypes.items() if ty in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    for t in tensors:
        if t not in present:
            model.graph.output.append(onnx.ValueInfoProto(name=t))
            present.add(t)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    want = set(tensors)
    out: dict[str, float] = {}
    for feed in feeds:
        for name, v in zip(names, sess.run(None, feed)):
            if name in want and np.issubdtype(np.asarray(v).dtype, np.floating) and np.size(v):
                m = float(np.max(np.abs(v)))
                out[name] = max(out.get(name, 0.0), m)
    return {k: (v if v > 0 else 1e-8) for k, v in out.items()}
