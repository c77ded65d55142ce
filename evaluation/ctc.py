"""CTC decoding: greedy collapse and WeNet's prefix beam search over per-frame top-k candidates."""
from __future__ import annotations

import math

import numpy as np

_NEG_INF = -math.inf


def _log_add(*xs: float) -> float:
    m = max(xs)
    if m == _NEG_INF:  # all -inf: exp(x - m) would be nan
        return _NEG_INF
    return m + math.log(sum(math.exp(x - m) for x in xs))


def ctc_greedy(log_probs_or_top1_ids: np.ndarray, length: int, blank: int = 0) -> list[int]:
    """Best path: [T,V] log-probs (argmax taken) or [T] top-1 ids; collapse repeats, drop blanks."""
    ids = np.asarray(log_probs_or_top1_ids)
    if ids.ndim == 2:
        ids = ids.argmax(axis=-1)
    out, prev = [], None
    for s in ids[:length].tolist():
        if s != prev and s != blank:
            out.append(int(s))
        prev = s
    return out


def ctc_prefix_beam_search(
    topk_logp: np.ndarray, topk_idx: np.ndarray, length: int, beam: int = 10, blank: int = 0
) -> list[tuple[tuple[int, ...], float]]:
    """WeNet's `ctc_prefix_beam_search` (wenet/transformer/search.py) on [T,K] top-k candidates.

    Each prefix keeps (pb, nb): log-probability of its alignments ending in blank / non-blank.
    Returns up to `beam` (prefix, logaddexp(pb, nb)) pairs, best first; [((), 0.0)] for length 0.
    """
    hyps: list[tuple[tuple[int, ...], tuple[float, float]]] = [((), (0.0, _NEG_INF))]
    logp_rows = np.asarray(topk_logp, dtype=np.float64)[:length].tolist()
    idx_rows = np.asarray(topk_idx)[:length].tolist()
    for logp, idx in zip(logp_rows, idx_rows):
        nxt: dict[tuple[int, ...], list[float]] = {}

        def slot(prefix):
            return nxt.setdefault(prefix, [_NEG_INF, _NEG_INF])

        for s, ps in zip(idx, logp):
            for prefix, (pb, nb) in hyps:
                last = prefix[-1] if prefix else None
                if s == blank:
                    acc = slot(prefix)
                    acc[0] = _log_add(acc[0], pb + ps, nb + ps)
                elif s == last:
                    # "a a" without a blank between collapses into the same prefix ...
                    acc = slot(prefix)
                    acc[1] = _log_add(acc[1], nb + ps)
                    # ... while "a <blank> a" extends it by a second 'a'.
                    acc = slot(prefix + (s,))
                    acc[1] = _log_add(acc[1], pb + ps)
                else:
                    acc = slot(prefix + (s,))
                    acc[1] = _log_add(acc[1], pb + ps, nb + ps)
        ranked = sorted(nxt.items(), key=lambda kv: _log_add(*kv[1]), reverse=True)
        # Unlike WeNet, drop zero-probability prefixes (an "a a" extension when "a" has no blank-ending
        # alignment): they would otherwise reach the decoder with a -inf ctc_score.
        hyps = [(p, (pb, nb)) for p, (pb, nb) in ranked[:beam] if _log_add(pb, nb) > _NEG_INF]
    return [(p, _log_add(pb, nb)) for p, (pb, nb) in hyps]
