"""Sensitivity-stage and search wall time of the WeNet pipeline on Ray with 1, 4, 8 workers (issue 19).

One prepared run directory (FP32 export, calibration, the all-INT8 start baseline) is copied afresh for each
worker count, so every count places, builds and evaluates everything itself; one local Ray cluster serves all
counts (its start is timed once, apart). Each worker is one Ray task of backend.threads CPUs, so N workers use
N x threads cores. Writes JSON with the host (core.host.describe) and the times.

    python experiments/bench_ray.py --workers 1,4,8 --search-workers 1,8 --out bench.json [--corpus DIR]

Deviations from `./build.sh`'s run, for time: calibration on 64 utterances with one calibrator (percentile), the
search's accuracy on --eval-utts test utterances, the baselines timed with the search's protocol (3 + 10 runs).
The sensitivity stage itself is the default one (16 ranking utterances, every quantizable node). Each row splits
the stage into the driver's ranking pass until the first graph's probes go out (`ranking_s`, its pool fan-out
`ranking pool_map_s`) and the probes (`feeds_s`: when the driver had every graph's feeds, the later ones made
while the first graph's probes ran);
`--modes warm` lets every worker build the run's Workspace before the clock starts (what a run's baseline fan-out
leaves behind), so the stage is timed without the workers' start.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engines  # noqa: E402
from core.host import describe, host_info  # noqa: E402


def experiment(cfg: dict, run_dir: Path, corpus: Path | None):
    """The pipeline's Experiment on the bundled task, calibrated (cached in run_dir) and with its latency cases."""
    import tasks.wenet_asr as wenet_asr
    from pipeline.calibration import calibrate_stage
    from pipeline.experiment import Experiment

    if corpus is not None:  # a carried, pre-made corpus: no synthesizers needed (the device has none)
        wenet_asr.ensure_corpus = lambda *a, **k: corpus
    exp = Experiment(cfg, wenet_asr.WenetAsrTask(cfg, run_dir, progress=False), run_dir, progress=False)
    exp.methods = calibrate_stage(exp)
    exp.cases = {g: dict(exp.task.latency_cases(g)) for g in exp.names}
    return exp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", default="1,4,8")
    ap.add_argument("--serial", action="store_true", help="also time the serial engine")
    ap.add_argument("--search-workers", default="1,8", help="the counts that also time the search ('' none)")
    ap.add_argument("--corpus", type=Path, default=None)
    ap.add_argument("--eval-utts", type=int, default=100)
    ap.add_argument("--calib-utts", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="backend.threads: ORT threads per evaluation and task")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_ray"))
    ap.add_argument("--modes", default="cold", help="cold and/or warm (comma-separated, each over every count): "
                    "warm workers import and build the run's Workspace before the clock starts (a pipeline's "
                    "sensitivity stage follows the baselines' fan-out)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import copy

    import ray

    from pipeline.config import load_config, resolve_backend_and_recipe
    import pipeline.sensitivity as sensitivity
    from pipeline.sensitivity import sensitivity_stage

    timed = {}  # the driver's ranking pass, timed apart from the probes' fan-out
    graph_inputs = sensitivity.graph_inputs

    def timed_inputs(*a, **k):  # ranking_s: until the first graph's probes can go out; feeds_s: until the last's
        t = time.perf_counter()
        for part in graph_inputs(*a, **k):
            timed.setdefault("ranking_s", time.perf_counter() - t)
            timed["feeds_s"] = time.perf_counter() - t
            yield part

    sensitivity.graph_inputs = timed_inputs
    from pipeline.fanout import Fanout

    fan_map = Fanout.map

    def timed_map(self, fn, ctx, items, on_result=None, desc=""):  # each fan-out's wall time, by its desc
        t = time.perf_counter()
        try:
            return fan_map(self, fn, ctx, items, on_result, desc)
        finally:
            timed[desc.split(" (")[0] + "_map_s"] = time.perf_counter() - t

    Fanout.map = timed_map

    base_cfg = load_config()
    base_cfg["backend"]["name"] = "onnxruntime"
    base_cfg["data"]["calib_utts"], base_cfg["data"]["eval_utts"] = args.calib_utts, args.eval_utts
    base_cfg["calibration"]["methods"] = ["percentile"]
    base_cfg["backend"]["threads"] = args.threads
    # the baselines' timing (only the search's start needs one) with the search's shorter protocol
    base_cfg["latency"]["warmup"], base_cfg["latency"]["iters"] = 3, 10
    base_cfg = resolve_backend_and_recipe(base_cfg)
    shutil.rmtree(args.work, ignore_errors=True)
    base = args.work / "base"
    t0 = time.perf_counter()
    exp = experiment(base_cfg, base, args.corpus)
    ws = exp.ws
    method = exp.methods[0]
    all8 = {k: ws.model(k, {n: "int8" for n in ws.int8_nodes(k)}, method) for k in ws.fp32}
    start = exp.full_record(f"INT8 all ({method})", all8, precision="int8", calibrator=method)
    prep_s = time.perf_counter() - t0
    fp32_rec = exp.full_record("FP32", dict(ws.fp32), precision="fp32", calibrator=None)
    from pipeline.baselines import criterion_of

    crit = criterion_of(base_cfg, exp.task, fp32_rec["accuracy"])  # FP32's accuracy dict (with its eval sets)

    t0 = time.perf_counter()
    ray.init(num_cpus=engines.base.physical_cores(), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    ray_start_s = time.perf_counter() - t0
    results = {"host": describe(host_info()), "cores": engines.base.physical_cores(),
               "threads_per_task": base_cfg["backend"]["threads"], "eval_utts": args.eval_utts,
               "calib_utts": args.calib_utts, "method": method, "prepare_s": round(prep_s, 1),
               "ray_start_s": round(ray_start_s, 1), "runs": []}
    counts = (["serial"] if args.serial else []) + [int(x) for x in args.workers.split(",")]
    ref = None
    for mode, n in [(m, n) for m in args.modes.split(",") for n in counts]:
        warm = {"cold": False, "warm": True}[mode]
        cfg = copy.deepcopy(base_cfg)
        cfg["distributed"] = {"engine": "serial" if n == "serial" else "ray", "address": "auto",
                              "max_parallel": 0 if n == "serial" else n}
        run_dir = args.work / f"run-{mode}-{n}"
        shutil.copytree(base, run_dir, ignore=shutil.ignore_patterns(".lock"))
        e = experiment(cfg, run_dir, args.corpus)
        _ = e.fanout  # the executor (joins the running cluster) before the clock starts
        if warm and n != "serial":  # the workers' imports and Workspace, as a run's baseline stage leaves them
            e.fanout.warm(e.context("warm"))
        timed.clear()
        t0 = time.perf_counter()
        sens = sensitivity_stage(e, method)
        sens_s = time.perf_counter() - t0
        row = {"workers": n, "sensitivity_s": round(sens_s, 2), "ranking_s": round(timed["ranking_s"], 2),
               "feeds_s": round(timed["feeds_s"], 2), "probes_s": round(sens_s - timed["ranking_s"], 2),
               "n_probes": len(sens), "warm": warm,
               **{k: round(v, 2) for k, v in timed.items() if k.endswith("_map_s")}}
        if str(n) in args.search_workers.split(","):
            t0 = time.perf_counter()
            rec = e.search(start, crit)
            row |= {"search_s": round(time.perf_counter() - t0, 2), "search_evals": rec["n_full_evals"],
                    "search_computed": rec["n_computed_evals"], "status": rec["status"],
                    "best": (rec.get("best") or {}).get("plan_hash"),
                    "trace": [(r["plan_hash"], r["passed"]) for r in rec["trace"] if r["stage"] != "latency-probe"]}
        if ref is None:
            ref = (sens, row.get("trace"))
        row["same_sensitivity"] = sens == ref[0]
        row["same_trace"] = row.get("trace") == ref[1]
        row.pop("trace", None)
        e.fanout.close()
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
        first = next(r for r in results["runs"] if r["warm"] == warm)  # speedups within one mode
        for r in results["runs"]:
            if r["warm"] == warm:
                r["sensitivity_speedup"] = round(first["sensitivity_s"] / r["sensitivity_s"], 2)
                if isinstance(r["workers"], int) and isinstance(first["workers"], int):
                    r["x_n"] = round(r["sensitivity_speedup"] * first["workers"] / r["workers"], 2)
                if "search_s" in r and "search_s" in first:
                    r["search_speedup"] = round(first["search_s"] / r["search_s"], 2)
        args.out.write_text(json.dumps(results, indent=1) + "\n")  # after each count: a cut-off run keeps them
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
