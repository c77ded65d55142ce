"""The run file, `run_dir/run.json` (format "wb-run/1"): the one place that knows its format.

The pipeline writes it (save_run), the report and the run index read it (load_run); both validate through
check_run, so a run that is written is one that can be read back. Imports only core, so any layer above can use it.
"""
from __future__ import annotations

import math
from pathlib import Path

from core.errors import WorkbenchError
from core.fsutil import read_json, write_json

RUN_FORMAT = "wb-run/1"


def run_json_path(run_dir: str | Path) -> Path:
    """`run_dir/run.json`; a path that already names a run.json file is returned as is."""
    p = Path(run_dir)
    return p if p.name == "run.json" and not p.is_dir() else p / "run.json"


def check_run(run: dict, where: str | Path, *, problem: str = "corrupt run file") -> None:
    """Minimal validation of a run: the keys the report and the index rely on, with their types.

    Raises one WorkbenchError "<problem> <where>: ..." that lists every problem found."""
    if not isinstance(run, dict):
        raise WorkbenchError(f"{problem} {where}: expected a JSON object, got {type(run).__name__}")
    if run.get("format") != RUN_FORMAT:
        raise WorkbenchError(f"{problem} {where}: format is {run.get('format')!r}, expected {RUN_FORMAT!r}")
    problems = []
    if not isinstance(run.get("id"), str) or not run["id"]:
        problems.append("'id' is missing or not a string")
    if not isinstance(run.get("criterion"), dict) or not run["criterion"].get("metric"):
        problems.append("'criterion.metric' is missing")
    baselines = run.get("baselines", [])
    if not isinstance(baselines, list) or not all(isinstance(b, dict) and b.get("label") for b in baselines):
        problems.append("'baselines' must be a list of objects with a 'label'")
    for key, typ in (("selected", dict), ("sensitivity", dict), ("trace", list)):
        if run.get(key) is not None and not isinstance(run[key], typ):
            problems.append(f"'{key}' must be a JSON {'object' if typ is dict else 'array'} or null")
    if isinstance(run.get("trace"), list) and not all(isinstance(t, dict) for t in run["trace"]):
        problems.append("'trace' entries must be JSON objects")
    if problems:
        raise WorkbenchError(f"{problem} {where}: " + "; ".join(problems))


def load_run(run_dir: str | Path) -> dict:
    """Read and validate run.json (`run_dir` or the file itself); every problem is a WorkbenchError naming the file."""
    path = run_json_path(run_dir)
    if not path.is_file():
        raise WorkbenchError(f"missing run file {path} (is {Path(run_dir)} a run directory?)")
    try:
        run = read_json(path)
    except WorkbenchError as exc:
        raise WorkbenchError(f"corrupt run file: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkbenchError(f"cannot read run file {path}: {exc}") from exc
    check_run(run, path)
    return run


def selected_fallbacks(run: dict, graph: str, *, release: int = 0) -> tuple[list[str], list[str]]:
    """The nodes of `graph` that the run's selected mix keeps off INT8 (its `fallback_nodes`, "graph:node"), less
    the `release` least sensitive of them by the run's single-node sensitivity; returns (kept, released), plain
    node ids, most sensitive first. What `wb qat --mix-of RUN` trains for: a fine-tune for the mix the PTQ search
    found, with one or more of its fallbacks back in INT8 so that the search from "qat" can pass with fewer."""
    if release < 0:
        raise WorkbenchError(f"release must be >= 0, got {release}")
    selected = run.get("selected")
    if not isinstance(selected, dict) or not selected.get("passed"):
        raise WorkbenchError(f"run {run.get('id')!r} has no selected mix that passed ({run.get('status')}): "
                             f"there is no mix to train for")
    prefix = f"{graph}:"
    nodes = [n.removeprefix(prefix) for n in selected.get("fallback_nodes") or [] if n.startswith(prefix)]
    sensitivity = run.get("sensitivity") or {}
    missing = [n for n in nodes if prefix + n not in sensitivity]
    if release and missing:
        raise WorkbenchError(f"run {run.get('id')!r} has no sensitivity for {', '.join(missing)}: cannot tell which "
                             f"fallbacks are the least sensitive")
    nodes.sort(key=lambda n: -sensitivity.get(prefix + n, math.inf))
    cut = max(len(nodes) - release, 0)
    return nodes[:cut], nodes[cut:]


def save_run(run_dir: str | Path, run: dict) -> Path:
    """Validate `run`, then write it atomically to `run_dir/run.json` (a reader never sees half a file)."""
    path = run_json_path(run_dir)
    # Checked before writing, so an invalid run fails in the pipeline, not later in `wb runs report`.
    check_run(run, path, problem="not writing invalid run file")
    write_json(path, run)
    return path
