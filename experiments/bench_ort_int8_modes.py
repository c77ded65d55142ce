"""The ONNX Runtime recipe's three int8 modes side by side on this CPU: U8S8 (8-bit weights), U8S8 with 7-bit
weights (`reduce_range`) and S8S8, all-INT8 on the trained `small` model, against FP32.

Accuracy: attention-rescoring CER on the held-out-voice test split (the pipeline's own evaluation). Latency:
every model timed interleaved run by run on the hackathon grid (the pipeline's `side_by_side`), so the ratios
are measured together. Integer kernels: what the CPU EP fused. The CPU model and its int8 flags are recorded
with the numbers, because the answer depends on them (graph/placement.py, `ort_mode_for`).

    .venv/bin/python experiments/bench_ort_int8_modes.py [--method entropy] [--eval-utts 500] [--iters 30]

Writes experiments/results/ort_int8_modes.json and .md (the work directory is .cache/bench_ort_int8_modes).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import engines  # noqa: E402
from core.host import describe, host_info  # noqa: E402
from graph.placement import ORT_MODES, ort_mode_for  # noqa: E402
from pipeline.config import load_config, resolve_backend_and_recipe  # noqa: E402
from pipeline.calibration import calibrate_stage  # noqa: E402
from pipeline.experiment import Experiment  # noqa: E402
from tasks.wenet_asr import KINDS, WenetAsrTask  # noqa: E402
from core.fsutil import atomic_path, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="entropy", help="calibrator of the all-INT8 models (default entropy)")
    ap.add_argument("--eval-utts", type=int, default=500)
    ap.add_argument("--calib-utts", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench_ort_int8_modes")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "ort_int8_modes")
    args = ap.parse_args()

    cfg = load_config()
    cfg["quantize"]["recipe"], cfg["backend"]["name"] = "onnxruntime", "onnxruntime"
    cfg["calibration"]["methods"] = [args.method]
    cfg["data"]["eval_utts"], cfg["data"]["calib_utts"] = args.eval_utts, args.calib_utts
    cfg["latency"]["warmup"], cfg["latency"]["iters"] = args.warmup, args.iters
    cfg = resolve_backend_and_recipe(cfg)
    t0 = time.time()
    exp = Experiment(cfg, WenetAsrTask(cfg, args.work), args.work)
    ws, fp32 = exp.ws, exp.ws.fp32
    exp.methods = calibrate_stage(exp)
    exp.cases = {g: dict(exp.task.latency_cases(g)) for g in exp.names}
    variants, rows = {"FP32": fp32}, {}
    for mode in ORT_MODES:
        ws.cfg = copy.deepcopy(cfg)
        ws.cfg["quantize"]["ort_mode"] = mode
        variants[mode] = {k: ws.model(k, {n: "int8" for n in ws.int8_nodes(k)}, exp.methods[0]) for k in KINDS}
    for label, models in variants.items():
        print(f"accuracy: {label}", flush=True)
        rows[label] = {"accuracy": ws.accuracy(models), "models": {k: str(p) for k, p in models.items()},
                       "integer_kernels": _kernels(ws, models)}
    print("side-by-side timing", flush=True)
    timing = exp.side_by_side(variants)
    ref = timing["FP32"]["objective_ms"]
    for label in variants:
        rows[label]["objective_ms"] = timing[label]["objective_ms"]
        rows[label]["speedup_vs_fp32"] = ref / timing[label]["objective_ms"]
        rows[label]["cases"] = timing[label]["cases"]
    host = host_info()
    result = {"format": "wb-ort-int8-modes/1", "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "host": host, "method": exp.methods[0], "eval_split": cfg["data"]["eval_split"],
              "eval_utts": len(exp.task.eval_texts), "warmup": args.warmup, "iters": args.iters,
              "auto_choice": ort_mode_for(host["cpu"]), "rows": rows, "wall_s": round(time.time() - t0, 1),
              "command": "  ".join(["python experiments/bench_ort_int8_modes.py", *sys.argv[1:]])}
    write_json(args.out.with_suffix(".json"), result)
    with atomic_path(args.out.with_suffix(".md")) as tmp:
        tmp.write_text(_markdown(result))
    print(_markdown(result))


def _kernels(ws, models: dict[str, Path]) -> dict:
    """Integer kernels the CPU EP fused in each model ({kind: count}), from its engine artifact's report."""
    return {kind: engines.int8_kernel_report(ws.build(kind, path, ws.engine_dir(kind, path)))
            ["integer_kernel_total"] for kind, path in models.items()}


def _markdown(r: dict) -> str:
    cpu = r["host"]["cpu"]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu["flags"].items())
    v = r["host"]["versions"]
    lines = [
        "# ONNX Runtime int8 modes on this CPU", "",
        f"- CPU: {describe(r['host'])}; flags: {flags}",
        f"- onnxruntime {v.get('onnxruntime')}, onnx {v.get('onnx')}, torch {v.get('torch')}, numpy {v.get('numpy')}",
        f"- model: trained `small` WeNet-style conformer, all-INT8 (attention MatMuls fp32), `{r['method']}` ranges",
        f"- accuracy: {r['eval_utts']} utterances of the `{r['eval_split']}` split (held-out voices)",
        f"- latency: sum of median latencies over the hackathon grid (encoder + decoder), all variants interleaved "
        f"run by run, {r['warmup']} warm-up + {r['iters']} timed runs per case",
        f"- reproduce: `{r['command']}` ({r['wall_s']:.0f} s)",
        f"- `auto` chooses **{r['auto_choice']}** on this CPU", "",
        "| variant | CER rescoring | vs FP32 | CER greedy | integer kernels (enc/dec) | latency | vs FP32 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    ref = r["rows"]["FP32"]["accuracy"]["cer_rescore"]
    for label, row in r["rows"].items():
        a, k = row["accuracy"], row["integer_kernels"]
        kern = "" if label == "FP32" else f"{k.get('encoder')}/{k.get('decoder')}"
        lines.append(f"| {label} | {100 * a['cer_rescore']:.2f} % | {100 * (a['cer_rescore'] - ref):+.2f} pt | "
                     f"{100 * a['cer_greedy']:.2f} % | {kern} | {row['objective_ms']:.0f} ms | "
                     f"{row['speedup_vs_fp32']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
