"""`wb search`: the whole experiment (calibration, baselines, precision search, final engines, report)."""
from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

from core.errors import WorkbenchError
from core.fsutil import RunDirLock


def register(sub) -> None:
    s = sub.add_parser("search", help="find the fastest precision mix that passes the accuracy criterion")
    s.add_argument("--config", type=Path, action="append", default=[],
                   help="TOML layered over pipeline/configs/default.toml (and quick.toml) (repeatable)")
    s.add_argument("--quick", action="store_true", help="add pipeline/configs/quick.toml (a ~5 minute run)")
    s.add_argument("--run-dir", type=Path, help="run directory; an existing one is resumed")
    s.add_argument("--runs-root", type=Path, default=None, help="where new runs go (default experiments/runs)")
    s.add_argument("--cache", type=Path, default=None, help="corpus cache directory")
    s.add_argument("--out", type=Path, default=None,
                   help="also copy the selected models, plans, engines and the report here")
    s.set_defaults(func=run)


def run(args) -> None:
    from pipeline.config import CONFIG_DIR, is_wenet, load_config
    from report.publish import finish_run
    from report.index import default_runs_root

    configs = ([CONFIG_DIR / "quick.toml"] if args.quick else []) + list(args.config)  # the user's configs win
    cfg = load_config(*configs)
    root = args.runs_root or default_runs_root()
    from pipeline.experiment import run_experiment
    from tasks import load_task

    task = None
    if not is_wenet(cfg):  # a user's task: loaded and checked (graphs, feeds, entry points) before any work
        task = load_task(cfg, base_dir=args.config[-1].parent if args.config else Path.cwd())
    run_dir = (args.run_dir or root / (dt.datetime.now().strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else ""))
               ).resolve()
    if run_dir.exists() and (run_dir / "run.json").is_file() and not args.run_dir:
        raise WorkbenchError(f"{run_dir} already holds a finished run")
    args.active_run_dir = run_dir  # for main()'s "interrupted; resume with ..." hint
    with RunDirLock(run_dir):  # held to the end (report, index, --out): a second wb search here fails at once
        if task is None:  # the bundled model's task exports its graphs into the run and reads the corpus
            task = load_task(cfg, run_dir=run_dir, cache_dir=args.cache)
        run = run_experiment(cfg, task, run_dir)
        paths = finish_run(run_dir, root, args.out)
    print(summary(run, paths))


def thresholds_words(crit: dict) -> str:
    """The thresholds the rule judges: per set, of the weighted mean, or the flat one ("" for none)."""
    from report.format import fmt_metric

    fmt = lambda v: fmt_metric(crit["metric"], v)  # noqa: E731
    if isinstance(crit.get("weighted"), dict):
        return f"threshold {fmt(crit['weighted']['threshold'])} (weighted mean)"
    rules = crit.get("set_rules") or {}
    if rules:
        return "thresholds " + ", ".join(f"{n} {fmt(r['threshold'])}" for n, r in rules.items())
    return f"threshold {fmt(crit['threshold'])}" if crit.get("threshold") is not None else ""


def summary(run: dict, paths: dict) -> str:
    """The one-screen summary printed at the end of a run."""
    from report.format import fmt_metric
    from report.model import result_rows

    crit = run["criterion"]
    metric = crit["metric"]
    computed = run.get("n_computed_evals")
    evals = f"{run['n_full_evals']} full evaluations in the search" + (
        f" ({computed} computed, {run['n_full_evals'] - computed} from the cache)" if computed is not None else "")
    lines = [f"run {run['id']}: {run['status'].upper()}  ({evals}, "
             f"{run['wall_s']:.0f} s)", f"criterion: {crit['text']}" + (f" -> {thresholds_words(crit)}" if thresholds_words(crit) else "")]
    # result_rows: baselines, each search's best, the selected mix, with the report's speedups
    entries = run["baselines"] + [x["best"] for x in run.get("searches") or [] if x.get("best")] + \
        ([run["selected"]] if run["selected"] else [])
    lines.append(f"{'':<30}{metric:>12}{'passes':>8}{'hackathon':>11}{'latency ms':>12}{'speedup':>9}")
    for e, r in zip(entries, result_rows(run)):
        value = (e.get("accuracy") or {}).get(metric)  # the record's own value: inf (FP32's SNR) is a result
        if r["metric"] is None and not (isinstance(value, float) and math.isinf(value)):
            lines.append(f"{r['label']:<30}  not run: {e.get('error', '')[:70]}")
            continue
        speedup = f"{r['speedup']:>8.2f}x" if r["speedup"] is not None else f"{'?':>9}"
        shown = fmt_metric(metric, r["metric"] if r["metric"] is not None else value)
        lines.append(f"{r['label']:<30}{shown:>12}{'yes' if r['passed'] else 'no':>8}"
                     f"{r['hackathon'] or '?/?':>10} {r['objective_ms']:>12.1f}{speedup}")
    if run["selected"]:
        lines.append(f"selected: {run['selected']['source']} (re-timed side by side with FP32), "
                     f"{run['selected']['n_int8']} INT8 nodes, {run['selected']['n_fallback']} kept in "
                     f"{run['config']['quantize']['fallback'].upper()}; models, plans and engines in "
                     f"{Path(paths['html']).parent / 'final'}")
    conf = run.get("confirmation")
    if conf:
        rejected = [a["label"] for a in conf["attempts"] if a["confirmation"]["passed"] is False]
        lines.append(f"confirmation on {conf['set']}: " + (f"{conf['confirmed']} confirmed" if conf["confirmed"]
                                                          else "nothing confirmed")
                     + (f" (rejected: {', '.join(rejected)})" if rejected else "")
                     + f", {len(conf['attempts'])} of at most {conf['max_confirmations']} attempts")
    lines.append(f"report: {paths['html']}")
    return "\n".join(lines)
