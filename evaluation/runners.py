"""The runner protocol evaluation consumes: any object with `input_names`, `output_names` and
`run(feeds) -> outputs` will do, plus the helpers that tell a model's kind and check its interface.

Evaluation owns no backend (it is below engines): the runners themselves are `engines.runner.EngineRunner`s,
`engines.open_onnx(path)` for an ONNX file as it is, `engines.load(artifact)` for a built engine.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from evaluation.interface import TensorSpec


class Runner(Protocol):
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def interface_mismatch(kind: str, where: str, specs: Sequence[TensorSpec], names: Sequence[str]) -> str:
    """Empty if `names` fits `specs`, otherwise the missing/unexpected part of the message."""
    missing = [s.name for s in specs if not s.optional and s.name not in names]
    unexpected = [n for n in names if n not in {s.name for s in specs}]
    parts = []
    if missing:
        parts.append(f"missing {kind} {where} {', '.join(missing)}")
    if unexpected:
        parts.append(f"unexpected {kind} {where} {', '.join(unexpected)}")
    return "; ".join(parts)


GENERIC = "generic"  # any ONNX model: its own inputs (names, dtypes, ranks) are the interface


def guess_kind(input_names: Sequence[str]) -> str:
    """"decoder" / "encoder" for WeNet's interface (by its distinctive inputs), else "generic"."""
    if "hyps_pad_sos_eos" in input_names:
        return "decoder"
    return "encoder" if "speech" in input_names else GENERIC
