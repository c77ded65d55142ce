"""FP32 vs all-INT8 WeNet encoder and decoder on ONNX Runtime CPU, side by side in one process.

The trained `small` model is exported to FP32 ONNX; INT8 models come from `--int8-encoder/--int8-decoder
LABEL=PATH` (repeatable; e.g. graph/placement.py's recipes) and, unless --no-baseline, from ONNX Runtime's
`quantize_static` (QDQ, per-channel, symmetric int8 weights and activations, MinMax over --calib-utts calib
utterances), labelled "ort-quantize_static baseline". Every model is built through `engines.build`
(onnxruntime backend, --threads threads) and timed on the hackathon grid, with the runs of the models of a
kind interleaved per case (warm-up A B A B ..., then timed A B A B ...) so that machine drift hits all alike.
Inputs are the hackathon's `make_cases` (real test-split features; decoder inputs from the FP32 encoder's
beams), which also gives the hackathon output check of each INT8 model against FP32.

    .venv/bin/python experiments/bench_engines.py [--iters 30] [--warmup 10]

Writes experiments/results/engines_benchmark.json and .md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibration_data.corpus import default_cache_dir, load_split  # noqa: E402
from engines import bench_interleaved, build, int8_kernel_report, load, open_onnx  # noqa: E402
from evaluation.asr import decoder_feeds, only_inputs_of, prefix_beam_batch  # noqa: E402
from evaluation.hackathon import BATCH_SIZES, SEQ_LENS, make_cases, run_check  # noqa: E402
from core.fsutil import atomic_path, write_json  # noqa: E402

FP32 = "fp32"
BASELINE = "ort-quantize_static baseline"
KINDS = ("encoder", "decoder")


def _labelled(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH, got {text!r}")
    return label, Path(path)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def export_fp32(work: Path) -> dict[str, Path]:
    from models.export import export_onnx
    from models.weights import default_model

    model, trained = default_model("small")
    if not trained:
        raise SystemExit("the trained small weights are missing: this benchmark needs them")
    enc, dec = export_onnx(model, work / "fp32")
    return {"encoder": enc, "decoder": dec}


def calibration_feeds(encoder: Path, n: int) -> dict[str, list[dict]]:
    """n calib utterances, one per batch: encoder feeds, and decoder feeds from the FP32 encoder's beams."""
    split = load_split(default_cache_dir(), "calib")
    enc = open_onnx(encoder, kind="encoder")
    enc_feeds, dec_feeds = [], []
    for i in range(min(n, len(split))):
        f = split.features(i)
        feeds = {"speech": f[None], "speech_lengths": np.array([len(f)], np.int32)}
        out = enc.run(feeds)
        sos_eos = out["ctc_log_probs"].shape[-1] - 1
        enc_feeds.append(feeds)
        dec_feeds.append(decoder_feeds(out["encoder_out"], out["encoder_out_lens"], prefix_beam_batch(out), sos_eos))
    return {"encoder": enc_feeds, "decoder": dec_feeds}


