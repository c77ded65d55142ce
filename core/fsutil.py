"""Atomic file writes: a reader (or a killed run) never sees a half-written file."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import WorkbenchError


def _check_writable_dir(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WorkbenchError(f"cannot create directory {directory}: {exc.strerror}") from exc
    if not os.access(directory, os.W_OK):
        raise WorkbenchError(f"directory {directory} is not writable")


def check_writable_target(target: str | os.PathLike) -> None:
    """Fail before the work, not after it: `target` must be a file path (not a directory) in a writable directory."""
    target = Path(target)
    if target.is_dir():
        raise WorkbenchError(f"{target} is a directory: give a file path to write")
    _check_writable_dir(target.parent)


def check_writable_dir_target(target: str | os.PathLike) -> None:
    """Fail before the work: `target` is a directory to (re)write (not a file) in a writable directory."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise WorkbenchError(f"{target} is a file: give a directory path to write")
    _check_writable_dir(target.parent)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` only if the block succeeds."""
    target = Path(target)
    _check_writable_dir(target.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o644)  # mkstemp makes 0600; the result is an ordinary shared file
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; it replaces `target` only if the block succeeds."""
    target = Path(target)
    _check_writable_dir(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise WorkbenchError(f"file not found: {path}") from exc
    except IsADirectoryError as exc:
        raise WorkbenchError(f"{path} is a directory, not a JSON file") from exc
    except UnicodeDecodeError as exc:
        raise WorkbenchError(f"{path} is not a JSON file (not UTF-8 text)") from exc
    except json.JSONDecodeError as exc:
        raise WorkbenchError(f"{path} is not valid JSON: {exc}") from exc


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- run-directory lock -----------------------------------------------------------------------------------------
LOCK_NAME = ".lock"
_HELD: dict[Path, list] = {}  # resolved run dir -> [open lock file, depth]: re-entrant within one process


class RunDirLock:
    """An exclusive lock (fcntl.flock on `<dir>/.lock`) on a run directory, held while a run works in it.

    A second process fails at once with a WorkbenchError naming the holder's pid. Re-entrant within a process
    (`wb search` and the experiment it starts both take it). The kernel drops the lock when the holder dies
    (even by SIGKILL), so a stale .lock file (a copied or killed run) never blocks."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self._held = False

    def acquire(self) -> "RunDirLock":
        import fcntl

        if self._held:
            return self
        _check_writable_dir(self.dir)
        key = self._key = self.dir.resolve()
        if key in _HELD:
            _HELD[key][1] += 1
        else:
            f = open(self.dir / LOCK_NAME, "a+")
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                f.close()
                raise WorkbenchError(f"run directory {self.dir} is in use by another wb process (pid {holder}); "
                                     f"wait for it to finish or give another --run-dir") from None
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            _HELD[key] = [f, 1]
        self._held = True
        return self

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        entry = _HELD.get(self._key)  # the key of acquire(): nothing to resolve (this also runs from __del__)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[self._key]
            entry[0].close()  # closing the descriptor drops the flock

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def check_model_file(path: str | os.PathLike, what: str = "ONNX model") -> Path:
    """An input model file, checked before any work: present, a file, not empty (a 0-byte .onnx parses as an
    empty model, whose errors, "opset 0" or "no Conv/MatMul/Gemm", hide the cause)."""
    path = Path(path)
    if not path.exists():
        raise WorkbenchError(f"{what} not found: {path}")
    if path.is_dir():
        raise WorkbenchError(f"{what} {path} is a directory, not a file")
    if path.stat().st_size == 0:
        raise WorkbenchError(f"{what} {path} is empty (0 bytes): export or copy it again")
    return path
