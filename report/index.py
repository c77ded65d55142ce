"""An index of all search runs in SQLite (`<runs_root>/index.sqlite`), for listing and comparing runs.

The index is a cache: each run's `run.json` is the truth, and `reindex` rebuilds the index from the run.json
files present. The default runs root is `experiments/runs` under the repository root; `$WB_RUNS_ROOT` or an
explicit `runs_root` argument overrides it.
"""
from __future__ import annotations

import datetime as _dt
import sqlite3
from pathlib import Path
from typing import Any

from core.host import same_isa
from pipeline.config import default_runs_root

from core.errors import WorkbenchError
from core.fsutil import atomic_path
from pipeline.runfile import load_run, run_json_path
from report.model import SELECTED_LABEL, fp32_baseline, metric_label, metric_of, objective_of, result_rows

INDEX_NAME = "index.sqlite"

COLUMNS = (  # (name, SQL type); id is the primary key
    ("id", "TEXT PRIMARY KEY"), ("created", "TEXT"), ("model", "TEXT"), ("backend", "TEXT"), ("cpu", "TEXT"),
    ("isa", "TEXT"), ("status", "TEXT"),
    ("metric", "TEXT"), ("fp32_metric", "REAL"), ("selected_metric", "REAL"), ("selected_objective_ms", "REAL"),
    ("fp32_objective_ms", "REAL"), ("speedup", "REAL"), ("n_full_evals", "INTEGER"), ("path", "TEXT"),
    ("indexed_at", "TEXT"),
)
_NAMES = [c for c, _ in COLUMNS]
_SCHEMA = f"CREATE TABLE IF NOT EXISTS runs ({', '.join(f'{c} {t}' for c, t in COLUMNS)})"


def _root(runs_root: str | Path | None) -> Path:
    return Path(runs_root) if runs_root is not None else default_runs_root()


