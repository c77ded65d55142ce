"""The voice catalogue, and which voices each corpus split may use.

Split rule: `test` is spoken only by held-out espeak-ng variants that `train` and `calib` never
use, so test accuracy measures generalisation to unseen speakers. flite voices are train/calib only.
"""
from __future__ import annotations

from core.errors import WorkbenchError

SPLITS = ("train", "calib", "test")

# Only the gmw/ (formant) voices: the mb/ mbrola ones need mbrola voice packages that are not installed.
ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029")

# `espeak-ng --voices=variant` names that sound like speech (no whisper or novelty voices).
# Every one renders differently from the others (checked by hashing output); klatt6 and caleb were
# dropped because they render identically to klatt. An unknown name silently falls back to the
# plain voice, so only change this list after checking `espeak-ng -v en-us+NAME` really differs.
ESPEAK_VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8",
    "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "klatt4", "klatt5",
    "croak", "Andy", "Annie", "aunty", "david", "Gene", "john", "Lee",
    "linda", "Mike", "paul", "quincy", "steph", "travis",
)
# Held out for the test split (male, female and klatt-style voices).
TEST_VARIANTS = ("m4", "f3", "klatt3", "Annie", "travis", "quincy")

# kal is 8 kHz and awb_time a talking clock: both skipped.
FLITE_VOICES = ("slt", "rms", "awb", "kal16")

# Per-utterance ranges (inclusive); the utterance's RNG picks a value.
RATE_WPM = (130, 200)
PITCH = (30, 70)


def _espeak(accent: str, variant: str) -> dict:
    return {"synth": "espeak-ng", "voice": f"{accent}+{variant}", "accent": accent, "variant": variant}


def voices_for_split(split: str) -> list[dict]:
    """The voices a split draws from, in a fixed order."""
    if split not in SPLITS:
        raise WorkbenchError(f"unknown corpus split {split!r}: expected one of {', '.join(SPLITS)}")
    if split == "test":
        variants = TEST_VARIANTS
    else:
        variants = tuple(v for v in ESPEAK_VARIANTS if v not in TEST_VARIANTS)
    voices = [_espeak(a, v) for a in ESPEAK_ACCENTS for v in variants]
    if split != "test":
        voices += [{"synth": "flite", "voice": name} for name in FLITE_VOICES]
    return voices


def voice_id(voice: dict) -> str:
    """A stable name such as "espeak-ng:en-gb+f3" or "flite:slt"."""
    return f"{voice['synth']}:{voice['voice']}"
