"""Text normalisation and the character vocabulary shared by the corpus, the model and the evaluator.

WeNet's char units: <blank>=0, <unk>=1, the symbols, <sos/eos> last; a space is written as '▁'.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Iterable, Sequence

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
            out.append(" " if tok == SPACE else ("" if tok == UNK else tok))
        return "".join(out).strip()


DEFAULT_VOCAB = CharVocab()
