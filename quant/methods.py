"""Range (amax) methods computed from one `TensorStats`: max, percentile, entropy (KL) and MSE.

All histogram methods work on the occupied part of the |x| histogram (`TensorStats.occupied()`: cut after the bin
holding the maximum, as pytorch-quantization's histogram ends at the maximum) and follow pytorch-quantization's
`HistogramCalibrator` (`_compute_amax_entropy`, `_compute_amax_mse`, `_compute_amax_percentile`), with these
documented differences:

- entropy: the divergence of every candidate is first computed in closed form (prefix sums, all candidates at
  once); the candidates within a small tolerance of the minimum are then recomputed exactly as the reference does
  (np.digitize over np.linspace, scipy.stats.entropy) and the LAST argmin among those exact values is taken. This
  picks the same candidate as the reference loop, in a fraction of the time.
- mse: computed in float64 with numpy (the reference uses torch float32); ties go to the first argmin, as there.
- every histogram result is capped at the exact max |x| (an upper bin edge can exceed it by < 1 bin), so
  percentile, entropy and mse never exceed max.
- a result is floored at `AMAX_FLOOR` so that constant-zero tensors still get a usable positive scale.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import entropy as _kl

from core.errors import WorkbenchError
from graph.calib import AMAX_FLOOR  # the format's floor: an all-zero tensor gets scale 1e-8/127, not 0

from .histogram import TensorStats

DEFAULT_PERCENTILES = (99.9, 99.99, 99.999)
METHODS = ("max", "percentile", "entropy", "mse")


def _finish(stats: TensorStats, amax: float) -> float:
    return float(max(min(float(amax), stats.amax), AMAX_FLOOR))


def amax_max(stats: TensorStats) -> float:
    return float(max(stats.amax, AMAX_FLOOR))


def amax_percentile(stats: TensorStats, percentile: float) -> float:
    """pytorch-quantization `_compute_amax_percentile`: edges[searchsorted(cdf, p/100)]."""
    if not 0 < percentile <= 100:
        raise WorkbenchError(f"percentile must be in (0, 100], got {percentile}")
    counts, edges = stats.occupied()
    total = counts.sum()
    if total == 0 or stats.amax == 0:
        return _finish(stats, 0.0)
    cdf = np.cumsum(counts / total)
    idx = int(np.searchsorted(cdf, percentile / 100))
    return _finish(stats, edges[min(idx, len(edges) - 1)])


# --------------------------------------------------------------------------- entropy
def _kl_reference(bins: np.ndarray, i: int, nbins: int) -> float:
    """One candidate of pytorch-quantization's loop, done as it does it (vectorised but same arithmetic)."""
    space = np.linspace(0, i, num=nbins + 1)
    digitized = np.digitize(np.arange(i), space) - 1
    digitized[bins[:i] == 0] = -1
    valid = digitized != -1
    sums = np.bincount(digitized[valid], weights=bins[:i][valid], minlength=nbins + 1).astype(np.float64)
    nz = np.bincount(digitized[valid], minlength=nbins + 1)
    per = np.divide(sums, nz, out=np.zeros_like(sums), where=nz > 0)
    new_density = np.zeros(i, dtype=np.float64)
    new_density[valid] = per[digitized[valid]]
    reference = np.array(bins[:i], dtype=np.float64)
    reference[-1] += bins[i:].sum()
    return float(_kl(reference, new_density))


