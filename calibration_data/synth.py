"""Text to speech through the espeak-ng and flite command-line synthesizers."""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

from core.errors import WorkbenchError

SAMPLE_RATE = 16000
# (environment variable, default executable, Debian package) per synthesizer.
_SYNTHS = {"espeak-ng": ("WB_ESPEAK", "espeak-ng", "espeak-ng"), "flite": ("WB_FLITE", "flite", "flite")}
_ESPEAK_DEFAULT_WPM = 175  # flite has no rate option: its duration stretch is relative to this
_TIMEOUT_S = 60


def executable(synth: str) -> str:
    """Resolve a synthesizer's executable, or explain which package to install."""
    if synth not in _SYNTHS:
        raise WorkbenchError(f"unknown synthesizer {synth!r}: expected one of {', '.join(_SYNTHS)}")
    env_var, default, package = _SYNTHS[synth]
    name = os.environ.get(env_var) or default
    path = shutil.which(name)
    if path is None:
        raise WorkbenchError(
            f"speech synthesizer {synth} not found ({name!r}, set by {env_var} or PATH): "
            f"install it with `apt-get install {package}` or point {env_var} at the executable"
        )
    return path


def _command(text: str, voice: dict, rate: int, pitch: int, out: Path) -> list[str]:
    exe = executable(voice["synth"])
    if voice["synth"] == "espeak-ng":
        data = os.environ.get("WB_ESPEAK_DATA")
        path_opt = [f"--path={data}"] if data else []
        return [exe, *path_opt, "-v", voice["voice"], "-s", str(rate), "-p", str(pitch), "-w", str(out), text]
    # flite: the rate becomes a duration stretch; its voices have no portable pitch control, so pitch is unused.
    stretch = f"{_ESPEAK_DEFAULT_WPM / rate:.4f}"
    return [exe, "-voice", voice["voice"], "--setf", f"duration_stretch={stretch}", "-t", text, "-o", str(out)]


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise WorkbenchError(f"synthesizer wrote {8 * w.getsampwidth()}-bit audio; expected 16-bit PCM")
        rate, channels = w.getframerate(), w.getnchannels()
        samples = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    samples = samples.reshape(-1, channels).mean(axis=1) if channels > 1 else samples
    return samples.astype(np.float32) / 32768.0, rate


def synthesize(text: str, voice: dict, rate: int, pitch: int, workdir: str | os.PathLike | None = None) -> np.ndarray:
    """Speak `text` (normalised, so it cannot look like an option) with `voice`.

    `rate` is in words per minute, `pitch` 0..99 (espeak-ng only). The temporary WAV goes to `workdir`
    (default: the system temp dir). Returns float32 mono in [-1, 1] at 16 kHz.
    """
    if not text.strip():
        raise WorkbenchError("cannot synthesize empty text")
    env = dict(os.environ)
    if os.environ.get("WB_TTS_LD_LIBRARY_PATH"):
        env["LD_LIBRARY_PATH"] = os.environ["WB_TTS_LD_LIBRARY_PATH"]
    fd, tmp = tempfile.mkstemp(prefix="wb-tts-", suffix=".wav", dir=workdir)
    os.close(fd)
    out = Path(tmp)
    try:
        cmd = _command(text, voice, rate, pitch, out)
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise WorkbenchError(f"{voice['synth']} took over {_TIMEOUT_S} s for {text!r}") from exc
        if proc.returncode != 0 or out.stat().st_size == 0:
            raise WorkbenchError(
                f"{voice['synth']} (voice {voice['voice']}) failed with exit code {proc.returncode}: "
                f"{proc.stderr.strip() or 'no output'}"
            )
        audio, sr = _read_wav(out)
    finally:
        out.unlink(missing_ok=True)
    if sr != SAMPLE_RATE:
        # imported here: scipy.signal takes seconds to import, and every process that reads the corpus (each Ray
        # worker unpickling the WeNet task) imports this module without synthesizing anything
        from scipy.signal import resample_poly

        g = math.gcd(SAMPLE_RATE, sr)
        audio = resample_poly(audio, SAMPLE_RATE // g, sr // g)
    return np.clip(audio, -1.0, 1.0).astype(np.float32)
