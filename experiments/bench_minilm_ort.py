"""What a user would pick instead of the precision search, on all-MiniLM-L6-v2: ONNX Runtime's own
`quantize_dynamic` and `quantize_static` with their defaults, side by side in one process with FP32 and the mix
that a recorded `wb search` run selected (and its TensorRT-recipe all-INT8 graph, validated).

Accuracy: the sentence_embedding task's metrics against FP32 (the run's own task options: same splits, same
evaluation). Latency: every model timed interleaved run by run at bs32 x seq128 (`engines.bench_interleaved`),
so the ratios to FP32 are paired; the integer kernels ONNX Runtime fused are counted. The CPU and its int8 flags
are recorded with the numbers.

    .venv/bin/python experiments/bench_minilm_ort.py --run experiments/runs/<id> [--warmup 3] [--iters 20]

Writes experiments/results/minilm/ort_quantization.json and .md (work directory .cache/bench_minilm_ort).
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import engines  # noqa: E402
from core.fsutil import atomic_path, write_json  # noqa: E402
from core.host import describe, host_info  # noqa: E402
from graph.calib import load_table  # noqa: E402
from graph.placement import quantize  # noqa: E402
from graph.plan import create_plan  # noqa: E402
from graph.analysis import analyze, prepare_model  # noqa: E402
from graph.validate import validate  # noqa: E402
from tasks.sentence_embedding import GRAPH, SentenceEmbeddingTask  # noqa: E402

CASE = (32, 128)


class Reader:
    """quantize_static's CalibrationDataReader over the task's calibration feeds."""

    def __init__(self, feeds):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


def ort_models(fp32: Path, work: Path, feeds) -> dict[str, Path]:
    from onnxruntime.quantization import quantize_dynamic, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    class R(Reader, CalibrationDataReader):
        pass

    out = {"ORT quantize_dynamic (defaults)": work / "dynamic.onnx", "ORT quantize_static (defaults)": work / "static.onnx"}
    paths = list(out.values())
    if not paths[0].is_file():
        quantize_dynamic(fp32, paths[0])
    if not paths[1].is_file():
        quantize_static(fp32, paths[1], R(feeds))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished sentence_embedding run directory")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench_minilm_ort")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "minilm" / "ort_quantization")
    args = ap.parse_args()

    t0 = time.time()
    run = json.loads((args.run / "run.json").read_text())
    task = SentenceEmbeddingTask(run["config"]["task"]["options"])
    task.check()
    spec = task.graph(GRAPH)
    args.work.mkdir(parents=True, exist_ok=True)
    fp32 = Path(spec.path)
    models = {"FP32": fp32, **ort_models(fp32, args.work, task.calibration_feeds(GRAPH))}
    selected = run["selected"]
    if selected:
        models[f"selected mix ({selected['n_fallback']} layers FP32)"] = args.run / "final" / f"{GRAPH}.onnx"
    # the TensorRT recipe's all-INT8 graph from the run's best calibrator: does it validate, what does it cost.
    # A "qat" table belongs to the fine-tuned graph, not to this FP32 one: then the PTQ calibrator the run's own
    # search started from (the pipeline's pick of the most accurate one)
    method = (selected or {}).get("calibrator")
    if method in (None, "qat"):
        method = next(s["calibrator"] for s in run["searches"] if s["calibrator"] != "qat" and not s.get("recipe"))
    loaded = prepare_model(fp32)
    analysis = analyze(loaded)
    plan = create_plan(analysis, "int8")
    trt = args.work / f"tensorrt_int8_{method}.onnx"
    quantize(loaded, load_table(args.run / "calibration" / f"{GRAPH}.{method}.json"), plan=plan, recipe="tensorrt",
             out=trt, analysis=analysis)
    problems = validate(trt, plan, recipe="tensorrt", original=fp32)
    models[f"all-INT8, TensorRT recipe ({method})"] = trt

    rows, runners = {}, {}
    for label, path in models.items():
        art = engines.build(path, spec.shapes, args.work / "engines" / path.stem, backend="onnxruntime",
                            kind="generic", threads=args.threads)
        runners[label] = engines.load(art)
        acc = task.evaluate({GRAPH: runners[label]})
        kernels = engines.int8_kernel_report(art)
        rows[label] = {"model": str(path), "accuracy": acc, "integer_kernels": kernels.get("integer_kernel_total"),
                       "kernel_report": kernels}
        print(f"{label}: {json.dumps({k: round(v, 5) for k, v in acc.items()})}", flush=True)
    cases = {(b, s): f for f in task.latency_cases(GRAPH).values()
             for b, s in [f["input_ids"].shape] if (b, s) == CASE}
    timing = engines.bench_interleaved(runners, cases, args.warmup, args.iters)
    ref = timing["FP32"][0]["latencies_ms"]
    for label, r in timing.items():
        lat = r[0]["latencies_ms"]
        rows[label]["latency"] = {k: r[0][k] for k in ("median_ms", "p90_ms", "latencies_ms")}
        rows[label]["speedup_paired"] = statistics.median(a / b for a, b in zip(ref, lat))
        rows[label]["speedup_medians"] = timing["FP32"][0]["median_ms"] / r[0]["median_ms"]
    host = host_info()
    result = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(), "run": run["id"],
              "host": host, "device": f"CPU: {describe(host)}, {args.threads} threads (ONNX Runtime)",
              "case": {"bs": CASE[0], "seq": CASE[1]}, "warmup": args.warmup, "iters": args.iters,
              "criterion": run["config"]["task"]["options"].get("criteria") or task.opts["criteria"],
              "tensorrt_recipe_validation": problems, "models": rows, "wall_s": round(time.time() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out.with_suffix(".json"), result)
    crit = task.opts["criteria"]
    lines = [f"# all-MiniLM-L6-v2: ONNX Runtime's quantizers against the precision search (run {run['id']})", "",
             f"{result['device']}; {args.iters} interleaved runs at bs{CASE[0]} x seq{CASE[1]} after {args.warmup} "
             f"warm-up rounds; accuracy on the task's {task.opts['eval']} evaluation sentences against FP32 (recall@"
             f"{task.k} over {task.opts['corpus']} corpus sentences). Criterion: "
             + " and ".join(f"{m} >= {v:g}" for m, v in crit.items()) + ".", "",
             f"| model | cosine | cosine p01 | {task.recall} | passes | integer kernels | median ms | speedup (paired) |",
             "| --- | ---: | ---: | ---: | :---: | ---: | ---: | ---: |"]
    for label, r in rows.items():
        a = r["accuracy"]
        ok = "yes" if a["criteria_margin"] >= 0 else "no"
        lines.append(f"| {label} | {a['cosine']:.5f} | {a['cosine_p01']:.5f} | {a[task.recall]:.4f} | {ok} | "
                     f"{r['integer_kernels']} | {r['latency']['median_ms']:.1f} | {r['speedup_paired']:.2f}× |")
    lines += ["", f"TensorRT-recipe all-INT8 graph ({method} ranges): "
              + ("validates (graph/validate.py: no problems)." if not problems else
                 f"{len(problems)} validation problems: " + "; ".join(problems[:5])),
              "", f"Wall time {result['wall_s'] / 60:.1f} min. Reproduce: "
              f"`.venv/bin/python experiments/bench_minilm_ort.py --run experiments/runs/{run['id']}`."]
    with atomic_path(args.out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
