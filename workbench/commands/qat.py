"""`wb qat`: quantization-aware fine-tuning; writes a QAT directory that `wb search` reads as calibrator "qat"
(config `[qat] dir`).

  wb qat --tables RUN --out DIR           the bundled ASR model, from a run's PTQ tables (quant.qat_run)
  wb qat --config TASK.toml --out DIR     a task with a PyTorch model (Task.qat_model: MiniLM), by distillation
                                          of its FP32 outputs (quant.qat_distill)"""
from __future__ import annotations

from pathlib import Path

from core.errors import WorkbenchError


def register(sub) -> None:
    s = sub.add_parser("qat", help="QAT fine-tune: the bundled ASR model from PTQ tables (GPU if present), or a "
                                   "task's own model by distillation (--config, CPU)")
    s.add_argument("--weights", type=Path, help="trained .safetensors (default: the shipped small model)")
    s.add_argument("--tables", type=Path,
                   help="directory with encoder.json and decoder.json calibration tables, e.g. a run's "
                        "calibration/ directory from `wb search` (or the run directory itself)")
    s.add_argument("--config", type=Path, action="append", default=[],
                   help="instead of --tables: a task config (as `wb search --config`, repeatable) whose task has a "
                        "PyTorch model; QAT by distillation of its FP32 outputs")
    s.add_argument("--method", default=None, help="amax method of the tables (default: their default, e.g. entropy; "
                                                  "with --config: the calibrator the ranges start from, default max)")
    s.add_argument("--encoder-plan", type=Path, help="precision plan JSON (default: all Linear/Conv int8)")
    s.add_argument("--decoder-plan", type=Path)
    s.add_argument("--cache", type=Path, default=None, help="corpus cache (needs the train and calib splits)")
    s.add_argument("--out", type=Path, required=True, help="QAT directory to write")
    s.add_argument("--steps", type=int, default=None, help="default 1000 (--config: 400)")
    s.add_argument("--lr", type=float, default=None, help="peak learning rate (default 5e-5; --config: 2e-5)")
    s.add_argument("--warmup", type=int, default=None, help="default 100 (--config: 30)")
    s.add_argument("--range-lr", type=float, default=1e-3,
                   help="--config: learning rate of the log activation ranges (0: fixed at the calibrator's)")
    s.add_argument("--batch-size", type=int, default=32, help="--config: training items per step")
    s.add_argument("--threads", type=int, default=0, help="--config: torch CPU threads (0: torch's default)")
    s.add_argument("--keep-fp32", default="", metavar="REGEX",
                   help="--config: node ids (regex) fine-tuned without quantizers: QAT for a mix that keeps them "
                        "FP32 (e.g. the search's fallbacks); default all-INT8")
    s.add_argument("--mix-of", type=Path, default=None, metavar="RUN",
                   help="--config: instead of --keep-fp32, the FP32 fallbacks of the mix a `wb search` run selected "
                        "(its run directory)")
    s.add_argument("--release", type=int, default=0, metavar="N",
                   help="--mix-of: train with the N least sensitive of those fallbacks in INT8 (by the run's "
                        "sensitivity), so that the search from \"qat\" may pass with fewer; default 0")
    s.add_argument("--relation-weight", type=float, default=0.0,
                   help="--config: weight of an in-batch similarity loss beside 1 - cos (the squared change of "
                        "every pair's cosine; for neighbour-ranking metrics); default 0")
    s.add_argument("--kd-weight", type=float, default=0.5, help="distillation from the FP32 model (0: off)")
    s.add_argument("--kd-temperature", type=float, default=1.0)
    s.add_argument("--max-frames", type=int, default=60000, help="padded frames per batch")
    s.add_argument("--eval-every", type=int, default=250)
    s.add_argument("--time-limit", type=float, default=0.0, help="seconds; stop (and finish) when reached")
    s.add_argument("--workers", type=int, default=6)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--opset", type=int, default=13)
    s.add_argument("--device", default=None)
    s.add_argument("--no-fake-quant", action="store_true",
                   help="ablation control: the same fine-tune without quantizers (is it QAT, or just more training?)")
    s.set_defaults(func=run)


def _tables(path: Path) -> dict[str, Path]:
    for d in (path, path / "calibration"):
        found = {k: d / f"{k}.json" for k in ("encoder", "decoder")}
        if all(p.is_file() for p in found.values()):
            return found
    raise WorkbenchError(f"{path} holds no encoder.json and decoder.json calibration tables (pass a `wb search` "
                         f"run directory or its calibration/ directory)")


