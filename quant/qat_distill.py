"""QAT by output distillation, for a task whose model is one PyTorch module (issue 17: MiniLM sentence embeddings).

`quant.qat_run` fine-tunes the workbench's own ASR model with its training loop and labels. A model we did not
write has no training recipe here, and its task judges it against its own FP32 outputs, so the fine-tune that
serves that task needs no labels: the student (fake-quantized, `quant.qat`) learns to reproduce the FP32
teacher's output on unlabelled task data, loss 1 - cos(student, teacher) per item (the output is an embedding;
its cosine to FP32 is what the task's criterion reads; `relation_weight` adds an in-batch similarity term for
neighbour-ranking metrics, off by default: it did not help all-MiniLM-L6-v2, experiments/results/minilm_pertoken/).

    model (FP32 torch) --[smooth_linears: SmoothQuant folded into the weights, a Mul on each input]--> export
    FP32 ONNX --[quant.calibrate]--> base table --[quant.qat.insert_quantizers, all Linear int8]--> fine-tune
    --> quantizers removed --> the fine-tuned FP32 ONNX + the base table with the trained input ranges (method
    "qat", quant.qat.qat_table)

QAT directory (written atomically; `check_qat_dir` and the task's `extra_methods` read it):
  qat.json                  summary: {"format": "wb-qat/1", "task", "graphs": {graph: onnx file}, options, log}
  <graph>.onnx              the fine-tuned FP32 graph (SmoothQuant's Muls in it): the source the pipeline places
  <graph>.table.json        calibration table, method "qat" (every other tensor: the base method's range)
  <graph>.plan.json         the plan the quantizers were inserted for
  train_log.jsonl           the training log
The fake quantizers model the onnxruntime recipe with `ort_float_outputs = "matmul"` and the tensorrt recipe's
MatMuls: symmetric int8 inputs per tensor, weights per output channel, float outputs. Activation ranges start
at the base calibrator's and are trained too (`range_lr`, LSQ: PyTorch's learnable fake-quantize op on the log of
the range), since per-tensor input noise is what the weights alone cannot absorb. With the config's
`ort_per_token_inputs` (`per_token`), those MatMuls' inputs are fake-quantized per token instead (each row its own
scale, graph.per_token's arithmetic; nothing to learn there), and `smoothquant = "layernorm"` smooths only the
LayerNorm outputs' readers, as the pipeline's option does.
"""
from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from core.errors import WorkbenchError
from core.fsutil import atomic_dir, write_json

FORMAT = "wb-qat/1"
SUMMARY = "qat.json"


@dataclass
class DistillOptions:
    steps: int = 400
    lr: float = 2e-5            # peak, linear warm-up then cosine decay (1e-4 overshoots on MiniLM)
    range_lr: float = 1e-3      # of the log activation ranges (0: ranges fixed at the calibrator's)
    warmup: int = 30
    batch_size: int = 32
    method: str = "max"         # base calibrator of the activation ranges
    smoothquant: str = "all"    # "all" | "layernorm" | "none": SmoothQuant before quantizing, on every Linear's
                                # input or only on LayerNorm outputs (graph.smooth.smoothing_groups)
    alpha: float = 0.85
    eval_every: int = 100
    seed: int = 0
    keep_fp32: str = ""         # regex of node ids left without quantizers (the FP32 nodes of the mix to train
                                # for; "": all-INT8)
    time_limit_s: float = 0.0   # stop (and finish) when reached; 0: no limit
    threads: int = 0            # torch threads (0: torch's default)
    float_outputs: str = "matmul"  # the onnxruntime recipe's ort_float_outputs and ort_per_token_inputs: which
    per_token: str = "none"        # MatMuls' inputs are quantized per token (graph.placement.per_token_nodes)
    relation_weight: float = 0.0  # weight of the in-batch similarity loss (_relation_loss); 0: cosine only


