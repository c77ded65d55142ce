"""The calibration table (readable JSON, written atomically) and TensorRT's legacy calibration cache text.

JSON layout (`FORMAT`):
  {"format": "wb-calibration-table/1", "model": {"path", "sha256"}, "data": {"n_samples", "batch_size", ...},
   "bins": 2048, "default_method": "entropy",
   "tensors": {name: {"amax": {"max": .., "percentile_99.99": .., "entropy": .., "mse": ..}, "method": "entropy",
                      "scale": amax/127, "count": int, "min": .., "max": ..,
                      "histogram": {"bin_width", "nbins", "occupied_bins", "nonzero_bins", "abs_quantiles"}}},
   "weights": {initializer: {"axis": int, "amax": [per-channel floats], ...}}}
Every amax is floored at `quant.methods.AMAX_FLOOR` (1e-8), so constant-zero tensors get a positive scale.

TensorRT cache: first line e.g. `TRT-8601-EntropyCalibration2`, then `name: <8 hex digits>` per tensor, the
big-endian IEEE-754 bits of the float32 scale (amax / 127). Reading gives amax = scale * 127.
"""
from __future__ import annotations

import math
import os
import struct
from pathlib import Path

from graph.calib import QMAX, TABLE_FORMAT, check_amax, check_table
from core.errors import WorkbenchError
from core.fsutil import atomic_path, read_json, sha256_file, write_json

from .methods import AMAX_FLOOR

FORMAT = TABLE_FORMAT  # defined with graph/'s reader (graph/ does not import quant/)
TRT_HEADER = "TRT-8601-EntropyCalibration2"



class CalibrationTable:
    def __init__(self, data: dict, source: str = "<table>"):
        self.data = data
        self.source = source

    # -------------------------------------------------------------- io
    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibrationTable":
        data = read_json(path)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise WorkbenchError(f"{path} is not a calibration table (expected \"format\": \"{FORMAT}\")")
        for key in ("tensors", "default_method"):
            if key not in data:
                raise WorkbenchError(f"calibration table {path} has no {key!r} field")
        check_table(data, str(path))  # graph.calib's rules: one reader, one set of checks
        return cls(data, str(path))

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.data)

    # -------------------------------------------------------------- queries
    @property
    def tensors(self) -> list[str]:
        return list(self.data["tensors"])

    @property
    def default_method(self) -> str:
        return self.data["default_method"]

    @property
    def methods(self) -> list[str]:
        first = next(iter(self.data["tensors"].values()), None)
        return list(first["amax"]) if first else []

    def _entry(self, tensor: str) -> dict:
        try:
            return self.data["tensors"][tensor]
        except KeyError:
            raise WorkbenchError(f"tensor {tensor!r} is not in the calibration table "
                                 f"({len(self.data['tensors'])} tensors calibrated)") from None

    def amax(self, tensor: str, method: str | None = None) -> float:
        e = self._entry(tensor)
        method = method or e.get("method") or self.default_method
        if method not in e["amax"]:
            raise WorkbenchError(f"method {method!r} was not calibrated for tensor {tensor!r} "
                                 f"(available: {', '.join(e['amax'])})")
        a = check_amax(e["amax"][method], f"amax of tensor {tensor!r} ({method})", self.source)  # as graph.calib
        return max(a, AMAX_FLOOR)

    def scale(self, tensor: str, method: str | None = None) -> float:
        return self.amax(tensor, method) / QMAX

    def with_method(self, method: str) -> "CalibrationTable":
        """A copy whose default (and every tensor's chosen) method is `method`."""
        import copy

        data = copy.deepcopy(self.data)
        for name, e in data["tensors"].items():
            if method not in e["amax"]:
                raise WorkbenchError(f"method {method!r} was not calibrated for tensor {name!r} "
                                     f"(available: {', '.join(e['amax'])})")
            e["method"] = method
            e["scale"] = max(float(e["amax"][method]), AMAX_FLOOR) / QMAX
        data["default_method"] = method
        return CalibrationTable(data)

    def weight_amax(self, initializer: str) -> tuple[int, list[float]]:
        try:
            w = self.data.get("weights", {})[initializer]
        except KeyError:
            raise WorkbenchError(f"weight {initializer!r} is not in the calibration table") from None
        return int(w["axis"]), [float(a) for a in w["amax"]]

    # -------------------------------------------------------------- TensorRT cache
    def write_trt_cache(self, path: str | os.PathLike, method: str | None = None,
                        header: str = TRT_HEADER) -> None:
        write_trt_cache(path, {t: self.scale(t, method) for t in self.tensors}, header)


def build_table(model_path: str | os.PathLike, stats: dict, amaxes: dict[str, dict[str, float]], *,
                default_method: str, data_info: dict, bins: int, weights: dict | None = None,
                fingerprint: str | None = None) -> CalibrationTable:
    """Assemble the table from TensorStats and per-tensor {method key: amax}. `fingerprint`: the model's
    structure fingerprint (graph.analysis), by which placement refuses a table of another model."""
    if any(default_method not in a for a in amaxes.values()):
        raise WorkbenchError(f"default method {default_method!r} is not among the computed methods")
    tensors = {}
    for name, st in stats.items():
        am = {k: max(float(v), AMAX_FLOOR) for k, v in amaxes[name].items()}
        tensors[name] = {
            "amax": am, "method": default_method, "scale": am[default_method] / QMAX, "count": int(st.count),
            "min": float(st.min) if st.count else 0.0, "max": float(st.max) if st.count else 0.0,
            "histogram": st.summary(),
        }
    data = {
        "format": FORMAT,
        "model": {"path": str(model_path), "sha256": sha256_file(model_path) if Path(model_path).is_file() else None,
                  "fingerprint": fingerprint},
        "data": data_info, "bins": bins, "default_method": default_method, "tensors": tensors,
        "weights": weights or {},
    }
    return CalibrationTable(data)


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
