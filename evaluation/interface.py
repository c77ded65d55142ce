"""The encoder/decoder ONNX interface of WeNet's `export_onnx_gpu.py` (beam 10)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FEATURE_DIM = 80
BEAM = 10
MAX_HYP_PAD = 64  # hyps_pad_sos_eos width: [sos] + at most 62 tokens + [eos]
MAX_HYP_LEN = MAX_HYP_PAD - 2
MISSING_HYP_SCORE = -1e4  # ctc_score of absent hypotheses; finite so the decoder's arithmetic stays finite


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: type
    rank: int
    optional: bool = False  # may be absent from an exported model
    last_dim: int | None = None


ENCODER_INPUTS = (
    TensorSpec("speech", np.float32, 3, last_dim=FEATURE_DIM),
    TensorSpec("speech_lengths", np.int32, 1),
)
ENCODER_OUTPUTS = (
    TensorSpec("encoder_out", np.float32, 3),
    TensorSpec("encoder_out_lens", np.int32, 1),
    TensorSpec("ctc_log_probs", np.float32, 3),
    TensorSpec("beam_log_probs", np.float32, 3),
    TensorSpec("beam_log_probs_idx", np.int64, 3),
)
DECODER_INPUTS = (
    TensorSpec("encoder_out", np.float32, 3),
    TensorSpec("encoder_out_lens", np.int32, 1),
    TensorSpec("hyps_pad_sos_eos", np.int64, 3),
    TensorSpec("hyps_lens_sos", np.int32, 2),
    # WeNet prunes the right-to-left input when the model was exported with reverse_weight == 0.
    TensorSpec("r_hyps_pad_sos_eos", np.int64, 3, optional=True),
    TensorSpec("ctc_score", np.float32, 2),
)
DECODER_OUTPUTS = (
    TensorSpec("best_index", np.int64, 1),
    TensorSpec("decoder_out", np.float32, 4, optional=True),
)

INTERFACES = {
    "encoder": (ENCODER_INPUTS, ENCODER_OUTPUTS),
    "decoder": (DECODER_INPUTS, DECODER_OUTPUTS),
}


def encoder_out_length(frames):
    """T' of the conv2d subsampling by 4: ((T-1)//2-1)//2 (works on ints and integer arrays)."""
    return ((frames - 1) // 2 - 1) // 2
