"""`wb calibrate`: PTQ calibration of an ONNX model in one streaming pass, every range method at once.

Feeds: a WeNet encoder reads the corpus split; a WeNet decoder reads what the FP32 encoder (`--encoder`) and
the CTC prefix beam search make of the corpus, as the pipeline does; any model reads `--data DIR` (.npz feed
dicts). The table covers every tensor any recipe and plan of the model may need (one table, every plan)."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser("calibrate", help="PTQ calibration table (max, percentile, entropy, MSE) in one pass")
    s.add_argument("--model", type=Path, required=True,
                   help="FP32 ONNX model: a WeNet encoder or decoder, or any model with --data")
    s.add_argument("--encoder", type=Path, default=None,
                   help="for a WeNet decoder: the FP32 encoder whose outputs and CTC prefix beam search over the "
                        "corpus make the decoder's calibration feeds")
    s.add_argument("--data", type=Path, default=None,
                   help="directory of .npz files, one feed dict each, keyed by input name (any model)")
    s.add_argument("--cache", type=Path, default=None, help="corpus cache directory (default: $WB_CACHE/corpus)")
    s.add_argument("--split", default="calib")
    s.add_argument("--limit", type=int, default=0, help="first N utterances (or .npz files) only (0: all)")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--methods", default="max,percentile,entropy,mse",
                   help="comma list of max, percentile (99.9,99.99,99.999), percentile_<p>, entropy, mse")
    s.add_argument("--default-method", default="entropy")
    s.add_argument("--bins", type=int, default=2048, help="histogram bins (power of two)")
    s.add_argument("--tensors-per-pass", type=int, default=0, help="collect in chunks of N tensors (0: one pass)")
    s.add_argument("--no-activation-matmuls", action="store_true",
                   help="skip MatMuls between two activations (attention)")
    s.add_argument("--count-padding", action="store_true", help="include padded frames in the statistics")
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--out", type=Path, required=True, help="calibration table JSON")
    s.add_argument("--trt-cache", type=Path, help="also write a TensorRT calibration cache (default method)")
    s.set_defaults(func=run)
    return s


def _feeds(args, inputs: dict):
    """(feed batches, data description) for the model's kind and the options given."""
    from calibration_data.corpus import default_cache_dir, load_split
    from calibration_data.feeds import load_npz_feeds
    from evaluation.runners import GENERIC, guess_kind
    from quant.collect import encoder_feeds

    from core.errors import WorkbenchError

    if args.data is not None:
        feeds = load_npz_feeds(args.data, inputs)
        feeds = feeds[:args.limit] if args.limit else feeds
        return feeds, {"source": str(args.data), "files": len(feeds)}
    kind = guess_kind(list(inputs))
    if kind == GENERIC or (kind == "encoder" and not {"speech", "speech_lengths"} <= set(inputs)):
        raise WorkbenchError(f"{args.model} is not a WeNet encoder or decoder (inputs {sorted(inputs)}): give its "
                             f"calibration feeds with --data DIR (.npz files keyed by input name)")
    split = load_split(args.cache or default_cache_dir(), args.split)
    _check_lengths(split, args)
    info = {"split": args.split, "limit": args.limit or None}
    if kind == "encoder":
        if args.encoder is not None:
            raise WorkbenchError("--encoder is for calibrating a decoder; this model is an encoder")
        return encoder_feeds(split, args.batch_size, limit=args.limit or None), info
    if args.encoder is None:
        raise WorkbenchError(f"{args.model} is a WeNet decoder: its inputs come from the encoder, so give the FP32 "
                             f"encoder with --encoder E (or your own feeds with --data DIR)")
    from evaluation.asr import decoder_calibration_feeds
    from engines import open_onnx

    encoder = open_onnx(args.encoder, kind="encoder", threads=args.threads)
    n = min(len(split), args.limit) if args.limit else len(split)
    feats = [split.features(i) for i in range(n)]
    return decoder_calibration_feeds(encoder, list(inputs), feats, args.batch_size, progress=True), \
        info | {"encoder": str(args.encoder)}


def _check_lengths(split, args) -> None:
    """Every utterance the pass reads has the frames the encoder's subsampling needs (not an ONNX Runtime shape
    error mid-pass, nor a 3-frame utterance padded into a batch and taken silently)."""
    import numpy as np

    from core.errors import WorkbenchError
    from evaluation.asr import MIN_FRAMES

    n = min(len(split), args.limit) if args.limit else len(split)
    lengths = np.diff(np.asarray(split.offsets))[:n]
    short = np.flatnonzero(lengths < MIN_FRAMES)
    if short.size:
        i = int(short[0])
        more = f" (and {short.size - 1} more)" if short.size > 1 else ""
        raise WorkbenchError(f"corpus split {args.split!r}: utterance {i} has {int(lengths[i])} frames{more}; the "
                             f"encoder's subsampling needs at least {MIN_FRAMES}")


def run(args) -> None:
    from engines.base import onnx_io
    from quant.calibrate import calibrate
    from core.fsutil import check_model_file, check_writable_target

    from core.errors import WorkbenchError

    if args.batch_size < 1:
        raise WorkbenchError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_model_file(args.model)
    if args.encoder is not None:
        check_model_file(args.encoder, "FP32 encoder")
    for target in (args.out, args.trt_cache):  # before the pass, not after it
        if target is not None:
            check_writable_target(target)
    feeds, info = _feeds(args, onnx_io(args.model)["inputs"])
    table = calibrate(args.model, feeds, methods=args.methods, default_method=args.default_method, bins=args.bins,
                      tensors_per_pass=args.tensors_per_pass or None, threads=args.threads,
                      include_activation_matmuls=not args.no_activation_matmuls,
                      padding=None if args.count_padding else "auto", data_info=info)
    table.save(args.out)  # only reached when everything succeeded: no table on error
    if args.trt_cache:
        table.write_trt_cache(args.trt_cache)
    d = table.data["data"]
    print(f"calibrated {len(table.tensors)} tensors and {len(table.data['weights'])} weights on {d['n_samples']} "
          f"samples ({d['collect_s']:.1f} s collecting, {d['methods_s']:.1f} s ranges): {args.out}"
          + (f", {args.trt_cache}" if args.trt_cache else ""))
