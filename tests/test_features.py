"""fbank against an independent numpy implementation of Kaldi's fbank (WeNet's settings)."""
import numpy as np
import pytest

from calibration_data.features import fbank, num_frames
from core.errors import WorkbenchError

SR = 16000
# knf computes in float32, the reference in float64: log-mel values agree within ATOL (observed: ~1e-4)
# for every bin within 60 dB of its frame's strongest bin. Below that, float32 rounding in the FFT
# dominates (a pure sine's far bins are ~130 dB down), so those bins are not compared.
ATOL = 1e-3
DYNAMIC_RANGE = np.log(1e6)  # 60 dB in power, as a natural-log difference


def _mel(f):
    return 1127.0 * np.log(1.0 + f / 700.0)


def _mel_banks(num_bins=80, n_fft=512, low=20.0, high=8000.0):
    """Kaldi's triangular filters, equally spaced on its mel scale; the Nyquist FFT bin is excluded."""
    mel_low, mel_high = _mel(low), _mel(high)
    delta = (mel_high - mel_low) / (num_bins + 1)
    mels = _mel(np.arange(n_fft // 2) * SR / n_fft)
    banks = np.zeros((num_bins, n_fft // 2 + 1))
    for b in range(num_bins):
        left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
        up = (mels - left) / (center - left)
        down = (right - mels) / (right - center)
        inside = (mels > left) & (mels < right)
        banks[b, : n_fft // 2] = np.where(inside, np.where(mels <= center, up, down), 0.0)
    return banks


def reference_fbank(scaled):
    """Kaldi fbank of an int16-range waveform: snip_edges, DC removal, pre-emphasis 0.97, povey window."""
    n = 1 + (len(scaled) - 400) // 160
    frames = np.stack([scaled[i * 160 : i * 160 + 400] for i in range(n)]).astype(np.float64)
    frames -= frames.mean(axis=1, keepdims=True)
    frames[:, 1:] -= 0.97 * frames[:, :-1].copy()
    frames[:, 0] -= 0.97 * frames[:, 0]
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 399)) ** 0.85
    power = np.abs(np.fft.rfft(frames * window, n=512)) ** 2
    energies = power @ _mel_banks().T
    return np.log(np.maximum(energies, np.finfo(np.float32).eps))


def assert_matches(ours, ref):
    compared = ref >= ref.max(axis=1, keepdims=True) - DYNAMIC_RANGE
    assert compared.mean() > 0.2  # the test must still compare a good share of bins
    np.testing.assert_allclose(ours[compared], ref[compared], atol=ATOL)


def test_random_signal_matches_reference():
    wave = np.random.default_rng(1).uniform(-0.5, 0.5, SR).astype(np.float32)
    ours = fbank(wave)
    assert ours.dtype == np.float32 and ours.shape == (num_frames(SR), 80)
    # Broadband input has no far-down bins: compare every one.
    np.testing.assert_allclose(ours, reference_fbank(wave.astype(np.float64) * 32768), atol=ATOL)


def test_sine_matches_reference():
    t = np.arange(int(0.73 * SR)) / SR
    wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    assert_matches(fbank(wave), reference_fbank(wave.astype(np.float64) * 32768))


@pytest.mark.parametrize("n", [0, 1, 399, 400, 401, 559, 560, 16000, 16123])
def test_frame_count(n):
    expected = 0 if n < 400 else 1 + (n - 400) // 160
    assert num_frames(n) == expected
    assert fbank(np.full(n, 0.01, dtype=np.float32)).shape == (expected, 80)


def test_seeded_dither_is_reproducible():
    wave = np.zeros(SR // 2, dtype=np.float32)  # digital silence: the dither is all there is
    a = fbank(wave, dither=1.0, rng=np.random.default_rng(7))
    b = fbank(wave, dither=1.0, rng=np.random.default_rng(7))
    c = fbank(wave, dither=1.0, rng=np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # The dither is Gaussian noise of std `dither` added to the int16-scaled waveform.
    noise = np.random.default_rng(7).standard_normal(len(wave))
    assert_matches(a, reference_fbank(noise))


@pytest.mark.parametrize(
    "wave, kwargs",
    [
        (np.zeros((2, 800), np.float32), {}),
        (np.zeros(800, np.int16), {}),
        (np.array([0.0, np.nan] * 400, np.float32), {}),
        (np.zeros(800, np.float32), {"dither": 1.0}),  # dither without an rng
        (np.zeros(800, np.float32), {"dither": -1.0, "rng": np.random.default_rng(0)}),
    ],
)
def test_invalid_input(wave, kwargs):
    with pytest.raises(WorkbenchError):
        fbank(wave, **kwargs)
