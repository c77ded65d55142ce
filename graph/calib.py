"""The calibration-table format, in one module: the `wb-calibration-table/1` JSON (validate, read; written by
quant.table, which builds tables) and TensorRT's legacy calibration cache text (read, write), plus the rules
every reader shares: which amax a tensor uses, how it is checked and floored, and a weight's per-channel range.

Placement reads a table through `load_table`: a path to a `wb-calibration-table/1` JSON file, the parsed dict,
or a plain `{tensor: amax}` dict. The activation scale of a tensor is `amax[method] / 127` with method = the
tensor's "method" or the table's "default_method" (symmetric INT8: zero point 0). It lives in graph/ (not
quant/) because placement, the lowest layer that reads tables, must not import the calibrators.

TensorRT cache: first line e.g. `TRT-8601-EntropyCalibration2`, then `name: <8 hex digits>` per tensor, the
big-endian IEEE-754 bits of the float32 scale (amax / 127). Reading gives amax = scale * 127.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import WorkbenchError
from core.fsutil import atomic_path, read_json

TABLE_FORMAT = "wb-calibration-table/1"
TRT_HEADER = "TRT-8601-EntropyCalibration2"
QMAX = 127.0
AMAX_FLOOR = 1e-8  # smallest amax ever used: an all-zero tensor or channel gets scale 1e-8/127, not 0 (division
                   # by zero); calibrators (quant.methods) and weight ranges floor here too


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
        return usable_amax(self.amax[tensor], f"amax of tensor {tensor!r} (node {needed_by!r})", self.source) / QMAX

    def magnitude(self, tensor: str) -> float | None:
        if tensor in self.max_abs:
            return self.max_abs[tensor]
        return self.amax.get(tensor)


AMAX_MIN = 1e-12  # smallest amax a table may hold where it is used: below it the scale crushes every real value
                  # to zero; tables we write floor at AMAX_FLOOR, so only a damaged table goes lower
_RECALIBRATE = "recalibrate with `wb calibrate`"


def _number(v, what: str, source: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise WorkbenchError(f"calibration table {source}: {what} is {v!r}, not a number; {_RECALIBRATE}")
    return float(v)


def check_amax(v, what: str, source: str) -> float:
    """An activation amax: a finite number > AMAX_MIN."""
    a = _number(v, what, source)
    if not (math.isfinite(a) and a > AMAX_MIN):
        raise WorkbenchError(f"calibration table {source}: {what} is {a!r}; it must be a finite number > "
                             f"{AMAX_MIN:g} (its scale would crush the tensor); {_RECALIBRATE}")
    return a


def usable_amax(v, what: str, source: str) -> float:
    """The amax a scale is made from: checked (check_amax), then floored at AMAX_FLOOR. Every reader uses this."""
    return max(check_amax(v, what, source), AMAX_FLOOR)


def entry_amax(entry: dict, method: str, tensor: str, source: str) -> float:
    """The amax of one table entry for `method`: its "amax" value for the method, else (only for the entry's own
    chosen method) its stored scale x 127; anything else is one clear error."""
    amax = entry.get("amax") or {}
    if method in amax:
        return usable_amax(amax[method], f"amax of tensor {tensor!r} ({method})", source)
    if "scale" in entry and method == entry.get("method"):
        return usable_amax(_number(entry["scale"], f"scale of tensor {tensor!r}", source) * QMAX,
                           f"amax of tensor {tensor!r} (from its scale)", source)
    raise WorkbenchError(f"calibration table {source}: method {method!r} was not calibrated for tensor {tensor!r} "
                         f"(available: {', '.join(amax) or 'none'})")


def channel_amax(w: np.ndarray, axis: int) -> np.ndarray:
    """Per-channel max |w| along `axis` (the output channels), floored at AMAX_FLOOR: the weight range placement
    uses when a table has none, and quant.weights' "max" method."""
    w = np.asarray(w)
    if w.ndim == 0:
        w, axis = w.reshape(1), 0
    red = tuple(d for d in range(w.ndim) if d != axis % w.ndim)
    return np.maximum(np.max(np.abs(w.astype(np.float64)), axis=red), AMAX_FLOOR)


def _check_weight(name: str, e, source: str) -> tuple[int, list[float]]:
    """A per-channel weight entry: {"axis": int, "amax": [finite numbers >= 0]} (0: an all-zero channel)."""
    what = f"weight {name!r}"
    if not isinstance(e, dict) or "axis" not in e or "amax" not in e:
        raise WorkbenchError(f"calibration table {source}: {what} must be an object with \"axis\" and \"amax\"")
    axis = e["axis"]
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise WorkbenchError(f"calibration table {source}: {what} has axis {axis!r}, not an integer")
    amax = e["amax"]
    if not isinstance(amax, list) or not amax:
        raise WorkbenchError(f"calibration table {source}: {what} has amax {amax!r}, not a non-empty list")
    out = []
    for i, v in enumerate(amax):
        a = _number(v, f"{what} channel {i} amax", source)
        if not (math.isfinite(a) and a >= 0):
            raise WorkbenchError(f"calibration table {source}: {what} channel {i} amax is {a!r}; it must be a "
                                 f"finite number >= 0; {_RECALIBRATE}")
        out.append(a)
    return axis, out


