"""After a run: its report, its run-index entry, and a copy of its deliverables where the user asked (`--out`)."""
from __future__ import annotations

import shutil
from pathlib import Path

from report.document import write_report
from report.index import index_run


def finish_run(run_dir: Path, runs_root: Path, out: Path | None = None) -> dict:
    """Write the report, index the run under `runs_root`, publish to `out`; returns the report's {name: path}."""
    paths = write_report(run_dir)
    index_run(run_dir, runs_root)
    if out:
        publish(run_dir, out)
    return paths


def publish(run_dir: Path, out: Path) -> None:
    """Copy the run's deliverables to `out`: encoder/decoder models, plans, engines (encoder.plan and
    decoder.plan at the top when TensorRT built them), run.json and the report."""
    out.mkdir(parents=True, exist_ok=True)
    final = run_dir / "final"
    for item in sorted(final.iterdir()) if final.is_dir() else []:
        dest = out / item.name
        if item.is_dir():
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(item, dest)
            for plan in item.glob("*.plan"):
                shutil.copyfile(plan, out / f"{item.name.removesuffix('_engine')}.plan")
        else:
            shutil.copyfile(item, dest)
    for f in [run_dir / "run.json", run_dir / "report.md", run_dir / "report.html", *run_dir.glob("*.png")]:
        if f.is_file():
            shutil.copyfile(f, out / f.name)
