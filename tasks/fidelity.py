"""Fidelity of a quantized graph against its FP32 original on the same feeds: metrics that need no labels.

  * cosine: cosine similarity of each item's output (row of axis 0), mean over items; the minimum over the
    graph's float outputs (the worst output decides);
  * cosine_p01: the 1st percentile over items of that cosine (the tail the mean hides);
  * snr_db: 10 log10(signal power / error power) over all feeds, minimum over outputs (inf when identical);
  * top1: agreement of the argmax over the last axis, for outputs with a last axis of at least 2 (logits);
  * max_abs / median_rel: the TensorRT Hackathon pair (evaluation.hackathon.check), maximum over outputs.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from evaluation.hackathon import check as hackathon_check
from core.errors import WorkbenchError

from .base import Metric

METRICS = (Metric("cosine", True), Metric("cosine_p01", True), Metric("snr_db", True, "dB"),
           Metric("top1", True), Metric("max_abs", False), Metric("median_rel", False))
EPSILON = 1e-5  # the hackathon's check() default


def noise_to_signal(got: np.ndarray, ref: np.ndarray) -> float:
    """Noise-to-signal power ratio of `got` against `ref` (the single-layer sensitivity signal)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.sum((got - ref) ** 2) / max(float(np.sum(ref ** 2)), 1e-12))


def _rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1)


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row pair (1 where both rows are zero, 0 where one is)."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return np.where((na > 0) & (nb > 0), (a * b).sum(axis=1) / np.maximum(na * nb, 1e-300),
                    np.where((na == 0) & (nb == 0), 1.0, 0.0))


def item_cosines(pairs: Iterable[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """{float output: the cosine of each item (row of axis 0) over all pairs}: the per-item values that
    fidelity's "cosine" is the mean of."""
    out: dict[str, list[np.ndarray]] = {}
    for ref, got in pairs:
        for name, v in ref.items():
            if np.issubdtype(np.asarray(v).dtype, np.floating):
                out.setdefault(name, []).append(_row_cosines(_rows(v), _rows(got[name])))
    return {n: np.concatenate(v) for n, v in out.items()}


def fidelity(pairs: Iterable[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]],
             outputs: Sequence[str] | None = None) -> dict[str, float]:
    """METRICS over (reference outputs, candidate outputs) pairs, one pair per feed. `outputs`: the names to
    compare (default: every float output of the first reference)."""
    cos: dict[str, list[np.ndarray]] = {}
    sig: dict[str, float] = {}
    err: dict[str, float] = {}
    agree: dict[str, list[float]] = {}
    max_abs, median_rel = 0.0, 0.0
    for ref, got in pairs:
        names = outputs or [k for k, v in ref.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]
        for name in names:
            a, b = _rows(ref[name]), _rows(got[name])
            if a.shape != b.shape:
                raise WorkbenchError(f"output {name!r}: candidate shape {b.shape} differs from reference {a.shape}")
            cos.setdefault(name, []).append(_row_cosines(a, b))
            sig[name] = sig.get(name, 0.0) + float((a ** 2).sum())
            err[name] = err.get(name, 0.0) + float(((a - b) ** 2).sum())
            full_a, full_b = np.asarray(ref[name]), np.asarray(got[name])
            if full_a.ndim >= 2 and full_a.shape[-1] >= 2:
                agree.setdefault(name, []).append(float((full_a.argmax(-1) == full_b.argmax(-1)).mean()))
            ma, mr = hackathon_check(np.asarray(got[name], np.float32), np.asarray(ref[name], np.float32), EPSILON)
            max_abs, median_rel = max(max_abs, float(ma)), max(median_rel, float(mr))
    if not cos:
        raise WorkbenchError("no float outputs to compare")
    per_cos = {n: np.concatenate(v) for n, v in cos.items()}
    snr = {n: (np.inf if err[n] == 0 else 10 * np.log10(max(sig[n], 1e-300) / err[n])) for n in sig}
    return {"cosine": float(min(v.mean() for v in per_cos.values())),
            "cosine_p01": float(min(np.percentile(v, 1) for v in per_cos.values())),
            "snr_db": float(min(snr.values())),
            "top1": float(min(np.mean(v) for v in agree.values())) if agree else 1.0,
            "max_abs": max_abs, "median_rel": median_rel}
