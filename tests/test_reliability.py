"""Issue 16 (reliability): results survive kills and copies, bad inputs fail early with one line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.fsutil import RunDirLock
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


# -- 2. one run per run directory -------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    """A child process that takes the run-directory lock as `wb search` does and keeps it until killed."""
    code = ("import sys, time; from core.fsutil import RunDirLock; l = RunDirLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True,
                             env=_env(), cwd=REPO)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_second_search_on_a_locked_run_dir_fails_at_once_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    holder = _hold_lock(run_dir)
    try:
        t0 = time.time()
        res = subprocess.run([sys.executable, "-m", "workbench.cli", "search", "--quick", "--run-dir", str(run_dir),
                              "--runs-root", str(tmp_path / "runs")], capture_output=True, text=True, env=_env(),
                             cwd=REPO, timeout=120)
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and f"pid {holder.pid}" in lines[0], res.stderr
        assert "in use" in lines[0] and time.time() - t0 < 60
        assert not (run_dir / "cache.jsonl").exists()  # nothing was computed
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel drops a killed holder's lock: the directory is usable again, by this process, re-entrantly
    with RunDirLock(run_dir), RunDirLock(run_dir):
        assert (run_dir / ".lock").read_text().strip() == str(os.getpid())


def test_run_dir_lock_is_released_for_the_next_process(tmp_path):
    with RunDirLock(tmp_path / "run"):
        pass
    holder = _hold_lock(tmp_path / "run")  # would block forever / fail if the lock were still held here
    holder.kill()
    holder.wait()
