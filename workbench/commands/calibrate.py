"""`wb calibrate`: PTQ calibration of an ONNX model in one streaming pass, every range method at once."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser("calibrate", help="PTQ calibration table (max, percentile, entropy, MSE) in one pass")
    s.add_argument("--model", type=Path, required=True, help="FP32 ONNX model (WeNet encoder interface)")
    s.add_argument("--cache", type=Path, default=None, help="corpus cache directory (default: $WB_CACHE/corpus)")
    s.add_argument("--split", default="calib")
    s.add_argument("--limit", type=int, default=0, help="first N utterances only (0: all)")
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


def run(args) -> None:
    from calibration_data.corpus import default_cache_dir, load_split
    from quant.calibrate import calibrate
    from quant.collect import encoder_feeds

    from ..errors import WorkbenchError

    if args.batch_size < 1:
        raise WorkbenchError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.model.is_file():
        raise WorkbenchError(f"ONNX model not found: {args.model}")
    split = load_split(args.cache or default_cache_dir(), args.split)
    feeds = encoder_feeds(split, args.batch_size, limit=args.limit or None)
    table = calibrate(args.model, feeds, methods=args.methods, default_method=args.default_method, bins=args.bins,
                      tensors_per_pass=args.tensors_per_pass or None, threads=args.threads,
                      include_activation_matmuls=not args.no_activation_matmuls,
                      padding=None if args.count_padding else "auto",
                      data_info={"split": args.split, "limit": args.limit or None})
    table.save(args.out)  # only reached when everything succeeded: no table on error
    if args.trt_cache:
        table.write_trt_cache(args.trt_cache)
    d = table.data["data"]
    print(f"calibrated {len(table.tensors)} tensors and {len(table.data['weights'])} weights on {d['n_samples']} "
          f"utterances ({d['collect_s']:.1f} s collecting, {d['methods_s']:.1f} s ranges): {args.out}"
          + (f", {args.trt_cache}" if args.trt_cache else ""))
