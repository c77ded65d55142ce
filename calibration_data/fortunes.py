"""Sentences for the synthetic corpus, taken from the Debian `fortunes` corpus."""
from __future__ import annotations

import os
import re
from pathlib import Path

from core.errors import WorkbenchError

from .text import normalize

DEFAULT_DIR = "/usr/share/games/fortunes"
MIN_CHARS = 8
# Hard limit: the decoder's fixed hypothesis length is 64 tokens including <sos>/<eos>.
MAX_CHARS = 60
MIN_WORDS = 2

# A sentence ends at . ! or ? followed by white space.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# Digits, symbols and URLs are read aloud as words that normalize() would drop from the
# transcript, so such sentences would not match their audio: skip them.
_UNSPEAKABLE = re.compile(r"[0-9@#$%&*_=+<>/\\|{}\[\]~^]")


def fortunes_dir() -> Path:
    return Path(os.environ.get("WB_FORTUNES_DIR", DEFAULT_DIR))


def _corpus_files(directory: Path) -> list[Path]:
    """Plain fortune files, in name order; `off/` (offensive) lives in a subfolder and is skipped."""
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix not in (".dat", ".u8"))


def _entries(path: Path) -> list[str]:
    text = path.read_bytes().decode("utf-8", errors="replace")
    return re.split(r"^%\s*$", text, flags=re.MULTILINE)


def _sentences(entry: str) -> list[str]:
    # Attribution lines ("-- Mark Twain") are not part of the text.
    lines = [ln for ln in entry.splitlines() if not ln.strip().startswith("--")]
    return _SENTENCE_END.split(" ".join(lines))


def _fortune_files(directory: str | os.PathLike | None) -> list[Path]:
    directory = Path(directory) if directory is not None else fortunes_dir()
    files = _corpus_files(directory) if directory.is_dir() else []
    if not files:
        raise WorkbenchError(
            f"no fortunes corpus found in {directory}: install it with `apt-get install fortunes fortunes-min` "
            "(or point WB_FORTUNES_DIR at a directory of fortune files)"
        )
    return files


def load_sentences(directory: str | os.PathLike | None = None) -> list[str]:
    """Normalised, deduplicated sentences (MIN_CHARS..MAX_CHARS characters, >= MIN_WORDS words), in corpus order."""
    files = _fortune_files(directory)
    seen: dict[str, None] = {}  # an ordered set: first occurrence wins, so the order is deterministic
    for path in files:
        for entry in _entries(path):
            for raw in _sentences(entry):
                if _UNSPEAKABLE.search(raw):
                    continue
                sentence = normalize(raw)
                if MIN_CHARS <= len(sentence) <= MAX_CHARS and len(sentence.split()) >= MIN_WORDS:
                    seen.setdefault(sentence)
    return list(seen)


TEXT_MAX_CHARS = 400  # written text (no speech limit): long enough for 128-token inputs, short of paragraphs
_SPACES = re.compile(r"\s+")


def load_texts(directory: str | os.PathLike | None = None, max_chars: int = TEXT_MAX_CHARS) -> list[str]:
    """Sentences as written (case, digits and punctuation kept; white space collapsed), for text models:
    deduplicated, MIN_CHARS..max_chars characters and >= MIN_WORDS words, in corpus order."""
    files = _fortune_files(directory)
    seen: dict[str, None] = {}
    for path in files:
        for entry in _entries(path):
            for raw in _sentences(entry):
                text = _SPACES.sub(" ", raw).strip()
                if MIN_CHARS <= len(text) <= max_chars and len(text.split()) >= MIN_WORDS:
                    seen.setdefault(text)
    return list(seen)
