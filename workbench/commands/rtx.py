"""`wb rtx-check`: build a run's deliverables (a WeNet or a task run: pipeline/rtx_check.py) with TensorRT-RTX on CPU
(CI fails on any parser/builder error)."""
from __future__ import annotations

from pathlib import Path


def run(args) -> None:
    from core.errors import WorkbenchError
    from pipeline.rtx_check import RESULT_MD, check_run, resolve_run_dir
    from report.document import write_report

    run_dir = resolve_run_dir(args.run)
    print(f"TensorRT-RTX builds (SM{args.compute_capability}) of {run_dir}:")
    try:
        check_run(args.run, compute_capability=args.compute_capability)
    except WorkbenchError:
        if (run_dir / RESULT_MD).is_file():
            _report(run_dir, args.run, write_report)  # the report shows what was refused too
        raise
    _report(run_dir, args.run, write_report)
    print(f"plan sizes: {run_dir / RESULT_MD} (and in the report)")


def _report(run_dir: Path, published: Path, write_report) -> None:
    """Re-render the run's report (it lists the plan sizes) and copy it to a published directory."""
    write_report(run_dir)
    if Path(published).resolve() != run_dir.resolve():
        for name in ("report.md", "report.html"):
            (Path(published) / name).write_bytes((run_dir / name).read_bytes())


def register(sub) -> None:
    s = sub.add_parser("rtx-check", help="build any run's FP32/FP16/INT8/QAT/selected graphs (models.json) with TensorRT-RTX (CPU)")
    s.add_argument("--run", type=Path, required=True,
                   help="a run directory, or a published one (build.sh --out DIR) whose run.json names the run")
    s.add_argument("--compute-capability", type=int, default=89, help="RTX target GPU (default 89)")
    s.set_defaults(func=run)
