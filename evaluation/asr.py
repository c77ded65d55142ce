"""End-to-end recognition through an encoder runner and a decoder runner (WeNet's GPU pipeline)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from tqdm import tqdm

from calibration_data.text import CharVocab
from evaluation.ctc import ctc_greedy, ctc_prefix_beam_search
from evaluation.interface import BEAM, FEATURE_DIM, MAX_HYP_LEN, MAX_HYP_PAD, MISSING_HYP_SCORE
from evaluation.metrics import cer, wer
from evaluation.runners import Runner
from core.errors import WorkbenchError

MIN_FRAMES = 7  # fewest frames that leave one encoder frame after subsampling by 4

NBest = list[tuple[tuple[int, ...], float]]


def check_feats(feats: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Validate [T,80] finite feature matrices; returns them as float32."""
    if len(feats) == 0:
        raise WorkbenchError("no utterances to recognise: the feature list is empty")
    out = []
    for i, f in enumerate(feats):
        f = np.asarray(f)
        if f.ndim != 2 or f.shape[1] != FEATURE_DIM:
            raise WorkbenchError(f"utterance {i}: features must be [frames, {FEATURE_DIM}], got shape {f.shape}")
        if f.shape[0] < MIN_FRAMES:
            raise WorkbenchError(f"utterance {i}: {f.shape[0]} frames, at least {MIN_FRAMES} are needed")
        if not np.isfinite(f).all():
            raise WorkbenchError(f"utterance {i}: features contain NaN or Inf")
        out.append(f.astype(np.float32, copy=False))
    return out