def summarize(run: dict, run_dir: str | Path) -> dict[str, Any]:
    """The index row of one (already loaded and validated) run."""
    metric = run["criterion"]["metric"]
    fp32, sel = fp32_baseline(run), run.get("selected")
    fp32_obj, sel_obj = objective_of(fp32), objective_of(sel)
    n_full = run.get("n_full_evals")
    cpu = (run.get("host") or {}).get("cpu") or {}
    return {
        "id": run["id"], "created": str(run.get("created") or ""), "model": run.get("model"),
        "backend": run.get("backend"), "cpu": cpu.get("model"), "isa": cpu.get("isa"), "status": run.get("status"),
        "metric": metric,
        "fp32_metric": metric_of(fp32, metric), "selected_metric": metric_of(sel, metric),
        "selected_objective_ms": sel_obj, "fp32_objective_ms": fp32_obj,
        # the report's own figure: a selected mix re-timed side by side is compared with that FP32 timing
        "speedup": next((r["speedup"] for r in result_rows(run) if r["kind"] == "selected"), None),
        "n_full_evals": n_full if isinstance(n_full, int) and not isinstance(n_full, bool) else None,
        "path": str(Path(run_dir).resolve()),
        "indexed_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _connect(path: Path) -> sqlite3.Connection:
    try:
        con = sqlite3.connect(path, timeout=30)
        con.row_factory = sqlite3.Row
        con.execute(_SCHEMA)
        have = {r[1] for r in con.execute("PRAGMA table_info(runs)")}
        for name, sql_type in COLUMNS:  # an index written by an older version gains the new columns
            if name not in have:
                con.execute(f"ALTER TABLE runs ADD COLUMN {name} {sql_type.replace('PRIMARY KEY', '')}")
        return con
    except sqlite3.DatabaseError as exc:
        raise WorkbenchError(f"run index {path} is unreadable ({exc}); rebuild it with `wb runs reindex`") from exc


def _upsert(con: sqlite3.Connection, row: dict) -> None:
    con.execute(f"INSERT OR REPLACE INTO runs ({', '.join(_NAMES)}) VALUES ({', '.join('?' for _ in _NAMES)})",
                [row[c] for c in _NAMES])


def index_run(run_dir: str | Path, runs_root: str | Path | None = None) -> dict:
    """Add or update one run in `<runs_root>/index.sqlite`; returns the index row."""
    run_dir = run_json_path(run_dir).parent
    row = summarize(load_run(run_dir), run_dir)
    root = _root(runs_root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WorkbenchError(f"cannot create runs root {root}: {exc.strerror}") from exc
    con = _connect(root / INDEX_NAME)
    try:
        with con:
            _upsert(con, row)
    except sqlite3.DatabaseError as exc:
        raise WorkbenchError(f"cannot write run index {root / INDEX_NAME}: {exc}") from exc
    finally:
        con.close()
    return row


def list_runs(runs_root: str | Path | None = None) -> list[dict]:
    """All indexed runs, newest first (an empty list when there is no index yet)."""
    path = _root(runs_root) / INDEX_NAME
    if not path.is_file():
        return []
    con = _connect(path)
    try:
        return [dict(r) for r in con.execute("SELECT * FROM runs ORDER BY created DESC, id DESC")]
    except sqlite3.DatabaseError as exc:
        raise WorkbenchError(f"run index {path} is unreadable ({exc}); rebuild it with `wb runs reindex`") from exc
    finally:
        con.close()


def get_run(runs_root: str | Path | None, run_id: str) -> dict:
    """The index row of a run by id, or by a unique id prefix."""
    runs = list_runs(runs_root)
    exact = [r for r in runs if r["id"] == run_id]
    matches = exact or [r for r in runs if r["id"].startswith(run_id)]
    if not matches:
        raise WorkbenchError(f"no run {run_id!r} in the index under {_root(runs_root)} "
                             f"({len(runs)} runs indexed; `wb runs reindex` rebuilds the index)")
    if len(matches) > 1:
        raise WorkbenchError(f"run id {run_id!r} is ambiguous: " + ", ".join(r["id"] for r in matches))
    return matches[0]


def _row_view(r: dict) -> dict:
    return {"metric": r["metric"], "passed": r["passed"], "hackathon": r["hackathon"],
            "objective_ms": r["objective_ms"], "speedup": r["speedup"]}


def compare_runs(runs_root: str | Path | None, id_a: str, id_b: str) -> dict:
    """Side by side: the two index rows, and each baseline/selected row matched by label.

    Returns {"a": row_a, "b": row_b, "summary": [{"field", "a", "b"}], "rows": [{"label", "a", "b"}],
    "warnings": [str]}, where a per-label entry is None in a run that lacks that label; a warning says when the
    two runs were measured on different int8 ISAs (or one of them did not record its CPU), since INT8 accuracy
    and speed on a CPU depend on it.
    """
    ra, rb = get_run(runs_root, id_a), get_run(runs_root, id_b)
    runs = [load_run(r["path"]) for r in (ra, rb)]
    summary = [{"field": c, "a": ra[c], "b": rb[c]} for c in _NAMES if c not in ("indexed_at",)]
    per = [{r["label"] if r["kind"] == "baseline" else SELECTED_LABEL: _row_view(r) for r in result_rows(run)
            if r["kind"] != "search"} for run in runs]
    labels = list(dict.fromkeys([*per[0], *per[1]]))
    labels = [lab for lab in labels if lab != SELECTED_LABEL] + ([SELECTED_LABEL] if SELECTED_LABEL in labels else [])
    rows = [{"label": lab, "a": per[0].get(lab), "b": per[1].get(lab)} for lab in labels]
    warnings = []
    if not same_isa(runs[0].get("host"), runs[1].get("host")):
        warnings.append(f"the runs were measured on different CPUs' int8 instruction sets (A: {ra['isa'] or 'not recorded'}"
                        f" on {ra['cpu'] or '?'}, B: {rb['isa'] or 'not recorded'} on {rb['cpu'] or '?'}): INT8 accuracy "
                        f"and latency on a CPU depend on it (VNNI or not), so their numbers are not comparable")
    return {"a": ra, "b": rb, "metric_label": {"a": metric_label(ra["metric"]), "b": metric_label(rb["metric"])},
            "summary": summary, "rows": rows, "warnings": warnings}


def reindex(runs_root: str | Path | None = None) -> dict:
    """Rebuild the index from every `run.json` under runs_root (atomically replacing index.sqlite).

    Readable runs are indexed even if others are not; the unreadable ones then raise one WorkbenchError that names
    each file. Returns {"indexed": [ids], "path": index path}.
    """
    root = _root(runs_root)
    if not root.is_dir():
        raise WorkbenchError(f"runs root {root} does not exist")
    found = sorted(p for p in root.rglob("run.json") if not any(part.startswith(".") for part in p.relative_to(root).parts))
    rows, errors = {}, []
    for p in found:
        try:
            row = summarize(load_run(p.parent), p.parent)
        except WorkbenchError as exc:
            errors.append(str(exc))
            continue
        if row["id"] in rows:
            errors.append(f"duplicate run id {row['id']!r} in {rows[row['id']]['path']} and {row['path']}; kept the first")
            continue
        rows[row["id"]] = row
    target = root / INDEX_NAME
    with atomic_path(target) as tmp:
        tmp.unlink()  # sqlite wants to create its own file
        con = _connect(tmp)
        try:
            with con:
                for row in rows.values():
                    _upsert(con, row)
        finally:
            con.close()
    if errors:
        raise WorkbenchError(f"indexed {len(rows)} runs into {target}, but {len(errors)} could not be indexed:\n  "
                             + "\n  ".join(errors))
    return {"indexed": list(rows), "path": target}
