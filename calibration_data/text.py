"""Text normalisation and the character vocabulary shared by the corpus, the model and the evaluator.

WeNet's char units: <blank>=0, <unk>=1, the symbols, <sos/eos> last; a space is written as '▁'.
"""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Iterable, Sequence

from core.errors import WorkbenchError

BLANK = "<blank>"
UNK = "<unk>"
SOS_EOS = "<sos/eos>"
SPACE = "\u2581"  # '▁', as in WeNet's char/BPE unit lists
SYMBOLS = (SPACE, "'") + tuple("abcdefghijklmnopqrstuvwxyz")

_NOT_ALLOWED = re.compile(r"[^a-z' ]+")
_SPACES = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lower-case ASCII letters, apostrophes and single spaces; everything else becomes a space."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    text = text.replace("`", "'")
    text = _NOT_ALLOWED.sub(" ", text)
    # Apostrophes only inside words ("don't"), never as quotes.
    text = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", text)
    return _SPACES.sub(" ", text).strip()


class CharVocab:
    """Token list with WeNet's conventions; ids are positions in `tokens`."""

    def __init__(self, tokens: Sequence[str] | None = None):
        self.tokens = list(tokens) if tokens is not None else [BLANK, UNK, *SYMBOLS, SOS_EOS]
        if self.tokens[0] != BLANK or self.tokens[1] != UNK or self.tokens[-1] != SOS_EOS:
            raise ValueError("vocabulary must start with <blank>, <unk> and end with <sos/eos>")
        self.index = {t: i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def blank(self) -> int:
        return 0

    @property
    def unk(self) -> int:
        return 1

    @property
    def sos_eos(self) -> int:
        return len(self.tokens) - 1

    def encode(self, text: str) -> list[int]:
        return [self.index.get(SPACE if ch == " " else ch, self.unk) for ch in text]

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i in (self.blank, self.sos_eos) or not 0 <= i < len(self.tokens):
                continue
            tok = self.tokens[i]
            out.append("" if tok == UNK else tok.replace(SPACE, " "))  # '▁' alone (char) or leading a BPE piece
        return "".join(out).strip()

    def missing_characters(self, texts: Iterable[str]) -> list[str]:
        """Characters of `texts` that no token contains: a model with this vocabulary can never output them, so
        a CER against such references measures the vocabulary, not the model."""
        have = {SPACE if c == " " else c for t in self.tokens[1:-1] if t != UNK for c in t}
        return sorted({c for text in texts for c in text if (SPACE if c == " " else c) not in have})


def load_units(path: str | Path) -> CharVocab:
    """A vocabulary from WeNet's `units.txt` (`data/dict/lang_char.txt`): one `token id` per line, ids 0..V-1,
    `<blank>` 0, `<unk>` 1, `<sos/eos>` last."""
    path = Path(path)
    try:
        lines = [ln.split() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkbenchError(f"cannot read vocabulary {path}: {exc}") from None
    units: dict[int, str] = {}
    for k, parts in enumerate(lines, 1):
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise WorkbenchError(f"{path} line {k}: expected 'token id' (WeNet units.txt), got {' '.join(parts)!r}")
        tok, i = parts[0], int(parts[1])
        if i in units:
            raise WorkbenchError(f"{path} line {k}: id {i} is given twice ({units[i]!r} and {tok!r})")
        units[i] = tok
    if sorted(units) != list(range(len(units))):
        raise WorkbenchError(f"{path}: ids must be 0..{len(units) - 1} without gaps")
    try:
        return CharVocab([units[i] for i in range(len(units))])
    except ValueError as exc:
        raise WorkbenchError(f"{path}: {exc} (got {units.get(0)!r}, {units.get(1)!r}, ..., "
                             f"{units.get(len(units) - 1)!r})") from None


DEFAULT_VOCAB = CharVocab()
