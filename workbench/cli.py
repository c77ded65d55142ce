"""`wb`: a thin command line over the library (each subcommand parses, calls one library function, prints)."""
from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import pkgutil
import sys
import time
from pathlib import Path

from core.errors import WorkbenchError


def _sizes(text: str) -> dict[str, int]:
    out = {}
    for part in text.split(","):
        name, _, n = part.partition("=")
        if not n.isdigit():
            raise argparse.ArgumentTypeError(f"expected split=count[,split=count], got {part!r}")
        out[name.strip()] = int(n)
    return out


def cmd_data(args) -> None:
    from calibration_data.corpus import DEFAULT_SIZES, ensure_corpus

    sizes = {**DEFAULT_SIZES, **(args.sizes or {})}
    if args.splits:
        sizes = {k: v for k, v in sizes.items() if k in args.splits.split(",")}
    # a larger split of the same recipe serves (its first utterances are these): never regenerate it smaller
    path = ensure_corpus(args.cache, sizes, seed=args.seed, workers=args.workers, at_least=True)
    print(f"corpus ready in {path}: " + ", ".join(f"{k}={v}" for k, v in sizes.items()))


def _model(args):
    from models.weights import default_model, load_weights

    if args.weights:
        return load_weights(args.weights), True
    return default_model(args.config)


def cmd_export(args) -> None:
    from models.export import export_onnx

    model, trained = _model(args)
    enc, dec = export_onnx(model, args.out, opset=args.opset, ctc_weight=args.ctc_weight)
    print(f"exported {'trained' if trained else 'RANDOM-INIT'} {model.cfg.name} model: {enc}, {dec}")


def _check_json_target(args) -> None:
    """--json must be writable before the evaluation runs, not after."""
    if getattr(args, "json", None) is not None:
        from core.fsutil import check_writable_target

        check_writable_target(args.json)


def _vocab(args):
    """--vocab (WeNet units.txt) or the bundled 31 characters."""
    from calibration_data.text import DEFAULT_VOCAB, load_units

    return load_units(args.vocab) if args.vocab else DEFAULT_VOCAB


def cmd_evaluate(args) -> None:
    _check_json_target(args)
    from calibration_data.corpus import load_split
    from evaluation.asr import evaluate
    from engines import open_onnx

    split = load_split(args.cache, args.split)
    n = min(len(split), args.limit) if args.limit else len(split)
    feats = [split.features(i) for i in range(n)]
    enc = open_onnx(args.encoder, kind="encoder", threads=args.threads)
    dec = open_onnx(args.decoder, kind="decoder", threads=args.threads)
    t0 = time.time()
    res = evaluate(enc, dec, feats, split.texts[:n], _vocab(args), batch_size=args.batch_size)
    summary = {k: v for k, v in res.items() if k != "utterances"} | {"split": args.split, "wall_s": round(time.time() - t0, 1)}
    print(json.dumps(summary, indent=2))
    if args.json:
        from core.fsutil import write_json
        write_json(args.json, summary | {"utterances": res["utterances"]})


def cmd_check(args) -> None:
    _check_json_target(args)
    from calibration_data.corpus import load_split
    from evaluation.hackathon import format_table, make_cases, run_check
    from engines import open_onnx

    if bool(args.ref_encoder) != bool(args.ref_decoder):
        raise WorkbenchError("give both --ref-encoder and --ref-decoder (or neither: the PyTorch model is the reference)")
    if args.ref_encoder and args.ref_decoder:
        ref_e, ref_d = open_onnx(args.ref_encoder, kind="encoder"), open_onnx(args.ref_decoder, kind="decoder")
    else:  # the PyTorch model itself is the FP32 reference
        from models.runner import TorchRunner

        model, _ = _model(args)
        ref_e, ref_d = TorchRunner(model, "encoder"), TorchRunner(model, "decoder")
    split = load_split(args.cache, args.split)
    pool = [split.features(i) for i in range(min(len(split), 64))]
    cand_e, cand_d = open_onnx(args.encoder, kind="encoder"), open_onnx(args.decoder, kind="decoder")
    for name, runner in (("reference", ref_d), ("candidate", cand_d)):
        if "decoder_out" not in runner.output_names:
            raise WorkbenchError(f"the {name} decoder has no output decoder_out, which the hackathon check compares: "
                                 f"WeNet's export_onnx_gpu.py writes it only with --decoder_fastertransformer; "
                                 f"re-export the decoder with that flag")
    if args.vocab:
        import numpy as np

        units = _vocab(args)
        probe = ref_e.run({"speech": pool[0][None], "speech_lengths": np.array([len(pool[0])], np.int32)})
        n = probe["ctc_log_probs"].shape[-1]
        if n != len(units):
            raise WorkbenchError(f"the encoder has {n} output units but the vocabulary {args.vocab} has {len(units)}")
    rows = run_check(ref_e, ref_d, cand_e, cand_d, make_cases(ref_e, pool))
    print(format_table(rows))
    if args.json:
        from core.fsutil import write_json
        write_json(args.json, rows)


