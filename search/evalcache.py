"""Append-only cache of evaluations keyed by plan hash, so a killed search resumes where it stopped.

One JSON object per line; a line cut short by a kill is ignored on load (everything before it stays valid)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable


class EvalCache:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.entries: dict[str, Any] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a half-written last line from an interrupted run
                self.entries[rec["key"]] = rec["value"]
        self.hits = 0

    def get_or_compute(self, key: str, compute: Callable[[], Any]) -> Any:
        if key in self.entries:
            self.hits += 1
            return self.entries[key]
        value = compute()
        self.entries[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"key": key, "value": value}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return value

    def __contains__(self, key: str) -> bool:
        return key in self.entries