def smooth_linears(model, feeds: Iterable[Mapping], alpha: float, only: set[str] | None = None) -> int:
    """SmoothQuant on every nn.Linear of `model` (or those whose module path is in `only`), in place, exact in
    FP32: s = amax_x^alpha / amax_w^(1-alpha)
    per input channel from `feeds` (quant.smooth.smoothing_scales, the pipeline's formula), the weight's input
    columns times s and the input times 1/s (a buffer `smooth_inv` and a forward pre-hook, which the ONNX
    export writes as a Mul before the MatMul, as graph.smooth does). Done on the module here because the
    fine-tune trains the smoothed weights. Returns how many Linears were smoothed."""
    import torch
    from torch import nn

    from .smooth import smoothing_scales

    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and (only is None or n in only)}
    amax: dict[str, torch.Tensor] = {}

    def observe(name):
        def hook(_mod, inp):
            a = inp[0].detach().abs().reshape(-1, inp[0].shape[-1]).amax(0)
            amax[name] = torch.maximum(amax[name], a) if name in amax else a
        return hook

    hooks = [m.register_forward_pre_hook(observe(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            for f in feeds:
                model(*_inputs(f))
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for n, m in linears.items():
            s = torch.from_numpy(smoothing_scales(amax[n].numpy(), m.weight.abs().amax(0).numpy(), alpha))
            m.weight.mul_(s[None, :])
            m.register_buffer("smooth_inv", (1.0 / s).float())
            m.register_forward_pre_hook(lambda mod, inp: (inp[0] * mod.smooth_inv,))
    return len(linears)


def _inputs(feeds: Mapping) -> tuple:
    import torch

    return tuple(torch.from_numpy(np.asarray(v)) for v in feeds.values())


def _unit(out):
    """Each item's output as one unit vector (the embedding's direction, which cosine reads)."""
    import torch

    return torch.nn.functional.normalize(out.flatten(1), dim=1)


def _cosine_loss(student_out, teacher_out):
    return (1 - (_unit(student_out) * _unit(teacher_out)).sum(1)).mean()


def _relation_loss(student_out, teacher_out):
    """Mean squared difference of the batch's cosine-similarity matrices, student against teacher: what a
    neighbour-ranking metric (recall@k) reads is how each pair's similarity moves, which 1 - cos per item does not
    see (two embeddings can each keep cosine 0.999 to FP32 and still swap their order as neighbours)."""
    s, t = _unit(student_out), _unit(teacher_out)
    return ((s @ s.T - t @ t.T) ** 2).mean()


def _fine_tune(student, teacher, train, val: list[Mapping], opts: DistillOptions, learned: list, rng, log_path: Path,
               desc: str, progress: bool) -> tuple[float, float, int, float]:
    """The distillation loop: AdamW (weights at `lr`, learned log ranges at `range_lr`), linear warm-up then
    cosine decay, loss 1 - cos(student, teacher) (+ relation_weight x _relation_loss) on
    `train(rng, batch_size)`; one JSON line per step in `log_path`. Returns (val cosine before, after, steps done,
    mean loss of the last 20 steps)."""
    import torch
    from tqdm import tqdm

    with torch.no_grad():
        val_targets = [teacher(*_inputs(f)) for f in val]  # the teacher is frozen: its outputs once

    @torch.no_grad()
    def val_cosine() -> float:
        student.eval()
        c = [1 - _cosine_loss(student(*_inputs(f)), t).item() for f, t in zip(val, val_targets)]
        student.train()
        return float(np.mean(c))

    ranges = [q.log_amax for q in learned]
    ids = {id(p) for p in ranges}
    weights = [p for p in student.parameters() if id(p) not in ids]
    groups = [{"params": weights, "peak": opts.lr}] + ([{"params": ranges, "peak": opts.range_lr}] if ranges else [])
    opt = torch.optim.AdamW(groups, lr=opts.lr, weight_decay=0.0)
    t0 = time.time()
    recent: deque[float] = deque(maxlen=20)
    step = 0
    with log_path.open("w") as log:
        before = val_cosine()
        log.write(json.dumps({"step": 0, "val_cosine": round(before, 6), "time_s": 0.0}) + "\n")
        student.train()
        bar = tqdm(range(1, opts.steps + 1), desc=desc, unit="step", disable=not progress)
        for step in bar:
            f = min(1.0, step / max(opts.warmup, 1)) * 0.5 * (1 + math.cos(math.pi * step / opts.steps))
            for g in opt.param_groups:
                g["lr"] = g["peak"] * f
            batch = train(rng, opts.batch_size)
            with torch.no_grad():
                target = teacher(*_inputs(batch))
            out = student(*_inputs(batch))
            loss = _cosine_loss(out, target)
            if opts.relation_weight:
                relation = _relation_loss(out, target)
                loss = loss + opts.relation_weight * relation
            opt.zero_grad()
            loss.backward()
            opt.step()
            recent.append(loss.item())
            rec = {"step": step, "loss": round(recent[-1], 7), "time_s": round(time.time() - t0, 1)}
            if opts.relation_weight:
                rec["relation"] = round(relation.item(), 9)
            if step % opts.eval_every == 0 or step == opts.steps:
                rec["val_cosine"] = round(val_cosine(), 6)
            log.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{np.mean(recent):.2e}", **({"val_cos": rec["val_cosine"]} if "val_cosine" in rec else {}))
            if opts.time_limit_s and time.time() - t0 > opts.time_limit_s:
                break
    after = val_cosine()
    student.eval()
    return before, after, step, float(np.mean(recent))


def run_distill_qat(spec: Mapping, calib: list[Mapping], val: list[Mapping], out_dir: str | Path,
                    opts: DistillOptions = DistillOptions(), task: str = "", progress: bool = True,
                    mix: Mapping | None = None) -> dict:
    """QAT of a task's model (`spec`: what `Task.qat_model()` returns: "graph", "build", "write_onnx", "train",
    "info", "data") written to `out_dir` as a QAT directory (module docstring). `calib`: calibration feeds
    (smoothing and the base ranges); `val`: feeds whose mean cosine to FP32 is logged every `eval_every` steps.
    `mix`: where `opts.keep_fp32` came from (e.g. a search run's fallbacks), recorded as is. Returns the qat.json
    summary."""
    import torch

    from graph.analysis import analyze
    from graph.plan import create_plan, edit_plan, save_plan

    from .calibrate import calibrate
    from .qat import insert_quantizers, module_of_node, qat_table, quantizers, remove_quantizers

    from graph.placement import check_per_token, per_token_nodes
    from graph.smooth import TARGETS, smoothing_groups

    if opts.smoothquant not in TARGETS:
        raise WorkbenchError(f"unknown smoothquant targets {opts.smoothquant!r}: use one of {', '.join(TARGETS)}")
    check_per_token(opts.per_token, opts.float_outputs)
    if opts.steps < 1 or opts.batch_size < 1:
        raise WorkbenchError(f"QAT needs steps >= 1 and batch_size >= 1, got {opts.steps} and {opts.batch_size}")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    out, graph, write_onnx = Path(out_dir), spec["graph"], spec["write_onnx"]
    t0 = time.time()
    teacher = spec["build"]().eval().requires_grad_(False)
    student = spec["build"]().eval()
    with atomic_dir(out) as stage:
        only = None
        if opts.smoothquant == "layernorm":  # the LayerNorm outputs' readers, found on the graph as the pipeline does
            write_onnx(student, stage / "unsmoothed.onnx")
            modules = dict(student.named_modules())
            only = {module_of_node(q.id, modules)
                    for nodes in smoothing_groups(onnx.load(stage / "unsmoothed.onnx"), "layernorm").values()
                    for q in nodes}
            (stage / "unsmoothed.onnx").unlink()
        smoothed = smooth_linears(student, calib, opts.alpha, only) if opts.smoothquant != "none" else 0
        base_onnx = stage / "base.onnx"  # the smoothed FP32 graph, before fine-tuning (removed at the end)
        write_onnx(student, base_onnx)
        base = calibrate(base_onnx, calib, methods=opts.method, default_method=opts.method, progress=progress,
                         data_info={"task": task, "graph": graph, "feeds": len(calib)})
        analysis = analyze(base_onnx)
        plan = create_plan(analysis, default="int8")
        if opts.keep_fp32:
            plan = edit_plan(plan, pattern=opts.keep_fp32, precision="fp32")
        per_token = per_token_nodes(analysis, plan, opts.float_outputs, opts.per_token)
        quantized = insert_quantizers(student, plan, base, base_onnx, analysis=analysis, per_token=per_token)
        if not quantized:
            raise WorkbenchError(f"graph {graph!r} has no Linear whose MatMul QAT can quantize")
        learned = []
        if opts.range_lr > 0:
            for q in quantizers(student).values():
                if not q.dynamic and not q.per_token:  # calibrated input ranges (weights follow their own max)
                    q.learn_range()
                    learned.append(q)

        before, after, step, last = _fine_tune(student, teacher, spec["train"], val, opts, learned, rng,
                                               stage / "train_log.jsonl", f"QAT {graph}", progress)
        for q in learned:
            q.freeze_range()  # the trained range into the amax buffer that qat_table and export read
        for q in quantizers(student).values():
            if not (torch.isfinite(q.amax).all() and (q.amax > 0).all()):
                raise WorkbenchError("a quantizer's range is not a positive finite number after fine-tuning")
        table = qat_table(student, base, base_onnx, analysis=analysis)
        remove_quantizers(student)
        write_onnx(student, stage / f"{graph}.onnx")
        table.save(stage / f"{graph}.table.json")
        save_plan(plan, stage / f"{graph}.plan.json")
        base_onnx.unlink()
        summary = {"format": FORMAT, "task": task, "graphs": {graph: f"{graph}.onnx"}, "model": dict(spec["info"]),
                   "data": dict(spec.get("data") or {}), "options": asdict(opts),
                   **({"mix": dict(mix)} if mix else {}), "quantized_nodes": len(quantized), "smoothed_linears": smoothed,
                   "learned_ranges": len(learned), "per_token_inputs": len(per_token), "steps": step, "val_cosine_before": round(before, 6),
                   "val_cosine_after": round(after, 6), "loss_last20": round(last, 7),
                   "wall_s": round(time.time() - t0, 1)}
        write_json(stage / SUMMARY, summary)
    return summary


def read_summary(qat_dir: str | Path) -> dict | None:
    """qat.json of a task QAT directory (one with "graphs"), or None for another kind (WeNet's `wb qat`)."""
    p = Path(qat_dir) / SUMMARY
    if not p.is_file():
        return None
    try:
        s = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise WorkbenchError(f"{p} is not JSON: {e}") from None
    return s if isinstance(s, dict) and "graphs" in s else None


def check_task_qat_dir(qat_dir: str | Path, task: str | None = None, model: Mapping | None = None) -> dict:
    """The summary of a task QAT directory (for `task` and its `model` info, when given), every file it names
    present; one-line refusals otherwise."""
    d = Path(qat_dir)
    s = read_summary(d)
    if s is None:
        raise WorkbenchError(f"{d} is not a QAT directory written by `wb qat --config` (no {SUMMARY} with graphs)")
    if s.get("format") != FORMAT or (task is not None and s.get("task") != task):
        raise WorkbenchError(f"{d} is a QAT directory of task {s.get('task')!r} ({s.get('format')}), not of {task!r}")
    if model is not None and s.get("model") != dict(model):
        raise WorkbenchError(f"{d} was fine-tuned from another model ({s.get('model')}; this task's is {dict(model)})")
    for g, f in s["graphs"].items():
        for p in (d / f, d / f"{g}.table.json"):
            if not p.is_file():
                raise WorkbenchError(f"{d} is an incomplete QAT directory: {p.name} is missing")
    return s


def task_qat_sources(qat_dir: str | Path, task, run_dir: Path) -> dict[str, dict[str, Path]]:
    """Calibrator "qat" of a run from a task QAT directory: its fine-tuned graphs copied to the run's
    models/qat_fp32/ (placement sources, as WeNet's QAT) and its tables to calibration/<graph>.qat.json."""
    import shutil

    spec = task.qat_model()  # tasks.entry.load_task checked the directory against it before the run
    s = check_task_qat_dir(qat_dir, task.name, spec["info"] if spec else None)
    d, sources, tables = Path(qat_dir), {}, {}
    for g, f in s["graphs"].items():
        for src, dst in ((d / f, run_dir / "models" / "qat_fp32" / f"{g}.onnx"),
                         (d / f"{g}.table.json", run_dir / "calibration" / f"{g}.qat.json")):
            if not dst.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
        sources[g], tables[g] = run_dir / "models" / "qat_fp32" / f"{g}.onnx", run_dir / "calibration" / f"{g}.qat.json"
    return {"sources": sources, "tables": tables}
