"""How fast can an all-INT8 MiniLM be on this CPU with ONNX Runtime, and which placement costs what (issue 17)?

The architecture of all-MiniLM-L6-v2 (models.minilm.network, its config.json's dimensions) with random weights:
speed does not depend on the weights' values, so this runs where the 90 MB published weights are not (the lent
host, whose carry limit would need five calls for them). Calibrated (max) on random token batches; all-INT8
placements of the onnxruntime recipe, with and without SmoothQuant, with each `ort_float_outputs` choice and
calibrated or per-token input scales (`ort_per_token_inputs`),
timed against FP32 interleaved (engines.bench_interleaved: medians of paired runs) at each thread count, and one
kernel profile per placement (engines.op_times). Accuracy is not measured here (random weights).

    python experiments/bench_minilm_ceiling.py [--threads 2,4,8,16] [--case 32x128] [--iters 10] --out J
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

# all-MiniLM-L6-v2's config.json (the dimensions; models.minilm.load_config reads the package's own copy)
CONFIG = {"hidden_size": 384, "num_attention_heads": 12, "layer_norm_eps": 1e-12, "intermediate_size": 1536,
          "max_position_embeddings": 512, "type_vocab_size": 2, "vocab_size": 30522, "num_hidden_layers": 6}
VARIANTS = {  # label: (smoothquant targets or None, ort_float_outputs, ort_per_token_inputs)
    "ort": (None, "none", "none"),
    "ort residual": (None, "residual", "none"),
    "ort matmul": (None, "matmul", "none"),
    "ort residual + smooth": ("all", "residual", "none"),
    "ort matmul + smooth": ("all", "matmul", "none"),
    "ort matmul + per-token matmul": (None, "matmul", "matmul"),
    "ort matmul + smooth + per-token matmul": ("all", "matmul", "matmul"),
    "ort matmul + smooth + per-token residual": ("all", "matmul", "residual"),
    "ort matmul + smooth + per-token ffn-out": ("all", "matmul", r"^/layer\.\d+/output/dense/MatMul$"),
    "ort matmul + smooth + per-token ffn-out 0-3": ("all", "matmul", r"^/layer\.[0-3]/output/dense/MatMul$"),
}


def token_batches(rng: np.random.Generator, n: int, bs: int, sl: int) -> list[dict]:
    out = []
    for _ in range(n):
        ids = rng.integers(1000, 30000, (bs, sl)).astype(np.int64)
        ids[:, 0], ids[:, -1] = 101, 102
        out.append({"input_ids": ids, "attention_mask": np.ones((bs, sl), np.int64)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="2,4,8,16")
    ap.add_argument("--case", default="32x128", help="BSxSEQ")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--profile-threads", type=int, default=None, help="default: the first of --threads")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    import torch

    from core.host import describe, host_info
    from engines import bench_interleaved, open_onnx
    from engines.ort_backend import op_times
    from graph.placement import quantize
    from models.minilm import network, write_onnx
    from quant.calibrate import calibrate
    from quant.smooth import smooth
    import onnx

    bs, sl = (int(x) for x in a.case.split("x"))
    threads = [int(t) for t in a.threads.split(",")]
    labels = [v.strip() for v in a.variants.split(",") if v.strip()]
    host = host_info()
    print("host:", describe(host), flush=True)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    calib = token_batches(rng, 4, 16, 64)
    case = token_batches(rng, 1, bs, sl)[0]
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="wb-ceiling-") as tmp:
        tmp = Path(tmp)
        fp32 = tmp / "fp32.onnx"
        write_onnx(network(CONFIG, CONFIG["num_hidden_layers"]), fp32)
        models = {"FP32": fp32}
        sources = {None: fp32}
        tables = {}  # one calibration per source graph (the variants differ in placement only)
        for label in labels:
            targets, outputs, scales = VARIANTS[label]
            if targets not in sources:
                m, _ = smooth(fp32, calib, 0.85, targets)
                sources[targets] = tmp / f"smooth_{targets}.onnx"
                onnx.save(m, str(sources[targets]))
            if targets not in tables:
                tables[targets] = calibrate(sources[targets], calib, methods="max", default_method="max",
                                            progress=False)
            table = tables[targets]
            models[label] = tmp / f"{label.replace(' ', '_').replace('+', 'p')}.onnx"
            quantize(sources[targets], table.data, recipe="onnxruntime", ort_float_outputs=outputs,
                     ort_per_token_inputs=scales, out=models[label])
        print(f"models ready in {time.time() - t0:.0f} s", flush=True)
        rows = {}
        for t in threads:
            runners = {k: open_onnx(p, threads=t, kind="generic") for k, p in models.items()}
            res = bench_interleaved(runners, {(bs, sl): case}, warmup=a.warmup, iters=a.iters)
            med = {k: r[0]["median_ms"] for k, r in res.items()}
            rows[t] = {k: {"median_ms": med[k], "speedup_vs_fp32": round(med["FP32"] / med[k], 3)} for k in med}
            print(f"threads {t}: " + ", ".join(f"{k} {v['median_ms']:.1f} ms ({v['speedup_vs_fp32']:.2f}x)"
                                               for k, v in rows[t].items()), flush=True)
        pt = a.profile_threads or threads[0]
        profiles = {}
        for k, p in models.items():
            prof = op_times(p, case, threads=pt, runs=3)
            ops = sorted(prof["ops"].items(), key=lambda kv: -kv[1]["ms"])
            profiles[k] = {"run_ms": prof["run_ms"], "kernel_ms": prof["kernel_ms"],
                           "ops": {op: v for op, v in ops}}
            print(f"profile {k} ({pt} threads): run {prof['run_ms']:.1f} ms; " +
                  ", ".join(f"{op} {v['ms']:.1f}" for op, v in ops[:8]), flush=True)
    out = {"format": "wb-minilm-ceiling/1", "host": host, "case": [bs, sl], "iters": a.iters, "warmup": a.warmup,
           "weights": "random (speed only)", "calibration": "max on 4 random token batches 16x64",
           "smoothquant_alpha": 0.85, "threads": rows, "profile_threads": pt, "profiles": profiles,
           "wall_s": round(time.time() - t0, 1)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", a.out)


if __name__ == "__main__":
    main()
