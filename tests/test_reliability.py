"""Issue 16 (reliability): results survive kills and copies, bad inputs fail early with one line."""
from __future__ import annotations

import json

import pytest

from search.evalcache import EvalCache


# -- 1. the evaluation cache survives a torn last line ---------------------------------------------------------

def test_evalcache_append_after_torn_line_keeps_every_record(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text(json.dumps({"key": "a", "value": 1}) + "\n" + '{"key": "b", "val')  # killed mid-write
    cache = EvalCache(path)
    assert dict(cache.entries) == {"a": 1}
    assert cache.get_or_compute("b", lambda: 2) == 2
    assert cache.get_or_compute("c", lambda: 3) == 3
    assert cache.computed == 2 and cache.hits == 0
    again = EvalCache(path)
    assert again.entries == {"a": 1, "b": 2, "c": 3}
    assert again.get_or_compute("a", lambda: pytest.fail("recomputed")) == 1
    assert again.hits == 1 and again.computed == 0


def test_evalcache_torn_multibyte_and_junk_lines_are_skipped(tmp_path):
    path = tmp_path / "cache.jsonl"
    rec = json.dumps({"key": "a", "value": "é"}, ensure_ascii=False).encode()
    path.write_bytes(rec + b"\n[1, 2]\n" + rec[:-3])  # a JSON line that is not a record, a cut character
    cache = EvalCache(path)
    assert cache.entries == {"a": "é"}
    cache.get_or_compute("b", lambda: 2)
    assert EvalCache(path).entries == {"a": "é", "b": 2}