def pad_batch(feats: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad to the longest utterance: (`speech` [B,T,F] float32, `speech_lengths` [B] int32)."""
    lengths = np.array([len(f) for f in feats], dtype=np.int32)
    dim = feats[0].shape[1] if np.ndim(feats[0]) == 2 else FEATURE_DIM
    speech = np.zeros((len(feats), int(lengths.max()), dim), dtype=np.float32)
    for b, f in enumerate(feats):
        speech[b, : len(f)] = f
    return speech, lengths


def prefix_beam_batch(encoder_outputs: dict[str, np.ndarray], beam: int = BEAM) -> list[NBest]:
    """CTC prefix beam search of every row, on the encoder's own top-k outputs."""
    logp, idx = encoder_outputs["beam_log_probs"], encoder_outputs["beam_log_probs_idx"]
    lens = encoder_outputs["encoder_out_lens"]
    return [ctc_prefix_beam_search(logp[b], idx[b], int(lens[b]), beam) for b in range(len(lens))]


def decoder_feeds(
    encoder_out: np.ndarray, encoder_out_lens: np.ndarray, nbests: Sequence[NBest], sos_eos: int, beam: int = BEAM
) -> dict[str, np.ndarray]:
    """The decoder's inputs: [sos]+hyp+[eos] rows (and reversed), eos-padded to 64, for `beam` hyps each."""
    batch = len(nbests)
    # sos == eos, so filling with it gives the leading sos and the eos padding in one go.
    hyps = np.full((batch, beam, MAX_HYP_PAD), sos_eos, dtype=np.int64)
    r_hyps = np.full((batch, beam, MAX_HYP_PAD), sos_eos, dtype=np.int64)
    hyps_lens = np.ones((batch, beam), dtype=np.int32)  # an absent hypothesis is the empty one
    scores = np.full((batch, beam), MISSING_HYP_SCORE, dtype=np.float32)
    for b, nbest in enumerate(nbests):
        for k, (hyp, score) in enumerate(nbest[:beam]):
            hyp = list(hyp[:MAX_HYP_LEN])
            hyps[b, k, 1 : 1 + len(hyp)] = hyp
            r_hyps[b, k, 1 : 1 + len(hyp)] = hyp[::-1]
            hyps_lens[b, k] = len(hyp) + 1
            scores[b, k] = score
    return {
        "encoder_out": encoder_out,
        "encoder_out_lens": encoder_out_lens,
        "hyps_pad_sos_eos": hyps,
        "hyps_lens_sos": hyps_lens,
        "r_hyps_pad_sos_eos": r_hyps,
        "ctc_score": scores,
    }


def decoder_calibration_feeds(encoder: Runner, decoder_inputs: Sequence[str], feats: Sequence[np.ndarray],
                              batch_size: int, progress: bool = False) -> list[dict[str, np.ndarray]]:
    """Decoder inputs as WeNet's pipeline produces them, one feed dict per batch of `feats`: the FP32 `encoder`'s
    outputs and the CTC prefix beam search's hypotheses, restricted to `decoder_inputs` (the names the decoder
    takes: a reverse_weight-0 export lacks `r_hyps_pad_sos_eos`). <sos/eos> is the last output unit, as in
    every WeNet vocabulary."""
    feats = check_feats(feats)
    out = []
    for s in tqdm(range(0, len(feats), batch_size), desc="decoder feeds", unit="batch", disable=not progress):
        speech, lens = pad_batch(feats[s:s + batch_size])
        enc = encoder.run({"speech": speech, "speech_lengths": lens})
        sos_eos = enc["ctc_log_probs"].shape[-1] - 1
        feeds = decoder_feeds(enc["encoder_out"], enc["encoder_out_lens"], prefix_beam_batch(enc), sos_eos)
        out.append({name: feeds[name] for name in decoder_inputs if name in feeds})
    return out


def only_inputs_of(runner: Runner, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop feeds the model does not take (WeNet prunes `r_hyps_pad_sos_eos` when reverse_weight is 0)."""
    return {name: value for name, value in feeds.items() if name in runner.input_names}


def recognize(
    encoder: Runner,
    decoder: Runner,
    feats: Sequence[np.ndarray],
    vocab: CharVocab,
    batch_size: int = 16,
    beam: int = BEAM,
    progress: bool = False,
) -> list[dict]:
    """Per utterance (input order): `ctc_greedy`, `ctc_prefix` and attention-`rescored` texts."""
    feats = check_feats(feats)
    # Longest first, so a batch pads little; results go back to their input positions.
    order = np.argsort([-len(f) for f in feats], kind="stable")
    results: list[dict] = [{} for _ in feats]
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="recognise", unit="batch", disable=not progress):
        ids = order[start : start + batch_size]
        speech, speech_lengths = pad_batch([feats[i] for i in ids])
        enc = encoder.run({"speech": speech, "speech_lengths": speech_lengths})
        if not np.isfinite(enc["ctc_log_probs"]).all():
            raise WorkbenchError("the encoder produced NaN or Inf CTC log-probabilities: its weights or its "
                                 "quantization are broken (check the model with `wb check` against FP32)")
        if enc["ctc_log_probs"].shape[-1] != len(vocab):
            raise WorkbenchError(
                f"the encoder has {enc['ctc_log_probs'].shape[-1]} output units but the vocabulary has {len(vocab)}"
            )
        nbests = prefix_beam_batch(enc, beam)
        feeds = decoder_feeds(enc["encoder_out"], enc["encoder_out_lens"], nbests, vocab.sos_eos, beam)
        best_index = decoder.run(only_inputs_of(decoder, feeds))["best_index"]
        # Top-1 by value rather than column 0: an engine's TopK need not return its k sorted.
        top1 = np.take_along_axis(
            enc["beam_log_probs_idx"], enc["beam_log_probs"].argmax(-1)[..., None], axis=-1
        )[..., 0]
        for b, i in enumerate(ids):
            k = int(best_index[b])
            if not 0 <= k < beam:
                raise WorkbenchError(f"utterance {i}: the decoder returned best_index {k}, outside 0..{beam - 1}")
            greedy = ctc_greedy(top1[b], int(enc["encoder_out_lens"][b]), vocab.blank)
            # The rescored text is the whole chosen hypothesis, even if its decoder input was cut to 62 tokens.
            chosen = nbests[b][k][0] if k < len(nbests[b]) else ()
            results[i] = {
                "ctc_greedy": vocab.decode(greedy),
                "ctc_prefix": vocab.decode(nbests[b][0][0]),
                "rescored": vocab.decode(chosen),
            }
    return results


def evaluate(
    encoder: Runner,
    decoder: Runner,
    feats: Sequence[np.ndarray],
    texts: Sequence[str],
    vocab: CharVocab,
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Corpus CER of the three decodings and WER of the rescored one, with per-utterance hypotheses."""
    if len(feats) != len(texts):
        raise WorkbenchError(f"{len(feats)} feature matrices but {len(texts)} transcripts")
    missing = vocab.missing_characters(texts)
    if missing:
        raise WorkbenchError(f"the references contain {len(missing)} character(s) that no unit of the {len(vocab)}-unit "
                             f"vocabulary holds ({' '.join(repr(c) for c in missing[:10])}): the model can never output "
                             f"them, so its CER would measure the vocabulary; evaluate on data in its language")
    hyps = recognize(encoder, decoder, feats, vocab, batch_size=batch_size, progress=progress)
    for h, ref in zip(hyps, texts):
        h["ref"] = ref
    refs = list(texts)
    return {
        "cer_greedy": cer(refs, [h["ctc_greedy"] for h in hyps])["cer"],
        "cer_prefix": cer(refs, [h["ctc_prefix"] for h in hyps])["cer"],
        "cer_rescore": cer(refs, [h["rescored"] for h in hyps])["cer"],
        "wer_rescore": wer(refs, [h["rescored"] for h in hyps])["wer"],
        "n_utts": len(hyps),
        "utterances": hyps,
    }
