"""Deterministic hackathon-grid feeds for timing an engine (bs x sl cases), from the engine's own I/O signature.

Encoder case (bs, sl): speech [bs, sl, 80] (real feature frames cropped from a corpus pool when one is given,
else normal(10, 3) noise, about the level of the corpus's log-mel features), speech_lengths = sl.
Decoder case (bs, sl): encoder_out [bs, sl, d] normal(0, 1) with d from the model, encoder_out_lens = sl,
10 hypotheses of random tokens ([sos] + 1..62 tokens + eos padding to 64, reversed copy), ctc_score < 0.
The output check with real beams is `evaluation.hackathon.make_cases`; timing does not depend on token values.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from calibration_data.text import DEFAULT_VOCAB
from evaluation.hackathon import BATCH_SIZES, SEQ_LENS
from evaluation.interface import BEAM, FEATURE_DIM, MAX_HYP_LEN, MAX_HYP_PAD
from core.errors import WorkbenchError

Cases = dict[tuple[int, int], dict[str, np.ndarray]]


def model_dims(io: dict) -> tuple[int | None, int]:
    """(d_model from the decoder's encoder_out input or None, vocab size from decoder_out/ctc_log_probs or 31)."""
    d = io["inputs"].get("encoder_out", {}).get("shape", [None])[-1]
    vocab = None
    for name in ("decoder_out", "ctc_log_probs"):
        last = io["outputs"].get(name, {}).get("shape", [None])[-1]
        if isinstance(last, int) and last > 0:
            vocab = last
            break
    return (d if isinstance(d, int) and d > 0 else None), (vocab or len(DEFAULT_VOCAB))


def _speech(rng: np.random.Generator, bs: int, sl: int, pool: Sequence[np.ndarray] | None) -> np.ndarray:
    if not pool:
        return (rng.standard_normal((bs, sl, FEATURE_DIM)) * 3 + 10).astype(np.float32)
    speech = np.empty((bs, sl, FEATURE_DIM), dtype=np.float32)
    for b in range(bs):
        utt = np.asarray(pool[rng.integers(len(pool))], dtype=np.float32)
        tiled = np.tile(utt, (-(-sl // len(utt)) + 1, 1))  # long enough for any start within the utterance
        start = int(rng.integers(len(utt)))
        speech[b] = tiled[start:start + sl]
    return speech


def bench_cases(io: dict, kind: str, batch_sizes: Sequence[int] = BATCH_SIZES, seq_lens: Sequence[int] = SEQ_LENS,
                seed: int = 0, feats_pool: Sequence[np.ndarray] | None = None) -> Cases:
    """{(bs, sl): feeds} for the model whose `engines.base.onnx_io` signature is `io` (engine.json's "io")."""
    cases: Cases = {}
    d, vocab = model_dims(io)
    for bs in batch_sizes:
        for sl in seq_lens:
            if bs < 1 or sl < 1:
                raise WorkbenchError(f"batch sizes and sequence lengths must be positive, got bs={bs} sl={sl}")
            rng = np.random.default_rng([seed, 0 if kind == "encoder" else 1, bs, sl])
            if kind == "encoder":
                feeds = {"speech": _speech(rng, bs, sl, feats_pool), "speech_lengths": np.full(bs, sl, np.int32)}
            elif kind == "decoder":
                if d is None:
                    raise WorkbenchError("the decoder's encoder_out input has no static last dimension (d_model)")
                sos_eos = vocab - 1
                hyps = np.full((bs, BEAM, MAX_HYP_PAD), sos_eos, dtype=np.int64)
                r_hyps = hyps.copy()
                n = rng.integers(1, MAX_HYP_LEN + 1, size=(bs, BEAM))
                for b in range(bs):
                    for k in range(BEAM):
                        toks = rng.integers(2, max(sos_eos, 3), size=n[b, k])
                        hyps[b, k, 1:1 + n[b, k]] = toks
                        r_hyps[b, k, 1:1 + n[b, k]] = toks[::-1]
                feeds = {"encoder_out": rng.standard_normal((bs, sl, d)).astype(np.float32),
                         "encoder_out_lens": np.full(bs, sl, np.int32), "hyps_pad_sos_eos": hyps,
                         "hyps_lens_sos": (n + 1).astype(np.int32), "r_hyps_pad_sos_eos": r_hyps,
                         "ctc_score": (-10 * rng.random((bs, BEAM))).astype(np.float32)}
            else:
                raise WorkbenchError(f"unknown model kind {kind!r}: expected 'encoder' or 'decoder'")
            cases[(bs, sl)] = {k: v for k, v in feeds.items() if k in io["inputs"]}
    return cases


def corpus_pool(split: str = "calib", limit: int = 64) -> tuple[list[np.ndarray] | None, str]:
    """Feature matrices of a corpus split if it is on disk, else (None, why); never generates a corpus."""
    from calibration_data.corpus import default_cache_dir, load_split

    try:
        s = load_split(default_cache_dir(), split)
    except WorkbenchError as e:
        return None, f"random features ({e})"
    return [s.features(i) for i in range(min(len(s), limit))], f"corpus split {split!r} ({min(len(s), limit)} utterances)"
