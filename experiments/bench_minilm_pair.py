"""Paired timing of a MiniLM run's models against FP32 at one latency case (default bs32 x seq128): each round runs
FP32 and every model once, interleaved, and the ratio FP32 time / model time is taken per round; the median of the
rounds is reported (what experiments/results/minilm_smooth/ records as "paired").

    python experiments/bench_minilm_pair.py RUN_DIR [--threads 16] [--rounds 15] [--case bs32_seq128] [--out J]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--case", default="bs32_seq128")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import engines
    from tasks.sentence_embedding import GRAPH, SentenceEmbeddingTask

    run = json.loads((args.run / "run.json").read_text())
    task = SentenceEmbeddingTask(run["config"]["task"]["options"])
    feed = task.latency_cases(GRAPH)[args.case]
    models = json.loads((args.run / "models.json").read_text())
    want = ["FP32", "selected"] + [k for k in models if k.startswith("INT8 all")]
    paths = {k: Path(models[k][GRAPH]) for k in want if k in models}
    paths = {k: p if p.is_absolute() else args.run / p for k, p in paths.items()}
    runners = {k: engines.open_onnx(p, threads=args.threads) for k, p in paths.items()}
    rows = engines.bench_interleaved(runners, {(0, 0): feed}, warmup=args.warmup, iters=args.rounds)
    times = {k: [ms / 1e3 for ms in r[0]["latencies_ms"]] for k, r in rows.items()}
    res = {"case": args.case, "threads": args.threads, "rounds": args.rounds, "models": {}}
    for k, ts in times.items():
        ratios = [f / t for f, t in zip(times["FP32"], ts)]
        res["models"][k] = {"median_ms": round(1e3 * statistics.median(ts), 2),
                            "paired_speedup": round(statistics.median(ratios), 3), "path": str(paths[k])}
        print(f"{k:45s} {res['models'][k]['median_ms']:9.2f} ms  {res['models'][k]['paired_speedup']:.3f}x FP32")
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