def _shown(path: Path) -> str:
    """The path as recorded in qat.json: relative to the working directory when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def run(args) -> None:
    if args.config:
        if args.tables:
            raise WorkbenchError("give --tables (the bundled ASR model) or --config (a task's model), not both")
        return run_task(args)
    if not args.tables:
        raise WorkbenchError("wb qat needs --tables (a run of the bundled ASR model) or --config (a task config)")
    args.steps = 1000 if args.steps is None else args.steps
    args.lr = 5e-5 if args.lr is None else args.lr
    args.warmup = 100 if args.warmup is None else args.warmup
    from calibration_data.corpus import default_cache_dir, load_split
    from models.weights import DEFAULT_WEIGHTS, load_weights
    from quant.qat_run import QatOptions, run_qat

    from core.fsutil import check_writable_dir_target
    from quant.table import CalibrationTable

    check_writable_dir_target(args.out)  # before the training, not after it
    weights = args.weights or DEFAULT_WEIGHTS
    tables = _tables(args.tables)
    for path in tables.values():  # every range QAT starts from, checked before any work
        table = CalibrationTable.load(path)
        for tensor in table.tensors:
            table.amax(tensor)
    model = load_weights(weights)
    cache = args.cache or default_cache_dir()
    train_split, val_split = load_split(cache, "train"), load_split(cache, "calib")
    opts = QatOptions(steps=args.steps, lr=args.lr, warmup=args.warmup, kd_weight=args.kd_weight,
                      kd_temperature=args.kd_temperature, max_frames=args.max_frames, eval_every=args.eval_every,
                      seed=args.seed, workers=args.workers, time_limit_s=args.time_limit, opset=args.opset,
                      method=args.method, fake_quant=not args.no_fake_quant)
    plans = {"encoder": args.encoder_plan, "decoder": args.decoder_plan}
    summary, _ = run_qat(model, tables, args.out, train_split, val_split, opts, plans=plans, device=args.device,
                         source=_shown(weights))
    val = summary.get("val_cer_ctc_greedy") or []
    print(f"QAT: {summary.get('steps')} steps on {summary['device']}, loss {summary.get('loss_first')} -> "
          f"{summary.get('loss_last')}, val greedy CER{' (fake-quant)' if opts.fake_quant else ''} "
          f"{summary['val_cer_ctc_greedy_before']:.4f} before"
          + (f", {val[-1][1]:.4f} after" if val else "")
          + f"; quantized nodes {summary['quantized_nodes']}; written to {args.out}")


def _mix_of(args, graph: str) -> tuple[str, dict | None]:
    """The keep_fp32 regex and, with --mix-of RUN, where it came from (qat.json's "mix"): the run's selected
    fallbacks of `graph`, less --release."""
    import re

    from pipeline.runfile import load_run, selected_fallbacks

    if args.mix_of is None:
        if args.release:
            raise WorkbenchError("--release needs --mix-of RUN")
        return args.keep_fp32, None
    if args.keep_fp32:
        raise WorkbenchError("give --keep-fp32 or --mix-of, not both")
    run = load_run(args.mix_of)
    kept, released = selected_fallbacks(run, graph, release=args.release)
    print(f"QAT for the mix of run {run['id']}: {len(kept)} FP32 ({', '.join(kept) or 'none'})"
          + (f"; back to INT8, the least sensitive: {', '.join(released)}" if released else ""))
    regex = "^(" + "|".join(map(re.escape, kept)) + ")$" if kept else ""
    return regex, {"run": run["id"], "fp32": kept, "released": released}


def run_task(args) -> None:
    """QAT by distillation of a task's model (quant.qat_distill): the task's calibration feeds give the starting
    ranges, its `qat_model()` the module and the training batches."""
    from core.fsutil import check_writable_dir_target
    from pipeline.config import is_wenet, load_config
    from quant.qat_distill import DistillOptions, run_distill_qat
    from tasks import load_task

    cfg = load_config(*args.config)
    if is_wenet(cfg):
        raise WorkbenchError("the bundled ASR model's QAT reads a run's tables: use `wb qat --tables RUN --out DIR`")
    check_writable_dir_target(args.out)
    task = load_task(cfg, base_dir=args.config[-1].parent)
    spec = task.qat_model()
    if spec is None:
        raise WorkbenchError(f"task {task.name!r} has no PyTorch model to fine-tune (Task.qat_model); QAT needs one")
    keep_fp32, mix = _mix_of(args, spec["graph"])
    c = cfg["calibration"]
    opts = DistillOptions(steps=400 if args.steps is None else args.steps, lr=2e-5 if args.lr is None else args.lr,
                          warmup=30 if args.warmup is None else args.warmup, range_lr=args.range_lr,
                          batch_size=args.batch_size, method=args.method or "max",
                          smoothquant=c["smoothquant"], alpha=c["smoothquant_alpha"],
                          eval_every=args.eval_every, seed=args.seed, time_limit_s=args.time_limit,
                          keep_fp32=keep_fp32, threads=args.threads, relation_weight=args.relation_weight,
                          float_outputs=cfg["quantize"]["ort_float_outputs"],
                          per_token=cfg["quantize"]["ort_per_token_inputs"])
    calib = list(task.calibration_feeds(spec["graph"]))
    val = list(task.ranking_feeds(spec["graph"]))
    summary = run_distill_qat(spec, calib, val, args.out, opts, task=task.name, mix=mix)
    print(f"QAT of {task.name} ({spec['graph']}): {summary['steps']} steps, {summary['quantized_nodes']} MatMuls "
          f"int8{' (' + opts.keep_fp32 + ' FP32)' if opts.keep_fp32 else ''}, cosine to FP32 on {len(val)} calibration batches {summary['val_cosine_before']:.5f} before, "
          f"{summary['val_cosine_after']:.5f} after; {summary['wall_s']:.0f} s; written to {args.out} (use it with "
          f"[qat] dir = \"{args.out}\")")