def quantize_baseline(fp32: dict[str, Path], work: Path, n_calib: int) -> dict[str, Path]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    calib = calibration_feeds(fp32["encoder"], n_calib)
    out = {}
    for kind in KINDS:
        names = set(open_onnx(fp32[kind], kind=kind).input_names)

        class Reader:
            def __init__(self, feeds):
                self.it = iter([{k: v for k, v in f.items() if k in names} for f in feeds])

            def get_next(self):
                return next(self.it, None)

        target = work / "ort_quantize_static" / f"{kind}.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp, np.errstate(all="ignore"):
            quantize_static(str(fp32[kind]), str(tmp), Reader(calib[kind]), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
        out[kind] = target
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def markdown(result: dict) -> str:
    s = result["setup"]
    lines = [
        "# Engines benchmark: FP32 vs INT8 on ONNX Runtime CPU",
        "",
        f"Trained `small` WeNet model; ONNX Runtime {s['onnxruntime']} CPUExecutionProvider, {s['threads']} intra-op "
        f"threads, ORT_ENABLE_ALL; CPU: {s['cpu']} ({s['logical_cpus']} logical CPUs). Hackathon grid, "
        f"{s['warmup']} warm-up and {s['iters']} timed runs per case and model, models interleaved per run. "
        f"Latency = median wall-clock ms of `run()` (host inputs to host outputs). Ratio = INT8 median / FP32 "
        f"median (< 1: INT8 faster). Reproduce: `{s['command']}`.",
        "",
        f"Load average (1, 5, 15 min) at start {s['loadavg_start']}, at end {s['loadavg_end']} (this benchmark "
        "alone gives about 2): other processes competing for the cores inflate absolute times; the ratios are "
        "fairer, since the models run interleaved.",
        "",
    ]
    labels = [m for m in result["models"] if m != FP32]
    for kind in KINDS:
        kind_labels = [m for m in labels if kind in result["models"][m]]
        head = "| bs | sl | FP32 ms | " + " | ".join(f"{m} ms | ratio" for m in kind_labels) + " |"
        lines += [f"## {kind}", "", head, "|" + "---|" * (3 + 2 * len(kind_labels))]
        rows = {(r["label"], r["bs"], r["sl"]): r for r in result["rows"] if r["kind"] == kind}
        for bs in s["batch_sizes"]:
            for sl in s["seq_lens"]:
                fp = rows[(FP32, bs, sl)]["median_ms"]
                cells = [f"{rows[(m, bs, sl)]['median_ms']:.2f} | {rows[(m, bs, sl)]['ratio_to_fp32']:.2f}"
                         for m in kind_labels]
                lines.append(f"| {bs} | {sl} | {fp:.2f} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Integer kernels after ONNX Runtime's graph optimisation", "",
              "| model | kind | Q / DQ in input | integer kernels | float MatMul/Conv left |", "|---|---|---|---|---|"]
    for label, kinds in result["models"].items():
        for kind, m in kinds.items():
            k = m["kernels"]
            ints = ", ".join(f"{op} {n}" for op, n in k["integer_kernels"].items()) or "none"
            flt = ", ".join(f"{op} {n}" for op, n in k["float_compute_kernels"].items()) or "none"
            lines.append(f"| {label} | {kind} | {k['input_quantize_linear']} / {k['input_dequantize_linear']} | "
                         f"{k['integer_kernel_total']} ({ints}) | {flt} |")
    if result["check"]:
        lines += ["", "## Hackathon output check against FP32 (same cases)", "",
                  "| model | kind | cases passed | worst max abs | worst median rel |", "|---|---|---|---|---|"]
        for label, rows in result["check"].items():
            for kind in KINDS:
                rs = [r for r in rows if r["model"] == kind]
                if rs:
                    lines.append(f"| {label} | {kind} | {sum(r['passed'] for r in rs)}/{len(rs)} | "
                                 f"{max(r['max_abs'] for r in rs):.3g} | {max(r['median_rel'] for r in rs):.3g} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--int8-encoder", type=_labelled, action="append", default=[], metavar="LABEL=PATH")
    p.add_argument("--int8-decoder", type=_labelled, action="append", default=[], metavar="LABEL=PATH")
    p.add_argument("--no-baseline", action="store_true", help="skip the quantize_static baseline")
    p.add_argument("--calib-utts", type=int, default=32)
    p.add_argument("--batch-sizes", type=_ints, default=list(BATCH_SIZES))
    p.add_argument("--seq-lens", type=_ints, default=list(SEQ_LENS))
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench_engines")
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "engines_benchmark")
    args = p.parse_args(argv)
    t_start, load_start = time.time(), os.getloadavg()

    fp32 = export_fp32(args.work)
    models: dict[str, dict[str, Path]] = {FP32: fp32}
    if not args.no_baseline:
        models[BASELINE] = quantize_baseline(fp32, args.work, args.calib_utts)
    for flag, kind in ((args.int8_encoder, "encoder"), (args.int8_decoder, "decoder")):
        for label, path in flag:
            models.setdefault(label, {})[kind] = path

    runners, info = {}, {}
    for label, kinds in models.items():
        for kind, path in kinds.items():
            slug = "".join(c if c.isalnum() else "_" for c in label)
            art = build(path, None, args.work / "engines" / f"{slug}-{kind}", backend="onnxruntime", kind=kind,
                        threads=args.threads)
            runners[(label, kind)] = load(art)
            info.setdefault(label, {})[kind] = {"onnx": str(path), "sha256": art.meta["source"]["sha256"],
                                                "engine": str(art.path), "kernels": int8_kernel_report(art)}
            print(f"{label} {kind}: {info[label][kind]['kernels']['integer_kernel_total']} integer kernels", flush=True)

    test = load_split(default_cache_dir(), "test")
    pool = [test.features(i) for i in range(min(len(test), 64))]
    ref = {k: runners[(FP32, k)] for k in KINDS}
    # Decoder case sl needs 4*sl+3 encoder frames (1027 for 256), past the encoder engine's range: a plain session.
    cases = make_cases(open_onnx(fp32["encoder"], kind="encoder", threads=args.threads), pool, args.batch_sizes,
                       args.seq_lens)

    check = {}
    for label, kinds in models.items():
        if label == FP32:
            continue
        cand = {k: runners.get((label, k), ref[k]) for k in KINDS}
        rows = run_check(ref["encoder"], ref["decoder"], cand["encoder"], cand["decoder"], cases)
        check[label] = [r for r in rows if r["model"] in kinds]

    rows = []
    for kind in KINDS:
        kind_runners = {label: runners[(label, kind)] for label in models if (label, kind) in runners}
        kind_cases = {case: only_inputs_of(kind_runners[FP32], feeds) for case, feeds in cases[kind].items()}
        timed = bench_interleaved(kind_runners, kind_cases, args.warmup, args.iters)
        for n, (bs, sl) in enumerate(kind_cases):
            base = timed[FP32][n]["median_ms"]
            for label, case_rows in timed.items():
                row = {"kind": kind, "label": label, **case_rows[n], "ratio_to_fp32": case_rows[n]["median_ms"] / base}
                rows.append(row)
                print(f"{kind} bs={bs:>2} sl={sl:>3} {label:>30}: {row['median_ms']:8.2f} ms "
                      f"(x{row['ratio_to_fp32']:.2f})", flush=True)

    import onnxruntime as ort

    result = {
        "setup": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "onnxruntime": ort.__version__,
                  "cpu": cpu_name(), "logical_cpus": len(os.sched_getaffinity(0)),
                  "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                  "threads": args.threads, "warmup": args.warmup, "iters": args.iters,
                  "batch_sizes": args.batch_sizes, "seq_lens": args.seq_lens, "calib_utts": args.calib_utts,
                  "timer": "perf_counter around run()", "inputs": "evaluation.hackathon.make_cases on test split",
                  "command": " ".join([".venv/bin/python experiments/bench_engines.py",
                                       *(argv if argv is not None else sys.argv[1:])]),
                  "wall_s": None},
        "models": info, "rows": rows, "check": check,
    }
    result["setup"]["wall_s"] = round(time.time() - t_start, 1)
    write_json(args.out.with_suffix(".json"), result)
    md = markdown(result)
    with atomic_path(args.out.with_suffix(".md")) as tmp:
        tmp.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
