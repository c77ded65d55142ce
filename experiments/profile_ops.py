"""Where the time of a run's models goes, by kind of kernel (ONNX Runtime's profiler, engines.op_times), at one
latency case: how much of FP32's time the weighted MatMuls are (what INT8 can speed up at all), and what the
INT8 models spend on integer GEMMs, the float MatMuls left (attention), Q/DQ conversions and the rest.

    python experiments/profile_ops.py RUN_DIR [--case bs32_seq128] [--graph G] [--threads N] [--runs 5]
        [--models FP32,selected,...] [--out J] [--md M]

The "ceiling" column is FP32's time over FP32's time without its weighted MatMuls: the speedup an INT8 model
could reach if its integer GEMMs took no time and everything else stayed as in FP32 (Amdahl).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GROUPS = (  # (label, test on (op type, node is a weighted MatMul of the source graph))
    ("int8 GEMM", lambda op, w: op.startswith("QLinear") or "Integer" in op or op.startswith("DynamicQuantizeMatMul")),
    ("weighted MatMul (float)", lambda op, w: op in ("MatMul", "FusedMatMul", "Gemm") and w),
    ("attention MatMul (float)", lambda op, w: op in ("MatMul", "FusedMatMul", "Gemm", "Attention", "MultiHeadAttention")),
    ("Q/DQ", lambda op, w: op in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")),
    ("Softmax", lambda op, w: op == "Softmax"),
    ("LayerNorm", lambda op, w: "LayerNorm" in op),
    ("GELU", lambda op, w: op in ("Erf", "Gelu", "BiasGelu", "FastGelu")),
    ("Mul/Add/Div", lambda op, w: op in ("Mul", "Add", "Div", "Sub")),
    ("other", lambda op, w: True),
)


def weighted_matmuls(path: Path) -> set[str]:
    """Names of the MatMul/Gemm nodes with a constant weight input (what a precision plan makes INT8)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    consts = {i.name for i in m.graph.initializer} | {o for n in m.graph.node if n.op_type == "Constant"
                                                       for o in n.output}
    dq = {n.output[0]: n.input[0] for n in m.graph.node if n.op_type == "DequantizeLinear"}
    return {n.name for n in m.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1
            and (n.input[1] in consts or dq.get(n.input[1]) in consts)}


def grouped(profile: dict, weighted: set[str]) -> dict[str, float]:
    out = {label: 0.0 for label, _ in GROUPS}
    for name, row in profile["nodes"].items():
        for label, test in GROUPS:
            if test(row["op"], name in weighted):
                out[label] += row["ms"]
                break
    return {k: round(v, 2) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--case", default="bs32_seq128")
    ap.add_argument("--graph", default=None, help="default: the task's first graph")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--models", default="FP32,selected,INT8 all*", help="models.json labels (a trailing * matches "
                    "a prefix)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--md", type=Path)
    args = ap.parse_args()
    import engines
    from core.host import describe, host_info
    from tasks.entry import load_task

    run = json.loads((args.run / "run.json").read_text())
    task = load_task(run["config"], run_dir=args.run)
    graph = args.graph or task.graphs[0].name
    feeds = dict(task.latency_cases(graph))[args.case]
    models = json.loads((args.run / "models.json").read_text())
    want = [w.strip() for w in args.models.split(",")]
    labels = [k for w in want for k in models if (k.startswith(w[:-1]) if w.endswith("*") else k == w)]
    res = {"host": describe(host_info()), "case": args.case, "graph": graph, "models": {}}
    fp32_weighted = None
    for label in dict.fromkeys(labels):
        path = Path(models[label][graph])
        path = path if path.is_absolute() else args.run / path
        prof = engines.op_times(path, feeds, threads=args.threads, runs=args.runs)
        weighted = weighted_matmuls(path)
        groups = grouped(prof, weighted)
        res["models"][label] = {"path": str(path), "run_ms": prof["run_ms"], "kernel_ms": prof["kernel_ms"],
                                "groups": groups, "ops": prof["ops"]}
        if label == "FP32":
            fp32_weighted = groups["weighted MatMul (float)"]
            res["ceiling"] = round(prof["run_ms"] / (prof["run_ms"] - fp32_weighted), 2)
        print(label, prof["run_ms"], "ms", groups, flush=True)
    heads = [g for g, _ in GROUPS]
    lines = [f"Host: {res['host']}; {args.case}, graph {graph}, {prof['threads']} threads, median of {args.runs} "
             f"profiled runs (ms per run)." + (f" Ceiling (FP32 / FP32 without its weighted MatMuls): "
                                               f"{res['ceiling']}x." if "ceiling" in res else ""), "",
             "| model | run | " + " | ".join(heads) + " |", "| --- | ---: | " + " | ".join("---:" for _ in heads) + " |"]
    for label, r in res["models"].items():
        lines.append(f"| {label} | {r['run_ms']:.1f} | " + " | ".join(f"{r['groups'][g]:.1f}" for g in heads) + " |")
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    if args.md:
        args.md.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
