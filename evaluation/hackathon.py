"""TensorRT Hackathon 2022 output check: a candidate engine pair against an FP32 reference pair.

The grid, the error measures and the pass thresholds are those of the hackathon's WeNet test script.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from evaluation.asr import MIN_FRAMES, check_feats, decoder_feeds, only_inputs_of, prefix_beam_batch
from evaluation.interface import BEAM, FEATURE_DIM
from evaluation.runners import Runner
from core.errors import WorkbenchError

BATCH_SIZES = (1, 4, 16)
SEQ_LENS = (16, 64, 256)

ENCODER_EPSILON = 5e-5
ENCODER_MAX_ABS = 3.5e-2
ENCODER_MEDIAN_REL = 2e-3
DECODER_EPSILON = 1e-5
DECODER_MAX_ABS = 4e-1
DECODER_MEDIAN_REL = 2e-4
LENS_OR_INDEX_EPSILON = 1e-5  # the hackathon's check() default, used for encoder_out_lens and best_index
LENS_OR_INDEX_MEDIAN_REL = 1e-1


@dataclass(frozen=True)
class _Criteria:
    output: str
    lens_or_index: str
    epsilon: float
    max_abs: float
    median_rel: float


_CRITERIA = {
    "encoder": _Criteria("encoder_out", "encoder_out_lens", ENCODER_EPSILON, ENCODER_MAX_ABS, ENCODER_MEDIAN_REL),
    "decoder": _Criteria("decoder_out", "best_index", DECODER_EPSILON, DECODER_MAX_ABS, DECODER_MEDIAN_REL),
}


def check(a: np.ndarray, b: np.ndarray, epsilon: float) -> tuple[float, float]:
    """(max|a-b|, median(|a-b| / (|b| + epsilon))) with `b` the reference, as the hackathon computed them."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    diff = np.abs(a - b)
    return float(diff.max()), float(np.median(diff / (np.abs(b) + epsilon)))


def _speech(rng: np.random.Generator, pool: Sequence[np.ndarray], bs: int, frames: int):
    """[bs, frames, 80] of real feature frames (cropped or tiled), a few rows shorter and zero-padded."""
    lengths = np.full(bs, frames, dtype=np.int32)
    n_short = bs // 4 if frames > MIN_FRAMES else 0
    lengths[rng.choice(bs, n_short, replace=False)] = rng.integers(MIN_FRAMES, frames, size=n_short)
    speech = np.zeros((bs, frames, FEATURE_DIM), dtype=np.float32)
    for b in range(bs):
        utt = pool[rng.integers(len(pool))]
        start = int(rng.integers(max(len(utt) - frames, 0) + 1))
        tiled = np.tile(utt, (-(-(start + frames) // len(utt)), 1))  # repeat utterances shorter than needed
        speech[b, : lengths[b]] = tiled[start : start + lengths[b]]
    return speech, lengths


def make_cases(
    ref_encoder: Runner,
    feats_pool: Sequence[np.ndarray],
    batch_sizes: Sequence[int] = BATCH_SIZES,
    seq_lens: Sequence[int] = SEQ_LENS,
    seed: int = 0,
) -> dict:
    """{"encoder": {(bs, sl): feeds}, "decoder": {(bs, sl): feeds}}; a decoder case's sl is T' of encoder_out."""
    pool = check_feats(feats_pool)
    cases: dict = {"encoder": {}, "decoder": {}}
    for bs in batch_sizes:
        for sl in seq_lens:
            # One generator per case, so changing the grid does not change the other cases.
            speech, lengths = _speech(np.random.default_rng([seed, 0, bs, sl]), pool, bs, sl)
            cases["encoder"][(bs, sl)] = {"speech": speech, "speech_lengths": lengths}

            speech, lengths = _speech(np.random.default_rng([seed, 1, bs, sl]), pool, bs, 4 * sl + 3)
            enc = ref_encoder.run(only_inputs_of(ref_encoder, {"speech": speech, "speech_lengths": lengths}))
            if enc["encoder_out"].shape[1] != sl:
                raise WorkbenchError(
                    f"the reference encoder gave {enc['encoder_out'].shape[1]} frames for {4 * sl + 3} input "
                    f"frames; WeNet's subsampling by 4 gives {sl}"
                )
            sos_eos = enc["ctc_log_probs"].shape[-1] - 1
            nbests = prefix_beam_batch(enc, BEAM)
            cases["decoder"][(bs, sl)] = decoder_feeds(enc["encoder_out"], enc["encoder_out_lens"], nbests, sos_eos)
    return cases


def _output(model: str, outputs: dict, name: str, which: str) -> np.ndarray:
    if name not in outputs:
        raise WorkbenchError(f"the {which} {model} has no output {name}, which the hackathon check compares")
    return outputs[name]


def run_check(
    ref_encoder: Runner, ref_decoder: Runner, cand_encoder: Runner, cand_decoder: Runner, cases: dict
) -> list[dict]:
    """One row per model and case: max_abs, median_rel, lens_or_index_median_rel, passed."""
    rows = []
    pairs = {"encoder": (ref_encoder, cand_encoder), "decoder": (ref_decoder, cand_decoder)}
    for model, (ref_runner, cand_runner) in pairs.items():
        crit = _CRITERIA[model]
        for (bs, sl), feeds in cases[model].items():
            ref = ref_runner.run(only_inputs_of(ref_runner, feeds))
            cand = cand_runner.run(only_inputs_of(cand_runner, feeds))
            measures = []
            for name, epsilon in ((crit.output, crit.epsilon), (crit.lens_or_index, LENS_OR_INDEX_EPSILON)):
                a = _output(model, cand, name, "candidate")
                b = _output(model, ref, name, "reference")
                if a.shape != b.shape:
                    raise WorkbenchError(
                        f"{model} case bs={bs} sl={sl}: candidate {name} has shape {a.shape}, reference {b.shape}"
                    )
                measures.append(check(a, b, epsilon))
            (max_abs, median_rel), (_, lens_rel) = measures
            rows.append({
                "model": model,
                "bs": bs,
                "sl": sl,
                "max_abs": max_abs,
                "median_rel": median_rel,
                "lens_or_index_median_rel": lens_rel,
                # NaN compares False, so an engine producing NaN fails.
                "passed": bool(
                    max_abs < crit.max_abs and median_rel < crit.median_rel and lens_rel < LENS_OR_INDEX_MEDIAN_REL
                ),
            })
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """Plain-text score table, one line per model and case, as the hackathon printed it."""
    rule = "--------+----+----+---------+---------+---------+-------------"
    lines = [
        "a0: max abs difference of encoder_out / decoder_out; r0: its median relative difference",
        "r1: median relative difference of encoder_out_lens / best_index",
        rule,
        "   model|  bs|  sl|       a0|       r0|       r1| output check",
        rule,
    ]
    for r in rows:
        lines.append(
            f"{r['model']:>8}|{r['bs']:>4}|{r['sl']:>4}|{r['max_abs']:>9.3e}|{r['median_rel']:>9.3e}|"
            f"{r['lens_or_index_median_rel']:>9.3e}| {'Good' if r['passed'] else 'Bad'}"
        )
    lines.append(rule)
    passed = sum(r["passed"] for r in rows)
    lines.append(f"{passed}/{len(rows)} cases passed")
    return "\n".join(lines)
