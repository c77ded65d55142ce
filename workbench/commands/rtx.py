"""`wb rtx-check`: build a run's deliverables with TensorRT-RTX on CPU (CI fails on any parser/builder error)."""
from __future__ import annotations

from pathlib import Path


def run(args) -> None:
    from quant.rtx_check import RESULT_MD, check_run, resolve_run_dir

    print(f"TensorRT-RTX builds (SM{args.compute_capability}) of {resolve_run_dir(args.run)}:")
    check_run(args.run, compute_capability=args.compute_capability)
    print(f"plan sizes: {resolve_run_dir(args.run) / RESULT_MD} (and in the report)")


def register(sub) -> None:
    s = sub.add_parser("rtx-check", help="build a run's FP32/FP16/INT8/QAT/selected graphs with TensorRT-RTX (CPU)")
    s.add_argument("--run", type=Path, required=True,
                   help="a run directory, or a published one (build.sh --out DIR) whose run.json names the run")
    s.add_argument("--compute-capability", type=int, default=89, help="RTX target GPU (default 89)")
    s.set_defaults(func=run)
