"""`wb runs list|compare|report|prune|reindex`: the index of search runs, their reports and their disk."""
from __future__ import annotations

import sys
from pathlib import Path


def _table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    fmt = lambda r: "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([fmt(headers), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def _f(v, spec: str = ".4g", suffix: str = "") -> str:
    return "—" if v is None else f"{v:{spec}}{suffix}"


def cmd_list(args) -> None:
    from report.format import fmt_metric
    from report.index import _root, list_runs

    runs = list_runs(args.root)
    if not runs:
        print(f"no runs indexed under {_root(args.root)} (`wb runs reindex` builds the index from run.json files)")
        return
    rows = [[r["id"], r["created"], r["model"] or "?", r["backend"] or "?", r["isa"] or "?", r["status"] or "?", r["metric"],
             fmt_metric(r["metric"], r["fp32_metric"]), fmt_metric(r["metric"], r["selected_metric"]),
             _f(r["selected_objective_ms"], ".2f"), _f(r["speedup"], ".2f", "×"), _f(r["n_full_evals"], "d"), r["path"]]
            for r in runs]
    print(_table(["id", "created", "model", "backend", "int8 ISA", "status", "metric", "FP32", "selected", "sel. ms",
                  "speedup", "evals", "path"], rows, right={7, 8, 9, 10, 11}))


def cmd_compare(args) -> None:
    from report.format import fmt_metric, fmt_ms, fmt_pass, fmt_x
    from report.index import compare_runs

    c = compare_runs(args.root, args.a, args.b)
    for w in c["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    ma, mb = c["a"]["metric"], c["b"]["metric"]
    num = {"fp32_metric", "selected_metric"}
    srows = []
    for s in c["summary"]:
        if s["field"] in num:
            va, vb = fmt_metric(ma, s["a"]), fmt_metric(mb, s["b"])
        elif s["field"] in ("selected_objective_ms", "fp32_objective_ms"):
            va, vb = fmt_ms(s["a"]), fmt_ms(s["b"])
        elif s["field"] == "speedup":
            va, vb = fmt_x(s["a"]), fmt_x(s["b"])
        else:
            va, vb = ("—" if s["a"] is None else str(s["a"])), ("—" if s["b"] is None else str(s["b"]))
        srows.append([s["field"], va, vb])
    print(_table(["field", f"A: {c['a']['id']}", f"B: {c['b']['id']}"], srows))
    print()
    cell = lambda r, m, k: "—" if r is None else {  # noqa: E731
        "metric": lambda: fmt_metric(m, r["metric"]), "passed": lambda: fmt_pass(r["passed"]),
        "objective_ms": lambda: fmt_ms(r["objective_ms"]), "speedup": lambda: fmt_x(r["speedup"])}[k]()
    rows = [[r["label"]] + [cell(r[s], m, k) for k in ("metric", "passed", "objective_ms", "speedup")
                            for s, m in (("a", ma), ("b", mb))] for r in c["rows"]]
    la, lb = c["metric_label"]["a"], c["metric_label"]["b"]
    print(_table(["label", f"{la} A", f"{lb} B", "pass A", "pass B", "ms A", "ms B", "speedup A", "speedup B"], rows,
                 right=set(range(1, 9))))


def cmd_report(args) -> None:
    from report.document import write_report
    from report.index import index_run

    paths = write_report(args.run_dir)
    row = index_run(args.run_dir, args.root)
    print(f"wrote {paths['markdown']}, {paths['html']} and {len(paths) - 2} plots; indexed run {row['id']}")


def cmd_reindex(args) -> None:
    from report.index import reindex

    res = reindex(args.root)
    print(f"indexed {len(res['indexed'])} runs into {res['path']}")


def cmd_prune(args) -> None:
    from pipeline.prune import prune_run

    for d in args.run_dir:
        res = prune_run(d, dry_run=args.dry_run)
        verb = "would free" if args.dry_run else "freed"
        print(f"{d}: {verb} {res['freed_bytes'] / 1e9:.2f} GB ({len(res['removed'])} paths: engines/ and the placed "
              f"models models.json does not name)")


def register(subparsers) -> None:
    p = subparsers.add_parser("runs", help="list, compare and report search runs (index: <root>/index.sqlite)")
    sub = p.add_subparsers(dest="runs_cmd", required=True)
    root = dict(type=Path, default=None, help="runs root (default: $WB_RUNS_ROOT or experiments/runs)")

    s = sub.add_parser("list", help="the indexed runs, newest first")
    s.add_argument("--root", **root)
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("compare", help="two runs side by side (ids or unique id prefixes)")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--root", **root)
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("report", help="regenerate report.md/report.html/plots of a run and re-index it")
    s.add_argument("run_dir", type=Path)
    s.add_argument("--root", **root)
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("prune", help="free finished runs' disk: their engines/ and the placed models that "
                       "models.json does not name (caches; results, reports and final/ stay)")
    s.add_argument("run_dir", type=Path, nargs="+")
    s.add_argument("--dry-run", action="store_true", help="only say what would be freed")
    s.set_defaults(func=cmd_prune)

    s = sub.add_parser("reindex", help="rebuild the index from the run.json files under the root")
    s.add_argument("--root", **root)
    s.set_defaults(func=cmd_reindex)

