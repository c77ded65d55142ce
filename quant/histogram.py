"""Running statistics of one tensor: min, max, count and an |x| histogram whose range grows exactly.

The histogram has `nbins` bins of width `2**e` over [0, nbins * 2**e). When a batch brings a value at or past the
top edge, the width doubles (adjacent bin pairs are summed) until it fits. Because every width is a power of two,
the bin index of a value, floor(|x| * 2**-e), is computed exactly in floating point, and the bins of width 2**(e+1)
are exactly unions of pairs of bins of width 2**e. So the final histogram is a pure function of the multiset of
values seen: it does not depend on batch size or order at all (not merely "within a bin").

After the last doubling the maximum lies in the upper half of the range, so between nbins/2 + 1 and nbins bins
are occupied; `occupied()` returns the histogram cut at the bin holding the maximum, which is what the range
methods (`quant.methods`) work on, as pytorch-quantization's histogram ends at the maximum.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

DEFAULT_BINS = 2048


class NonFiniteError(ValueError):
    """`TensorStats.update` got NaN or Inf; raised before any statistic changed."""


@dataclass
class TensorStats:
    """Statistics of one tensor over everything fed to `update`. Memory: O(nbins), whatever the data."""

    name: str
    nbins: int = DEFAULT_BINS
    count: int = 0
    min: float = math.inf
    max: float = -math.inf
    exponent: int | None = None  # bin width is 2**exponent; None until a non-zero value was seen
    counts: np.ndarray = field(default=None, repr=False)  # int64 [nbins]

    def __post_init__(self):
        if self.nbins < 256 or self.nbins & (self.nbins - 1):
            raise ValueError(f"histogram bins must be a power of two >= 256, got {self.nbins}")
        if self.counts is None:
            self.counts = np.zeros(self.nbins, dtype=np.int64)

    # ------------------------------------------------------------------ update
    @property
    def amax(self) -> float:
        """max |x| seen (0.0 before any value)."""
        if self.count == 0:
            return 0.0
        return float(max(abs(self.min), abs(self.max)))

    @property
    def bin_width(self) -> float:
        return 0.0 if self.exponent is None else math.ldexp(1.0, self.exponent)

    @property
    def top(self) -> float:
        """Upper edge of the histogram range."""
        return self.nbins * self.bin_width

    def _first_exponent(self, amax: float) -> int:
        """Smallest e with amax < nbins * 2**e (so amax >= nbins * 2**(e-1): the upper half is occupied)."""
        m, e = math.frexp(amax)  # amax = m * 2**e, 0.5 <= m < 1, so amax < 2**e
        e -= int(math.log2(self.nbins))
        while amax >= self.nbins * math.ldexp(1.0, e):
            e += 1
        while amax < self.nbins * math.ldexp(1.0, e - 1):
            e -= 1
        return e

    def _coarsen(self, k: int) -> None:
        """Double the bin width k times (exact: each new bin is the sum of two old ones)."""
        for _ in range(k):
            self.counts = np.concatenate([self.counts.reshape(-1, 2).sum(axis=1),
                                          np.zeros(self.nbins // 2, dtype=np.int64)])
            self.exponent += 1

    def _grow_to(self, amax: float) -> None:
        """Make amax < top, merging bin pairs as needed; the first call picks the exponent."""
        if self.exponent is None:
            zeros = self.counts[0]  # all-zero batches seen before: they stay in bin 0
            self.exponent = self._first_exponent(amax)
            self.counts[0] = zeros
            return
        k = 0
        while amax >= self.nbins * math.ldexp(1.0, self.exponent + k):
            k += 1
        self._coarsen(k)

    def update(self, values: np.ndarray) -> None:
        """Add float values (any shape); NaN or Inf raises NonFiniteError and changes nothing."""
        if values.size == 0:
            return
        vmin, vmax = float(values.min()), float(values.max())
        if not (math.isfinite(vmin) and math.isfinite(vmax)):  # min/max propagate NaN and reach Inf
            raise NonFiniteError(self.name)
        self.min = min(self.min, vmin)
        self.max = max(self.max, vmax)
        self.count += int(values.size)
        amax = max(abs(vmin), abs(vmax))
        if amax == 0.0:
            self.counts[0] += values.size  # all zeros: bin 0 whatever the width
            return
        self._grow_to(amax)
        a = np.abs(values).ravel()
        if a.dtype != np.float64:
            a = a.astype(np.float32, copy=False)
        # Multiplying by a power of two is exact, and the cast truncates toward zero: an exact floor for a >= 0.
        if a.dtype == np.float32 and -126 <= -self.exponent <= 127:
            idx = (a * np.float32(math.ldexp(1.0, -self.exponent))).astype(np.int32)
        else:  # float64 data, or a factor float32 cannot hold: float64 (still exact)
            idx = (a.astype(np.float64, copy=False) * math.ldexp(1.0, -self.exponent)).astype(np.int64)
        np.minimum(idx, self.nbins - 1, out=idx)  # only reachable through float32 rounding of huge values
        self.counts += np.bincount(idx, minlength=self.nbins)

    def merge(self, other: "TensorStats") -> None:
        """Add another TensorStats of the same tensor (exact: widths are powers of two)."""
        if other.nbins != self.nbins:
            raise ValueError("cannot merge histograms with different bin counts")
        if other.count == 0:
            return
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self.count += other.count
        if other.exponent is None:
            self.counts[0] += other.counts[0]
            return
        theirs = TensorStats(other.name, other.nbins, exponent=other.exponent, counts=other.counts.copy())
        self._grow_to(other.amax)
        theirs._coarsen(self.exponent - theirs.exponent)
        self.counts += theirs.counts

    # ------------------------------------------------------------------ views
    def occupied(self) -> tuple[np.ndarray, np.ndarray]:
        """(counts, edges) cut after the last non-empty bin: len(edges) == len(counts) + 1, edges[0] == 0."""
        nz = np.flatnonzero(self.counts)
        n = int(nz[-1]) + 1 if nz.size else 1
        width = self.bin_width if self.exponent is not None else 1.0
        edges = np.arange(n + 1, dtype=np.float64) * width
        return self.counts[:n].copy(), edges

    def summary(self, quantiles=(0.5, 0.9, 0.99, 0.999, 0.9999)) -> dict:
        counts, edges = self.occupied()
        total = counts.sum()
        out = {"bin_width": self.bin_width, "nbins": self.nbins, "occupied_bins": int(len(counts)),
               "nonzero_bins": int(np.count_nonzero(counts)), "abs_quantiles": {}}
        if total:
            cdf = np.cumsum(counts) / total
            for q in quantiles:  # upper edge of the bin where the |x| cdf reaches q (capped at max |x|)
                i = int(np.searchsorted(cdf, q))
                out["abs_quantiles"][str(q)] = float(min(edges[min(i + 1, len(edges) - 1)], self.amax))
        return out
