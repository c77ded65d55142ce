"""`wb build` and `wb bench`: build an engine artifact from an ONNX model, time it on the hackathon grid."""
from __future__ import annotations

import argparse
from pathlib import Path


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _range(text: str) -> tuple[int, int, int]:
    """"lo:hi" or "lo:opt:hi"."""
    parts = text.split(":")
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) == 2:
        nums = [nums[0], nums[1], nums[1]]
    if len(nums) != 3:
        raise argparse.ArgumentTypeError(f"expected lo:hi or lo:opt:hi, got {text!r}")
    return tuple(nums)


def cmd_build(args) -> None:
    from engines import build, default_shapes, resolve_backend
    from engines.base import BATCH_RANGE

    from core.fsutil import check_model_file, check_writable_dir_target

    check_model_file(args.model)
    check_writable_dir_target(args.out)  # before the build, not after it
    if args.shapes is not None:  # any model: its shape ranges from a JSON file
        from core.fsutil import read_json

        shapes, kind = read_json(args.shapes), args.kind or "generic"
    else:
        shapes, kind = default_shapes(args.model, args.kind, batch=args.batch or BATCH_RANGE, time_range=args.time), \
            args.kind
    backend = resolve_backend(args.backend)
    options = {}
    if backend == "onnxruntime":
        if args.threads:
            options["threads"] = args.threads
        if args.providers:
            options["providers"] = args.providers.split(",")
    elif args.threads or args.providers:
        print(f"note: --threads and --providers apply to the onnxruntime backend only; ignored for {backend}")
    if backend == "tensorrt-rtx":
        options["compute_capabilities"] = args.compute_capability  # None: the GPU's, if one is here
    elif args.compute_capability:
        print(f"note: --compute-capability applies to the tensorrt-rtx backend only; ignored for {backend}")
    art = build(args.model, shapes, args.out, backend=backend, kind=kind, **options)
    print(f"{'reused' if art.reused else 'built'} {art.backend} {art.kind} engine {art.path}")
    if "plan_bytes" in art.meta:
        targets = art.meta.get("compute_capabilities")
        print(f"  plan: {art.meta['plan_bytes'] / 1e6:.1f} MB" + (f" for SM{', SM'.join(map(str, targets))}" if targets else ""))
    if art.meta.get("runnable_here") is False:
        print(f"  not runnable here: {art.meta['why_not_runnable']}")
    for name, rng in art.shapes.items():
        print(f"  {name}: min {rng['min']} opt {rng['opt']} max {rng['max']}")
    if "int8_kernels" in art.meta:
        k = art.meta["int8_kernels"]
        print(f"  integer kernels after ONNX Runtime's optimisation: {k['integer_kernel_total']} "
              f"(input model: {k['input_quantize_linear']} QuantizeLinear, {k['input_dequantize_linear']} DequantizeLinear)")


def cmd_bench(args) -> None:
    from core.host import describe, host_info
    from engines import EngineArtifact, bench, bench_cases, format_bench_table, load
    from engines.cases import corpus_pool
    from core.fsutil import check_writable_target, write_json

    if args.json:
        check_writable_target(args.json)  # before the timing runs, not after them
    art = EngineArtifact.open(args.engine)
    runner = load(art, **({"threads": args.threads} if args.threads else {}))
    pool, features = (corpus_pool(args.split) if art.kind == "encoder" and not args.random_features
                      else (None, "random features" if art.kind == "encoder" else "synthetic decoder inputs"))
    cases = bench_cases(art.meta["io"], art.kind, args.batch_sizes, args.seq_lens, seed=args.seed, feats_pool=pool)
    rows = bench(runner, cases, warmup=args.warmup, iters=args.iters)
    for r in rows:
        r.update({"engine": str(art.path), "backend": art.backend, "kind": art.kind})
    host = host_info()
    print(format_bench_table(rows, f"{art.backend} {art.kind} {art.path} ({features}; {args.warmup} warm-up, "
                                   f"{args.iters} timed runs; throughput = bs*sl / median latency)\n"
                                   f"measured on {describe(host)}"))
    if args.json:
        write_json(args.json, {"engine": str(art.path), "backend": art.backend, "kind": art.kind, "host": host,
                               "threads": getattr(runner, "threads", None), "features": features, "rows": rows})
        print(f"wrote {args.json}")


def register(subparsers) -> None:
    s = subparsers.add_parser("build", help="build (or reuse) an engine artifact from an encoder/decoder ONNX model")
    s.add_argument("--model", type=Path, required=True, help="encoder.onnx or decoder.onnx (FP32, FP16 or Q/DQ)")
    s.add_argument("--kind", choices=("encoder", "decoder", "generic"), default=None,
                   help="default: from the input names (generic: any model, with --shapes)")
    s.add_argument("--shapes", type=Path, default=None,
                   help='JSON shape ranges for any model: {"input": {"min": [..], "opt": [..], "max": [..]}, ...}')
    s.add_argument("--backend", choices=("auto", "onnxruntime", "tensorrt", "tensorrt-rtx"), default="auto",
                   help="auto: TensorRT when usable, else ONNX Runtime (the verified backend); tensorrt-rtx builds on "
                        "CPU, ahead of time for --compute-capability")
    s.add_argument("--compute-capability", type=_ints, default=None,
                   help="tensorrt-rtx target GPU(s), e.g. 89 or 80,89 (75, 80, 86, 89, 120, 121; default: this GPU's)")
    s.add_argument("--out", type=Path, required=True, help="engine directory (engine.json + backend files)")
    s.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: physical cores)")
    s.add_argument("--providers", default=None, help="ONNX Runtime providers, e.g. CUDAExecutionProvider,CPUExecutionProvider")
    s.add_argument("--batch", type=_range, default=None, help="batch range lo:hi or lo:opt:hi (default 1:16:16)")
    s.add_argument("--time", type=_range, default=None,
                   help="time range in frames (default encoder 16:256:1024, decoder 16:64:256)")
    s.set_defaults(func=cmd_build)

    s = subparsers.add_parser("bench", help="time an engine on the hackathon grid (bs x sl)")
    s.add_argument("--engine", type=Path, required=True)
    s.add_argument("--batch-sizes", type=_ints, default=[1, 4, 16])
    s.add_argument("--seq-lens", type=_ints, default=[16, 64, 256])
    s.add_argument("--warmup", type=int, default=10)
    s.add_argument("--iters", type=int, default=30)
    s.add_argument("--threads", type=int, default=None, help="override the engine's ONNX Runtime thread count")
    s.add_argument("--split", default="calib", help="corpus split for real encoder features when it is on disk")
    s.add_argument("--random-features", action="store_true", help="encoder: random features even if a corpus exists")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", type=Path, default=None)
    s.set_defaults(func=cmd_bench)
