"""The QAT job behind `wb qat`: a trained model + PTQ calibration tables + precision plans -> quantizers
inserted -> short fine-tune with the project's training loop (models.train.train, optionally distilling from
the FP32 model) -> a QAT directory that the rest of the workbench reads.

QAT directory (written atomically: it appears only when everything succeeded; a killed run resumes from
`<out>.partial/train/checkpoint.pt`):
  weights.safetensors                    fine-tuned weights, fp16 like the shipped model (config in metadata)
  encoder.table.json, decoder.table.json calibration tables with the QAT ranges as method "qat"
  encoder.plan.json, decoder.plan.json   the plans the quantizers were inserted for
  qdq/encoder.onnx, qdq/decoder.onnx     the QAT Q/DQ export (TensorRT recipe conventions), validated
  train_log.jsonl, qat.json              the training log and a summary
The pipeline uses it as calibrator "qat" (config `[qat] dir`): INT8 models are placed on the fine-tuned
weights with the QAT ranges, so the precision search starts from QAT scales.
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from graph.analysis import analyze
from graph.plan import create_plan, load_plan, save_plan
from graph.validate import validate
from core.errors import WorkbenchError
from core.fsutil import atomic_dir, write_json

from .qat import export_qat_onnx, fp32_teacher, insert_quantizers, qat_table, quantizers, remove_quantizers
from .table import CalibrationTable

KINDS = ("encoder", "decoder")
WEIGHTS, SUMMARY = "weights.safetensors", "qat.json"


@dataclass
class QatOptions:
    steps: int = 1000          # ~11 % of the original schedule (8853 steps)
    lr: float = 5e-5           # peak; the original run ended near 4.5e-4
    warmup: int = 100
    kd_weight: float = 0.5     # 0: no distillation
    kd_temperature: float = 1.0
    max_frames: int = 60000
    eval_every: int = 250
    seed: int = 0
    workers: int = 6
    time_limit_s: float = 0.0
    opset: int = 13
    method: str | None = None  # amax method of the base tables (None: each table's default)
    fake_quant: bool = True    # False: the ablation control, the same fine-tune without quantizers (its
                               # directory then holds the fine-tuned weights with the base tables' ranges)


def table_path(qat_dir: str | Path, kind: str) -> Path:
    return Path(qat_dir) / f"{kind}.table.json"


def check_qat_dir(qat_dir: str | Path) -> Path:
    d = Path(qat_dir)
    need = [d / WEIGHTS] + [table_path(d, k) for k in KINDS]
    missing = [p.name for p in need if not p.is_file()]
    if missing:
        raise WorkbenchError(f"{d} is not a QAT directory written by `wb qat` (missing {', '.join(missing)})")
    return d


def _round_fp16(model: torch.nn.Module) -> None:
    """Weights as they will be stored (fp16), so the saved file, the QAT export and the pipeline's placement
    all see the same numbers."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())


