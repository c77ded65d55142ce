"""The engine runners a pipeline holds: the most recently used ones only, besides those it pins (the FP32
models). A search places dozens of models, and an ONNX Runtime session of each held to the end took 8.6 GB on
the WeNet model and 9.1 GB on MiniLM (issue 15); side-by-side timing needs at most side_by_side_max + 1 at once."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

MAX_RUNNERS = 12  # runners kept besides the pinned ones


class RunnerCache:
    def __init__(self, most: int = MAX_RUNNERS):
        self.most = most
        self._runners: dict[Path, object] = {}  # insertion order = least recently used first

    def get(self, model: Path, make: Callable[[], object], pinned: Iterable[Path] = ()) -> object:
        if model in self._runners:
            self._runners[model] = self._runners.pop(model)  # most recently used last
        else:
            self._runners[model] = make()
            keep = set(pinned)
            for old in [m for m in self._runners if m not in keep][:-self.most]:
                del self._runners[old]
        return self._runners[model]

    def drop(self, model: Path) -> None:
        self._runners.pop(model, None)

    def __contains__(self, model: Path) -> bool:
        return model in self._runners