def _kl_closed_form(bins: np.ndarray, start: int, nbins: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """KL(p || q) of every candidate i in range(start, len(bins)+1, stride) via prefix sums."""
    n = len(bins)
    cands = np.arange(start, n + 1, stride)
    b = bins.astype(np.float64)
    plogp = np.where(b > 0, b * np.log(np.where(b > 0, b, 1.0)), 0.0)
    C = np.concatenate([[0.0], np.cumsum(b)])
    NZ = np.concatenate([[0], np.cumsum(b > 0)])
    PL = np.concatenate([[0.0], np.cumsum(plogp)])
    total = C[-1]
    out = np.empty(len(cands))
    for lo in range(0, len(cands), 512):  # bounded temporaries: [512, nbins+1]
        ii = cands[lo:lo + 512]
        space = np.linspace(0, ii, num=nbins + 1, axis=1)  # same values as np.linspace(0, i, nbins + 1)
        # first integer j >= space[k]: j belongs to chunk k iff space[k] <= j < space[k+1] (np.digitize, right=False)
        bnd = np.ceil(space).astype(np.int64)
        bnd[:, -1] = ii  # the last chunk also takes j == i - 1 ... i (digitize puts j < i below space[-1] = i)
        S = C[bnd[:, 1:]] - C[bnd[:, :-1]]
        Z = NZ[bnd[:, 1:]] - NZ[bnd[:, :-1]]
        q_log = np.where(Z > 0, S * np.log(np.where(Z > 0, S, 1.0) / np.maximum(Z, 1)), 0.0)
        outl = total - C[ii]
        last = b[ii - 1]
        # sum p log p with p = bins[:i], p[i-1] += outliers
        sum_plogp = PL[ii] - np.where(last > 0, last * np.log(np.where(last > 0, last, 1.0)), 0.0)
        plast = last + outl
        sum_plogp += np.where(plast > 0, plast * np.log(np.where(plast > 0, plast, 1.0)), 0.0)
        # sum p log q: q_j = S_k / Z_k on the non-zero bins of chunk k; the outliers sit in the last chunk
        q_last_chunk = np.where(Z[:, -1] > 0, S[:, -1] / np.maximum(Z[:, -1], 1), 0.0)
        sum_plogq = q_log.sum(axis=1) + np.where(outl > 0, outl * np.log(np.where(q_last_chunk > 0, q_last_chunk, 1.0)), 0.0)
        P, Q = total, C[ii]
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = (sum_plogp - sum_plogq) / P - np.log(P) + np.log(Q)
        kl = np.where((outl > 0) & (last == 0), np.inf, kl)  # p > 0 where q == 0
        kl = np.where(Q > 0, kl, np.nan)
        out[lo:lo + 512] = kl
    return cands, out


def amax_entropy(stats: TensorStats, num_bits: int = 8, unsigned: bool = False, stride: int = 1,
                 start_bin: int = 128) -> float:
    """TensorRT's KL calibration as pytorch-quantization's `_compute_amax_entropy` does it (LAST argmin)."""
    counts, edges = stats.occupied()
    if counts.sum() == 0 or stats.amax == 0:
        return _finish(stats, 0.0)
    bins = counts.astype(np.float64)
    if len(bins) > 1:
        bins[0] = bins[1]
    nq = 1 << (num_bits - 1 + int(unsigned))
    if len(bins) < start_bin:  # the reference loop would be empty (our histograms always have > nbins/2 bins)
        return _finish(stats, edges[-1])
    cands, approx = _kl_closed_form(bins, start_bin, nq, stride)
    finite = np.isfinite(approx)
    if not finite.any():  # all inf/nan: decide with the exact loop (rare, small)
        close = np.arange(len(cands))
    else:
        best = approx[finite].min()
        tol = 1e-7 * max(abs(best), 1e-6) + 1e-9
        close = np.flatnonzero(finite & (approx <= best + tol))
    exact = np.array([_kl_reference(bins, int(cands[j]), nq) for j in close])
    # np.argmin over the reversed list = the last index of the minimum (nan compares as np.argmin does)
    pick = close[len(exact) - 1 - int(np.argmin(exact[::-1]))]
    return _finish(stats, edges[int(cands[pick])])


# --------------------------------------------------------------------------- mse
def amax_mse(stats: TensorStats, num_bits: int = 8, unsigned: bool = False, stride: int = 1,
             start_bin: int = 128) -> float:
    """pytorch-quantization `_compute_amax_mse`: amax = centers[i] minimising sum(count * (fq(c) - c)^2)."""
    counts, edges = stats.occupied()
    if counts.sum() == 0 or stats.amax == 0:
        return _finish(stats, 0.0)
    centers = (edges[1:] + edges[:-1]) / 2
    cnt = counts.astype(np.float64)
    qmax = float((1 << (num_bits - 1 + int(unsigned))) - 1)
    cand = np.arange(start_bin, len(centers), stride)
    if cand.size == 0:
        return _finish(stats, edges[-1])
    keep = cnt > 0  # empty bins add nothing: drop them from the inner dimension
    c, w = centers[keep], cnt[keep]
    errs = np.empty(cand.size)
    step = max(1, (1 << 22) // max(c.size, 1))
    for lo in range(0, cand.size, step):
        amax = centers[cand[lo:lo + step]][:, None]
        scale = qmax / amax
        fq = np.clip(np.round(c[None, :] * scale), -qmax, qmax) / scale
        errs[lo:lo + step] = ((fq - c[None, :]) ** 2 * w[None, :]).sum(axis=1)
    return _finish(stats, centers[cand[int(np.argmin(errs))]])


# --------------------------------------------------------------------------- all at once
def method_key(method: str, percentile: float | None = None) -> str:
    return f"percentile_{percentile:g}" if method == "percentile" else method


def parse_methods(text: str | list[str], percentiles=DEFAULT_PERCENTILES) -> list[str]:
    """'max,percentile,entropy,mse' -> table keys ('percentile' expands to one key per percentile;
    'percentile_99.9' names one)."""
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    keys: list[str] = []
    for item in items:
        if item == "percentile":
            keys += [method_key("percentile", p) for p in percentiles]
        elif item.startswith("percentile_"):
            try:
                p = float(item.split("_", 1)[1])
            except ValueError:
                raise WorkbenchError(f"bad percentile method {item!r}: expected e.g. percentile_99.99") from None
            if not 0 < p <= 100:
                raise WorkbenchError(f"bad percentile method {item!r}: the percentile must be in (0, 100]")
            keys.append(method_key("percentile", p))
        elif item in METHODS:
            keys.append(item)
        else:
            raise WorkbenchError(f"unknown calibration method {item!r}: choose from {', '.join(METHODS)} "
                                 "or percentile_<p>")
    if not keys:
        raise WorkbenchError("no calibration method given")
    return list(dict.fromkeys(keys))


def compute_amax(stats: TensorStats, key: str, num_bits: int = 8) -> float:
    if key == "max":
        return amax_max(stats)
    if key == "entropy":
        return amax_entropy(stats, num_bits=num_bits)
    if key == "mse":
        return amax_mse(stats, num_bits=num_bits)
    if key.startswith("percentile_"):
        return amax_percentile(stats, float(key.split("_", 1)[1]))
    raise WorkbenchError(f"unknown calibration method {key!r}")


def compute_all(stats: TensorStats, keys: list[str], num_bits: int = 8) -> dict[str, float]:
    return {k: compute_amax(stats, k, num_bits) for k in keys}