def _summary_of_log(log: Path) -> dict:
    recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    if not recs:
        return {}
    k = max(1, min(20, len(recs) // 4))
    mean = lambda rs, key: round(sum(r[key] for r in rs) / len(rs), 4)  # noqa: E731
    val = [(r["step"], r["val_cer_ctc_greedy"]) for r in recs if "val_cer_ctc_greedy" in r]
    return {"steps": recs[-1]["step"], "loss_first": mean(recs[:k], "loss"), "loss_last": mean(recs[-k:], "loss"),
            "train_s": recs[-1]["time_s"], "val_cer_ctc_greedy": val}


def run_qat(model, tables: dict[str, str | Path], out_dir: str | Path, train_split, val_split,
            opts: QatOptions = QatOptions(), plans: dict[str, str | Path] | None = None, device: str | None = None,
            progress: bool = True, source: str = "") -> tuple[dict, torch.nn.Module]:
    """QAT of `model` (an ASRModel, changed in place) from the PTQ `tables` ({kind: table JSON}) for `plans`
    ({kind: plan JSON}; default: every Linear/Conv int8, attention MatMuls fp32, as the pipeline's all-INT8).
    Returns (the qat.json summary, the fine-tuned model with its quantizers)."""
    from models.export import export_onnx
    from calibration_data.text import DEFAULT_VOCAB
    from models.train import TrainConfig, greedy_cer, train
    from models.weights import save_weights

    out = Path(out_dir)
    work = out.with_name(out.name + ".partial")
    for kind in KINDS:
        if kind not in tables or not Path(tables[kind]).is_file():
            raise WorkbenchError(f"{kind} calibration table not found: {tables.get(kind)}")
    base = {k: CalibrationTable.load(tables[k]) for k in KINDS}
    if opts.method:
        base = {k: t.with_method(opts.method) for k, t in base.items()}
    t0 = time.time()
    model = model.cpu().eval()
    fp32 = dict(zip(KINDS, export_onnx(model, work / "fp32", opset=opts.opset)))
    analysis_of = {k: analyze(fp32[k]) for k in KINDS}
    plan_of = {k: load_plan(plans[k]) if plans and plans.get(k) else create_plan(analysis_of[k], default="int8")
               for k in KINDS}
    teacher = fp32_teacher(model) if opts.kd_weight > 0 else None  # before the quantizers go in
    quantized = {k: insert_quantizers(model, plan_of[k], base[k], fp32[k], analysis=analysis_of[k])
                 if opts.fake_quant else [] for k in KINDS}
    if opts.fake_quant and not any(quantized.values()):
        raise WorkbenchError("the plans mark no node int8: nothing to fine-tune")

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    before = greedy_cer(model.to(dev), val_split, 200, dev, DEFAULT_VOCAB)  # PTQ ranges, before fine-tuning
    tcfg = TrainConfig(steps=opts.steps, peak_lr=opts.lr, warmup_steps=opts.warmup, max_frames_per_batch=opts.max_frames,
                       eval_every=opts.eval_every, ckpt_every=opts.eval_every, seed=opts.seed, workers=opts.workers,
                       time_limit_s=opts.time_limit_s, kd_weight=opts.kd_weight, kd_temperature=opts.kd_temperature,
                       freeze_bn=True)
    train(model.cfg, train_split, val_split, work / "train", tcfg, cmvn=None, device=str(dev), progress=progress,
          model=model, teacher=teacher)
    model = model.cpu().eval()
    _round_fp16(model)
    for q in quantizers(model).values():
        if not (torch.isfinite(q.amax).all() and (q.amax > 0).all()):
            raise WorkbenchError("a quantizer's amax is not a positive finite number after fine-tuning")

    with atomic_dir(out) as stage:  # the QAT directory appears only when everything below succeeded
        if opts.fake_quant:
            qdq = dict(zip(KINDS, export_qat_onnx(model, stage / "qdq", opset=opts.opset)))
            problems = [p for k in KINDS for p in validate(qdq[k], plan_of[k], "tensorrt", original=fp32[k])]
            if problems:
                raise WorkbenchError(f"the QAT export fails validation ({len(problems)} problems), first: "
                                     f"{problems[0]}")
        for kind in KINDS:
            qat_table(model, base[kind], fp32[kind], analysis=analysis_of[kind]).save(table_path(stage, kind))
            save_plan(plan_of[kind], stage / f"{kind}.plan.json")
        shutil.copyfile(work / "train" / "train_log.jsonl", stage / "train_log.jsonl")
        summary = {"format": "wb-qat/1", "source_weights": source, "options": asdict(opts),
                   "quantized_nodes": {k: len(v) for k, v in quantized.items()},
                   "base_methods": {k: t.default_method for k, t in base.items()},
                   "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                   "val_cer_ctc_greedy_before": round(before, 4),
                   **_summary_of_log(stage / "train_log.jsonl"), "wall_s": round(time.time() - t0, 1),
                   "validation": "graph.validate (tensorrt recipe): no problems" if opts.fake_quant else
                   "control run without quantizers: no Q/DQ export"}
        plain = copy.deepcopy(model)
        remove_quantizers(plain)
        save_weights(plain, stage / WEIGHTS,
                     extra={"qat": {k: summary.get(k) for k in ("format", "steps", "options")}})
        write_json(stage / SUMMARY, summary)
    shutil.rmtree(work, ignore_errors=True)
    return summary, model
