"""Append-only cache of evaluations keyed by plan hash, so a killed search resumes where it stopped.

One JSON object per line; a line cut short by a kill is ignored on load (everything before it stays valid),
and the next append starts on a fresh line so that it is not glued onto the torn one."""
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
            # bytes, decoded leniently: a kill can cut a multi-byte character in half
            for line in self.path.read_bytes().decode("utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a half-written line from an interrupted run
                if isinstance(rec, dict) and isinstance(rec.get("key"), str) and "value" in rec:
                    self.entries[rec["key"]] = rec["value"]
        self.hits = 0      # values served from the cache
        self.computed = 0  # values computed (and appended) by this process

    def get_or_compute(self, key: str, compute: Callable[[], Any]) -> Any:
        if key in self.entries:
            self.hits += 1
            return self.entries[key]
        value = compute()
        self.computed += 1
        self.entries[key] = value
        self._append(json.dumps({"key": key, "value": value}))
        return value

    def _append(self, line: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            # a torn last line (a kill mid-write) has no newline: end it, or this record would join it
            torn = f.tell() > 0 and not self._ends_with_newline()
            f.write((("\n" if torn else "") + line + "\n").encode())
            f.flush()
            os.fsync(f.fileno())

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def __contains__(self, key: str) -> bool:
        return key in self.entries
