"""Corpus-level character and word error rates.

The edit distance is written out here rather than taken from a library: it is a dozen lines,
and keeping it dependency-free means the evaluator runs wherever numpy does.
"""
from __future__ import annotations

from typing import Sequence

from calibration_data.text import normalize


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def _corpus_errors(refs: Sequence[Sequence], hyps: Sequence[Sequence]) -> tuple[int, int, float]:
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    errors = sum(edit_distance(r, h) for r, h in zip(refs, hyps))
    ref_len = sum(len(r) for r in refs)
    # With no reference symbols at all the rate is undefined: report 0 when nothing was inserted,
    # otherwise inf (rather than raising) so a report over an odd test set still prints.
    if ref_len == 0:
        rate = 0.0 if errors == 0 else float("inf")
    else:
        rate = errors / ref_len
    return errors, ref_len, rate


def cer(refs: Sequence[str], hyps: Sequence[str]) -> dict:
    """Character error rate over normalised text, spaces counted as characters."""
    errors, ref_len, rate = _corpus_errors([normalize(r) for r in refs], [normalize(h) for h in hyps])
    return {"errors": errors, "ref_len": ref_len, "cer": rate}


def wer(refs: Sequence[str], hyps: Sequence[str]) -> dict:
    """Word error rate over whitespace-split words of the normalised text."""
    errors, ref_len, rate = _corpus_errors(
        [normalize(r).split() for r in refs], [normalize(h).split() for h in hyps]
    )
    return {"errors": errors, "ref_len": ref_len, "wer": rate}
