"""Feeds for any ONNX model from a directory of `.npz` files: one file per feed dict, keyed by input name.

This is how a user's own calibration or evaluation data reaches the workbench without writing Python: save each
batch with `numpy.savez(path, **{input_name: array, ...})`. Files are read in name order, and every file is
checked against the model's inputs (names, dtypes, ranks, fixed dimensions) before any of them is used, so a bad
file fails in one line before an expensive pass starts.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np

from core.errors import WorkbenchError


def check_feed(feed: Mapping[str, np.ndarray], inputs: Mapping[str, dict], where: str) -> None:
    """One feed dict against the model's inputs ({name: {"dtype": numpy name, "shape": [int | str]}}, as
    `engines.base.onnx_io` gives them): same names, same dtypes, same ranks, fixed dimensions respected."""
    missing = [n for n in inputs if n not in feed]
    if missing:
        raise WorkbenchError(f"{where} lacks input {missing[0]!r} of the model (it has {sorted(feed)}; the model "
                             f"takes {sorted(inputs)})")
    extra = [n for n in feed if n not in inputs]
    if extra:
        raise WorkbenchError(f"{where} has {extra[0]!r}, which is not an input of the model (inputs: {sorted(inputs)})")
    for name, spec in inputs.items():
        value = feed[name]
        if value.dtype.name != spec["dtype"]:
            raise WorkbenchError(f"{where}: input {name!r} is {value.dtype.name}, the model takes {spec['dtype']}")
        dims = spec["shape"]
        if value.ndim != len(dims):
            raise WorkbenchError(f"{where}: input {name!r} has rank {value.ndim} (shape {list(value.shape)}), the "
                                 f"model takes rank {len(dims)} ({dims})")
        for axis, (got, want) in enumerate(zip(value.shape, dims)):
            if isinstance(want, int) and want > 0 and got != want:
                raise WorkbenchError(f"{where}: input {name!r} axis {axis} is {got}, the model fixes it to {want}")


def load_npz_feeds(directory: str | Path, inputs: Mapping[str, dict]) -> list[dict[str, np.ndarray]]:
    """Every `*.npz` feed of `directory`, in file-name order, each checked with `check_feed`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise WorkbenchError(f"feed directory {directory} does not exist")
    files = sorted(directory.glob("*.npz"))
    if not files:
        raise WorkbenchError(f"feed directory {directory} holds no .npz files (one feed dict per file, keyed by "
                             f"input name: numpy.savez(path, **feeds))")
    feeds = []
    for path in files:
        try:
            with np.load(path, allow_pickle=False) as data:
                feed = {k: data[k] for k in data.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise WorkbenchError(f"{path} is not a readable .npz file: {exc}") from None
        check_feed(feed, inputs, str(path))
        feeds.append(feed)
    return feeds
