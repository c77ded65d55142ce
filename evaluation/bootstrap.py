"""Paired bootstrap confidence intervals of a metric's change against a reference model, resampling items.

A corpus rate such as CER is a ratio of sums (edits / reference characters), so the statistic of one resample
is sum(candidate edits - reference edits) / sum(reference lengths) over the drawn items, both models on the
same draw (paired: the item-to-item variation that both share cancels). A per-item mean (cosine, agreement) is
the ratio with every length 1. Percentile intervals, seeded; numpy only (scipy.stats.bootstrap resamples one
statistic at a time and is slower for the ratio form at these sizes).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from core.errors import WorkbenchError


def _arrays(candidate, reference, weights):
    c, r = np.asarray(candidate, np.float64), np.asarray(reference, np.float64)
    w = np.ones_like(r) if weights is None else np.asarray(weights, np.float64)
    if not (c.shape == r.shape == w.shape) or c.ndim != 1 or len(c) < 2:
        raise WorkbenchError(f"paired bootstrap needs two equal-length per-item lists (>= 2 items), got "
                             f"{c.shape}, {r.shape} and weights {w.shape}")
    if not (np.isfinite(c).all() and np.isfinite(r).all() and np.isfinite(w).all()) or w.sum() <= 0:
        raise WorkbenchError("paired bootstrap: per-item values must be finite and the weights' sum positive")
    return c, r, w


def paired_delta_ci(candidate: Sequence[float], reference: Sequence[float], weights: Sequence[float] | None = None,
                    *, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> dict:
    """The change sum(candidate - reference) / sum(weights) and its percentile interval at `level`.

    `candidate`, `reference`: per-item numerators (e.g. edit counts; or per-item metric values with weights
    None), in the same item order; `weights`: per-item denominators (reference lengths) or None (a mean)."""
    if not 0 < level < 1:
        raise WorkbenchError(f"confidence level must be in (0, 1), got {level}")
    c, r, w = _arrays(candidate, reference, weights)
    d = c - r
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    stats = d[idx].sum(axis=1) / w[idx].sum(axis=1)
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return {"delta": float(d.sum() / w.sum()), "low": float(lo), "high": float(hi), "level": level,
            "n_items": int(len(d)), "n_boot": n_boot, "seed": seed}


def items_needed(candidate: Sequence[float], reference: Sequence[float], weights: Sequence[float] | None,
                 half_width: float, level: float = 0.95) -> int:
    """Items an interval needs for a half-width of `half_width`, from the per-item spread measured here: the
    ratio's delta-method standard error shrinks as 1/sqrt(n) (z * se(n) <= half_width)."""
    c, r, w = _arrays(candidate, reference, weights)
    d = c - r
    ratio = d.sum() / w.sum()
    resid = (d - ratio * w) / w.mean()  # the linearised ratio: per-item influence on sum(d)/sum(w)
    sd = float(np.std(resid, ddof=1))
    z = _z(level)
    return max(2, math.ceil((z * sd / half_width) ** 2))


def _z(level: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf((1 + level) / 2)
