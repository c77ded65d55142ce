"""Choosing the fastest passing mix from paired measurements, not from timings taken minutes apart.

On a noisy machine a single sequential timing per candidate is not evidence: identical graphs were timed 835 and
1184 ms in one run, and a search shipped a mix 14 % slower than one it had found (issue 15). So the candidates
that could win are timed interleaved run by run with FP32 (engines.bench_interleaved): run i of every candidate is
taken within the same few milliseconds, so drift cancels in the per-run ratio candidate / FP32. The choice uses the
median of those paired ratios and their spread:
  * a candidate is within noise of the fastest when its per-run ratio to the fastest (median plus one standard
    error) stays within the tie tolerance;
  * among those, the one with the fewest precision boundaries (fallback layers) wins, then the most accurate,
    then the fastest: a fallback layer that buys no measurable speed is not worth its boundary.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def objective_runs(cases: Sequence[dict]) -> np.ndarray:
    """Per-run objective (sum over cases, ms) of one option in an interleaved benchmark: each case row holds
    `latencies_ms` in run order, and run i of every option and case was taken together."""
    if not cases:
        raise ValueError("no timed cases")
    return np.sum([np.asarray(c["latencies_ms"], float) for c in cases], axis=0)


def ratio_stats(ratios: np.ndarray) -> dict:
    """Median, quartiles and the standard error of the median (1.2533 sigma / sqrt(n)) of per-run ratios."""
    ratios = np.asarray(ratios, float)
    q25, med, q75 = (float(x) for x in np.percentile(ratios, [25, 50, 75]))
    se = float(1.2533 * np.std(ratios) / np.sqrt(len(ratios)))
    return {"median": med, "q25": q25, "q75": q75, "se": se, "runs": int(len(ratios))}


def choose(candidates: Sequence[dict], runs: dict[str, np.ndarray], reference: np.ndarray, tolerance: float,
           accuracy_key: Callable[[dict], float]) -> tuple[dict, dict]:
    """The candidate to ship, and how it was decided.

    candidates: {"label", "n_fallback", ...}; runs: label -> per-run objective (`objective_runs`) from one
    interleaved benchmark with `reference` (FP32); accuracy_key: lower is more accurate. The fastest is the
    lowest median ratio to the reference. Another candidate may replace it only when it is, with some confidence,
    at most `tolerance` slower: the median of its per-run ratio to the fastest plus one standard error stays
    within 1 + tolerance (measured: with 25 % run-to-run noise and drift, 30 interleaved runs and 6 candidates,
    this picks a plan within the tolerance of the truly fastest in 96 % of trials; a plain median 88 %; the old
    rule, sequential timings minutes apart, 45 %: tests/test_selection.py)."""
    vs_ref = {c["label"]: ratio_stats(runs[c["label"]] / reference) for c in candidates}
    fastest = min(candidates, key=lambda c: vs_ref[c["label"]]["median"])
    vs_fastest = {c["label"]: ratio_stats(runs[c["label"]] / runs[fastest["label"]]) for c in candidates}
    ties = [c for c in candidates
            if vs_fastest[c["label"]]["median"] + vs_fastest[c["label"]]["se"] <= 1 + tolerance]
    best = min(ties, key=lambda c: (c["n_fallback"], accuracy_key(c), vs_ref[c["label"]]["median"]))
    return best, {"fastest": fastest["label"], "within_noise": [c["label"] for c in ties], "vs_fp32": vs_ref,
                  "vs_fastest": vs_fastest, "rule": "fewest fallback layers, then most accurate, among the "
                  f"candidates whose paired ratio to the fastest (median + 1 SE) is <= {1 + tolerance:.2f}"}


def shortlist(candidates: Sequence[dict], sequential_ms: Callable[[dict], float], most: int = 6,
              band: float = 0.15) -> list[dict]:
    """The candidates worth timing side by side: all of them when few, else the `most` fastest by their sequential
    estimate plus every other one within `band` of the best estimate (its noise band)."""
    if len(candidates) <= most:
        return list(candidates)
    ranked = sorted(candidates, key=sequential_ms)
    best = sequential_ms(ranked[0])
    return ranked[:most] + [c for c in ranked[most:] if sequential_ms(c) <= best * (1 + band)]
