"""PTQ calibration end to end: tensors -> one streaming statistics pass -> every method -> CalibrationTable."""
from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping

from graph.analysis import analyze, load_model
from graph.placement import calibration_tensors
from core.errors import WorkbenchError

from .collect import Padding, collect_statistics
from .histogram import DEFAULT_BINS
from .methods import DEFAULT_PERCENTILES, compute_all, parse_methods
from .table import CalibrationTable, build_table
from .weights import weight_ranges


def calibrate(model_path: str | os.PathLike, data: Iterable[Mapping], *, methods="max,percentile,entropy,mse",
              default_method: str = "entropy", percentiles=DEFAULT_PERCENTILES, tensors: list[str] | None = None,
              include_activation_matmuls: bool = True, bins: int = DEFAULT_BINS, padding: Padding | None | str = "auto",
              tensors_per_pass: int | None = None, weight_method: str | None = "max", threads: int | None = None,
              progress: bool = True, data_info: dict | None = None) -> CalibrationTable:
    """Calibrate `model_path` on `data` (feed dicts) and return the table (not saved: call `.save(path)`).

    tensors: activation tensors to calibrate (default: `graph.placement.calibration_tensors`, every tensor
    any recipe and plan may need, so one table serves them all; without `include_activation_matmuls` the
    attention MatMuls' inputs are left out). padding: a `Padding`, None (count padding), or "auto"
    (WeNet encoder spec when the model has `speech` and `speech_lengths`)."""
    keys = parse_methods(methods, percentiles)
    default_key = parse_methods(default_method, percentiles)
    if len(default_key) != 1:
        raise WorkbenchError(f"the default method must name one range, e.g. percentile_99.99, not {default_method!r}")
    default_key = default_key[0]
    if default_key not in keys:
        keys.append(default_key)
    model = load_model(model_path)
    analysis = analyze(model, include_act_matmul=include_activation_matmuls)
    if not analysis.quantizable:
        raise WorkbenchError(f"{model_path}: no Conv/ConvTranspose/MatMul/Gemm with a constant weight found to "
                             f"calibrate")
    if tensors is None:
        tensors = calibration_tensors(analysis)
    if padding == "auto":
        names = {i.name for i in model.graph.input}
        padding = Padding.wenet_encoder() if {"speech", "speech_lengths"} <= names else None
    t0 = time.perf_counter()
    res = collect_statistics(model, tensors, data, bins=bins, padding=padding, tensors_per_pass=tensors_per_pass,
                             threads=threads, progress=progress)
    t1 = time.perf_counter()
    amaxes = {name: compute_all(st, keys) for name, st in res.stats.items()}
    t2 = time.perf_counter()
    weights = weight_ranges(model, analysis, weight_method) if weight_method else {}
    info = {"n_samples": res.n_samples, "n_batches": res.n_batches, "batch_size": max(res.batch_sizes),
            "passes": res.passes,
            "padding": res.padding, "collect_s": round(t1 - t0, 3), "methods_s": round(t2 - t1, 3)}
    info.update(data_info or {})
    return build_table(model_path, res.stats, amaxes, default_method=default_key, data_info=info, bins=bins,
                       weights=weights, fingerprint=analysis.fingerprint)
