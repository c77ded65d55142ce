"""80-bin log-mel filterbank features, computed exactly as WeNet does (Kaldi fbank, energy floor 0)."""
from __future__ import annotations

import kaldi_native_fbank as knf
import numpy as np

from core.errors import WorkbenchError

SAMPLE_RATE = 16000
NUM_BINS = 80
FRAME_LENGTH = 400  # 25 ms
FRAME_SHIFT = 160  # 10 ms


def _options() -> knf.FbankOptions:
    opts = knf.FbankOptions()
    # Dither is added in fbank() from a seeded RNG: kaldi-native-fbank's own dither RNG cannot be seeded.
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = True
    opts.frame_opts.samp_freq = SAMPLE_RATE
    opts.frame_opts.frame_length_ms = 1000.0 * FRAME_LENGTH / SAMPLE_RATE
    opts.frame_opts.frame_shift_ms = 1000.0 * FRAME_SHIFT / SAMPLE_RATE
    opts.frame_opts.window_type = "povey"
    opts.mel_opts.num_bins = NUM_BINS
    opts.energy_floor = 0.0
    return opts


def num_frames(num_samples: int) -> int:
    """Frames Kaldi produces with snip_edges: 1 + (N - 400) // 160, or 0 for short input."""
    return 0 if num_samples < FRAME_LENGTH else 1 + (num_samples - FRAME_LENGTH) // FRAME_SHIFT


def fbank(wave: np.ndarray, dither: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Log-mel features [T, 80] float32 of a 16 kHz waveform in [-1, 1].

    With `dither` > 0, `dither * rng.standard_normal(N)` is added to the int16-scaled waveform (what Kaldi's
    dither does), drawn from `rng` so that features are reproducible.
    """
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise WorkbenchError(f"fbank expects a 1-D waveform, got shape {wave.shape}")
    if not np.issubdtype(wave.dtype, np.floating):
        raise WorkbenchError(f"fbank expects a float waveform in [-1, 1], got dtype {wave.dtype}")
    if not np.all(np.isfinite(wave)):
        raise WorkbenchError("fbank input contains NaN or infinite samples")
    if dither < 0:
        raise WorkbenchError(f"dither must be >= 0, got {dither}")
    if dither > 0 and rng is None:
        raise WorkbenchError("fbank with dither needs a seeded rng (np.random.Generator)")
    n = num_frames(len(wave))
    if n == 0:
        return np.zeros((0, NUM_BINS), dtype=np.float32)
    # WeNet feeds Kaldi int16-range samples.
    scaled = wave.astype(np.float64) * 32768.0
    if dither > 0:
        scaled += dither * rng.standard_normal(len(wave))
    computer = knf.OnlineFbank(_options())
    computer.accept_waveform(SAMPLE_RATE, scaled.astype(np.float32))
    computer.input_finished()
    return np.stack([computer.get_frame(i) for i in range(n)]).astype(np.float32)