def cmd_train(args) -> None:
    from calibration_data.corpus import cmvn_stats, load_split
    from models.config import get_config
    from models.train import TrainConfig, train
    from models.weights import save_weights

    tcfg = TrainConfig(steps=args.steps, seed=args.seed, time_limit_s=args.time_limit,
                       max_frames_per_batch=args.max_frames, peak_lr=args.lr, warmup_steps=args.warmup,
                       eval_every=args.eval_every, ckpt_every=args.eval_every, workers=args.workers,
                       init_weights=str(args.init or ""), lr_step_offset=args.lr_step_offset)
    tr, val = load_split(args.cache, "train"), load_split(args.cache, "calib")
    model = train(get_config(args.config), tr, val, args.out, tcfg, cmvn_stats(tr), device=args.device)
    save_weights(model.cpu(), Path(args.out) / f"{args.config}.safetensors")
    print(f"weights written to {Path(args.out) / (args.config + '.safetensors')}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wb", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    cache = dict(default=None, type=Path, help="corpus cache directory (default: $WB_CACHE/corpus or .cache/corpus)")

    s = sub.add_parser("data", help="generate (or reuse) the synthetic speech corpus")
    s.add_argument("--cache", **cache)
    s.add_argument("--sizes", type=_sizes, help="e.g. train=20000,calib=512,test=500")
    s.add_argument("--splits", help="only these splits, e.g. calib,test")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=None)
    s.set_defaults(func=cmd_data)

    def model_args(s):
        s.add_argument("--weights", type=Path, help="a .safetensors written by `wb train` (default: shipped weights)")
        s.add_argument("--config", default="small", help="config when no weights are given: tiny|small")

    s = sub.add_parser("export", help="export encoder.onnx and decoder.onnx with WeNet's GPU interface")
    model_args(s)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--opset", type=int, default=13, help="13 as WeNet (decomposed LayerNorm), 17+ native")
    s.add_argument("--ctc-weight", type=float, default=0.5, help="rescoring weight baked into the decoder")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("evaluate", help="CER/WER of an encoder+decoder pair on a corpus split (ONNX Runtime)")
    s.add_argument("--encoder", type=Path, required=True)
    s.add_argument("--decoder", type=Path, required=True)
    s.add_argument("--cache", **cache)
    s.add_argument("--split", default="test")
    s.add_argument("--limit", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--vocab", type=Path, help="WeNet units.txt of the model (default: the bundled 31 characters)")
    s.add_argument("--json", type=Path)
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("check", help="the hackathon output check of a candidate pair against a reference pair")
    model_args(s)
    s.add_argument("--ref-encoder", type=Path, help="reference ONNX (default: the PyTorch model itself)")
    s.add_argument("--ref-decoder", type=Path)
    s.add_argument("--encoder", type=Path, required=True)
    s.add_argument("--decoder", type=Path, required=True)
    s.add_argument("--cache", **cache)
    s.add_argument("--split", default="calib")
    s.add_argument("--vocab", type=Path, help="WeNet units.txt: checked against the encoder's output units")
    s.add_argument("--json", type=Path)
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("train", help="train a model config on the corpus (GPU if present)")
    s.add_argument("--config", default="small")
    s.add_argument("--cache", **cache)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--steps", type=int, default=6000)
    s.add_argument("--lr", type=float, default=1.5e-3)
    s.add_argument("--warmup", type=int, default=800)
    s.add_argument("--max-frames", type=int, default=60000)
    s.add_argument("--eval-every", type=int, default=500)
    s.add_argument("--time-limit", type=float, default=0.0, help="seconds; checkpoint and stop when reached")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default=None)
    s.add_argument("--workers", type=int, default=6, help="data-loader worker processes (0: in-process)")
    s.add_argument("--init", type=Path, help="continue from these weights (fresh optimizer)")
    s.add_argument("--lr-step-offset", type=int, default=0, help="steps already done by --init weights")
    s.set_defaults(func=cmd_train)

    # Subcommands contributed by the library packages (calibrate, quantize, build/bench, ...).
    from . import commands
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "cache", None) is None and hasattr(args, "cache"):
        from calibration_data.corpus import default_cache_dir
        args.cache = default_cache_dir()
    try:
        args.func(args)
    except WorkbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        run_dir = getattr(args, "active_run_dir", None)  # set by `wb search` once it has a run directory
        print("\ninterrupted" + (f"; resume with wb search --run-dir {run_dir}" if run_dir else ""), file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise  # anything else is a bug: keep its traceback
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or os.strerror(exc.errno)}{where}", file=sys.stderr)
        return 2
    return 0


# The machine's fault, not the workbench's: full disk or quota, read-only file system (one line, exit 2).
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


if __name__ == "__main__":
    sys.exit(main())