def check_table(table: dict, source: str) -> None:
    """The structure of a `wb-calibration-table/1` dict: tensors with numeric amax (every method) and min/max,
    per-channel weights finite and >= 0. One reader's rules, shared by quant.table. An activation amax is
    checked finite and > AMAX_MIN (check_amax) where a plan uses it: a table also holds tensors that no plan
    quantizes, such as an attention mask's -inf constant."""
    if table.get("format") != TABLE_FORMAT:
        raise WorkbenchError(f"calibration table {source} has format {table.get('format')!r}, expected "
                             f"{TABLE_FORMAT!r}")
    for key in ("tensors", "default_method"):
        if key not in table:
            raise WorkbenchError(f"calibration table {source} has no {key!r} field")
    tensors, weights = table.get("tensors"), table.get("weights")
    if not isinstance(tensors, dict):
        raise WorkbenchError(f"calibration table {source}: \"tensors\" must be an object of tensor entries")
    if weights is not None and not isinstance(weights, dict):
        raise WorkbenchError(f"calibration table {source}: \"weights\" must be an object of weight entries")
    default = table["default_method"]
    if not isinstance(default, str):
        raise WorkbenchError(f"calibration table {source}: default_method is {default!r}, not a string")
    for name, e in tensors.items():
        if not isinstance(e, dict):
            raise WorkbenchError(f"calibration table {source}: tensor {name!r} must be an object, got {e!r}")
        amax = e.get("amax") or {}
        if not isinstance(amax, dict):
            raise WorkbenchError(f"calibration table {source}: tensor {name!r} amax must be an object "
                                 f"{{method: amax}}, got {amax!r}")
        for method, v in amax.items():  # numbers here; finite and > AMAX_MIN where a plan uses the tensor (scale)
            _number(v, f"amax of tensor {name!r} ({method})", source)
        method = e.get("method") or default
        if not isinstance(method, str):
            raise WorkbenchError(f"calibration table {source}: tensor {name!r} method is {method!r}, not a string")
        if method not in amax:
            if "scale" not in e:
                raise WorkbenchError(f"calibration table {source}: tensor {name!r} has no amax for method {method!r}")
            _number(e["scale"], f"scale of tensor {name!r}", source)
        for key in ("min", "max"):
            if key in e:
                _number(e[key], f"{key} of tensor {name!r}", source)
    for name, e in (weights or {}).items():
        _check_weight(name, e, source)


def read_table(path: str | os.PathLike) -> dict:
    """A `wb-calibration-table/1` file as a checked dict (check_table)."""
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
        raise WorkbenchError(f"{path} is not a calibration table (expected \"format\": \"{TABLE_FORMAT}\")")
    check_table(data, str(path))
    return data


def load_table(table: str | Path | dict | CalibTable) -> CalibTable:
    """The placement view of a table (a path, a parsed table, or a plain {tensor: amax} dict)."""
    if isinstance(table, CalibTable):
        return table
    source = "<dict>"
    if isinstance(table, (str, Path)):
        source = str(table)
        table = read_json(table)
    if not isinstance(table, dict):
        raise WorkbenchError(f"calibration table {source} is not a JSON object")
    if "format" not in table:  # plain {tensor: amax}: numbers here; finite and usable checked where used (scale),
        # as such a dict (observe_amax) also holds tensors no plan quantizes (an attention mask's -inf constant)
        return CalibTable({str(k): _number(v, f"amax of tensor {k!r}", source) for k, v in table.items()},
                          source=source)
    check_table(table, source)
    default = table["default_method"]
    amax, max_abs, weights = {}, {}, {}
    for name, e in table["tensors"].items():
        method = e.get("method") or default
        a = (e.get("amax") or {}).get(method)
        # the raw number: finite and usable is checked where a plan uses the tensor (CalibTable.scale)
        amax[name] = float(a) if a is not None else float(e["scale"]) * QMAX
        if "min" in e and "max" in e:
            max_abs[name] = max(abs(float(e["min"])), abs(float(e["max"])))
        elif "max" in (e.get("amax") or {}):
            max_abs[name] = float(e["amax"]["max"])
    for name, e in (table.get("weights") or {}).items():
        weights[name] = _check_weight(name, e, source)
    model = table.get("model") if isinstance(table.get("model"), dict) else {}
    return CalibTable(amax, max_abs, weights, source, model.get("fingerprint"))


def write_trt_cache(path: str | os.PathLike, scales: dict[str, float], header: str = TRT_HEADER) -> None:
    lines = [header]
    for name, s in scales.items():
        if "\n" in name or not name.strip():
            raise WorkbenchError(f"tensor name {name!r} cannot be written to a TensorRT cache")
        if not (math.isfinite(s) and s > 0):
            raise WorkbenchError(f"tensor {name!r} has scale {s}, which a TensorRT cache cannot hold")
        lines.append(f"{name}: {struct.pack('>f', s).hex()}")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def read_trt_cache(path: str | os.PathLike) -> tuple[str, dict[str, float]]:
    """(header, {tensor: amax}) with amax = scale * 127 from a TensorRT calibration cache."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise WorkbenchError(f"TensorRT calibration cache not found: {path}") from None
    except UnicodeDecodeError:
        raise WorkbenchError(f"{path} is not a text TensorRT calibration cache") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or not lines[0].startswith("TRT-"):
        raise WorkbenchError(f"{path} is not a TensorRT calibration cache (first line should be like "
                             f"{TRT_HEADER!r})")
    out = {}
    for no, ln in enumerate(lines[1:], start=2):
        name, sep, hexv = ln.rpartition(":")
        hexv = hexv.strip()
        if not sep or not name or len(hexv) != 8:
            raise WorkbenchError(f"{path} line {no}: expected 'tensor_name: <8 hex digits>', got {ln!r}")
        try:
            scale = struct.unpack(">f", bytes.fromhex(hexv))[0]
        except ValueError:
            raise WorkbenchError(f"{path} line {no}: {hexv!r} is not 8 hex digits") from None
        out[name.strip()] = scale * QMAX
    return lines[0], out


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
    return {k: max(v, AMAX_FLOOR) for k, v in out.items()}
