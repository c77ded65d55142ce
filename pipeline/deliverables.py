"""Stage: deliverables. The selected mix's models, plans and engines under run_dir/final/, the ONNX models behind
every baseline and the selection (models.json, for tools that rebuild them with another builder: `wb rtx-check`),
and run.json (pipeline.runfile's format), which the report and the run index read."""
from __future__ import annotations

import shutil
from pathlib import Path

from core.fsutil import write_json
from graph.plan import edit_plan, save_plan
from search.algorithm import split_plan


def finalize(exp, models: dict[str, Path], flat: dict[str, str]) -> None:
    """Copy the selected models to final/<graph>.onnx with their plans, and build their engines beside them
    (final/<graph>_engine, holding <graph>.plan when the backend is TensorRT)."""
    ws = exp.ws
    final = exp.dir / "final"
    final.mkdir(exist_ok=True)
    for g in ws.names:
        shutil.copyfile(models[g], final / f"{g}.onnx")
        placed = Path(models[g]).with_suffix(".plan.json")  # the plan the model was placed with (pipeline.workspace)
        if placed.is_file():  # e.g. the FP16 baseline's, whose every other node is FP16 too
            shutil.copyfile(placed, final / f"{g}.plan.json")
        else:  # an FP32 source model: nothing placed
            save_plan(edit_plan(ws.base_plan(g, "fp32"), set_nodes=split_plan(flat, g)), final / f"{g}.plan.json")
        ws.build(g, final / f"{g}.onnx", final / f"{g}_engine")


def write_models_index(run_dir: Path, deliverables: dict[str, dict[str, Path]]) -> None:
    """models.json: {label: {graph: path}}, run-relative; a user's FP32 graph outside the run stays absolute."""
    root = Path(run_dir).resolve()

    def where(p: Path) -> str:
        p = Path(p).resolve()
        return p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)

    write_json(Path(run_dir) / "models.json", {label: {g: where(p) for g, p in models.items()}
                                               for label, models in deliverables.items()})
