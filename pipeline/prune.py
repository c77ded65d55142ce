"""Free a finished run's disk: what the search placed and built on the way, which only a resume could reuse.

A run directory keeps every model the search placed (models/<graph>/<tag>.onnx, one per plan) and every engine
artifact it built (engines/): a default WeNet run held 6.9 GB, 4.6 GB of them engines. Both are caches keyed by
content (pipeline.workspace places or builds again what is missing), so pruning loses no result: run.json, the
report, the evaluation cache, the calibration tables, the FP32 sources, final/ (the deliverables and their
engines) and the models that models.json names (rtx-check and the benchmarks read them) stay.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from core.errors import WorkbenchError
from core.fsutil import RunDirLock
from pipeline.runfile import load_run

PLACED = re.compile(r"[0-9a-f]{16}\.onnx")  # pipeline.workspace names a placement by its 16-digit tag


def _size(p: Path) -> int:
    if p.is_symlink():
        return 0
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def prune_candidates(run_dir: Path) -> list[Path]:
    """What prune_run deletes: engines/ and the placed models (with their plans) models.json does not name."""
    run_dir = Path(run_dir).resolve()
    run = load_run(run_dir)  # a finished, readable run only
    graphs = (run.get("task") or {}).get("graphs") or []
    index = run_dir / "models.json"
    if not index.is_file():  # written after run.json: a run stopped between the two is not finished
        raise WorkbenchError(f"{run_dir} has no models.json (the run did not finish): nothing is pruned")
    named = {(run_dir / p).resolve() for models in json.loads(index.read_text()).values() for p in models.values()}
    out = [run_dir / "engines"] if (run_dir / "engines").exists() else []
    for g in graphs:  # models/<graph>/<tag>.onnx are placements; other folders of models/ hold FP32 sources
        for f in sorted((run_dir / "models" / str(g)).glob("*.onnx")):
            if PLACED.fullmatch(f.name) and f.resolve() not in named:
                out += [f] + ([f.with_suffix(".plan.json")] if f.with_suffix(".plan.json").is_file() else [])
    return out


def prune_run(run_dir: str | Path, dry_run: bool = False) -> dict:
    """Delete prune_candidates (unless `dry_run`), holding the run's lock (a run still working there is refused).
    Returns {"run_dir", "removed": [paths], "freed_bytes", "dry_run"}."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise WorkbenchError(f"{run_dir} holds no finished run (run.json): nothing is pruned from a run that may "
                             f"still resume")
    with RunDirLock(run_dir):
        todo = prune_candidates(run_dir)
        freed = sum(_size(p) for p in todo)
        if not dry_run:
            for p in todo:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink(missing_ok=True)
    return {"run_dir": str(run_dir), "removed": [str(p) for p in todo], "freed_bytes": freed, "dry_run": dry_run}
