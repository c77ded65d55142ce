"""The calibration table a calibration run builds (readable JSON, written atomically), and its export to
TensorRT's legacy calibration cache text. The format itself (validation, reading, the amax rules, the cache
text) is graph.calib's: this class reads and checks through it.

JSON layout (`FORMAT`):
  {"format": "wb-calibration-table/1", "model": {"path", "sha256"}, "data": {"n_samples", "batch_size", ...},
   "bins": 2048, "default_method": "entropy",
   "tensors": {name: {"amax": {"max": .., "percentile_99.99": .., "entropy": .., "mse": ..}, "method": "entropy",
                      "scale": amax/127, "count": int, "min": .., "max": ..,
                      "histogram": {"bin_width", "nbins", "occupied_bins", "nonzero_bins", "abs_quantiles"}}},
   "weights": {initializer: {"axis": int, "amax": [per-channel floats], ...}}}
Every amax is floored at `graph.calib.AMAX_FLOOR` (1e-8), so constant-zero tensors get a positive scale.
"""
from __future__ import annotations

import os
from pathlib import Path

from graph.calib import (AMAX_FLOOR, QMAX, TABLE_FORMAT, TRT_HEADER, entry_amax, read_table, read_trt_cache,
                         write_trt_cache)
from core.errors import WorkbenchError
from core.fsutil import sha256_file, write_json

FORMAT = TABLE_FORMAT
__all__ = ["CalibrationTable", "build_table", "read_trt_cache", "write_trt_cache", "FORMAT", "QMAX", "TRT_HEADER"]

class CalibrationTable:
    def __init__(self, data: dict, source: str = "<table>"):
        self.data = data
        self.source = source

    # -------------------------------------------------------------- io
    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibrationTable":
        return cls(read_table(path), str(path))  # graph.calib's reader: one format, one set of checks

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
        return entry_amax(e, method or e.get("method") or self.default_method, tensor, self.source)

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
