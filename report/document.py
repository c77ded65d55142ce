"""The human-readable report of one search run: report.md, a self-contained report.html and four PNG plots.

Everything is derived from `run_dir/run.json` (format "wb-run/1", written by the search pipeline), so a report
can be regenerated at any time with `wb runs report RUN_DIR`. All files are written atomically beside run.json.

Plots use matplotlib's object API on the Agg canvas (no pyplot, no global backend switch).
"""
from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any, Iterable

from core.errors import WorkbenchError
from core.fsutil import atomic_path, read_json

RUN_FORMAT = "wb-run/1"
METRIC_LABELS = {"cer_rescore": "CER", "wer_rescore": "WER", "cer_greedy": "greedy CER"}
METRIC_ORDER = ("cer_rescore", "wer_rescore", "cer_greedy")
PLOTS = ("sensitivity", "pareto", "calibrators", "latency")
SENSITIVITY_TOP = 40
SELECTED_LABEL = "selected mix"

# Colours (colour-blind safe pairs: blue/orange, green/red differ also in marker shape).
C_BASE, C_HILITE = "#4c72b0", "#dd8452"
C_PASS, C_FAIL, C_SEL = "#2ca02c", "#d62728", "#f2b701"
SERIES_COLOURS = ("#7f7f7f", "#4c72b0", "#dd8452", "#2ca02c")


# ----------------------------------------------------------------------------------------------- reading run.json

def run_json_path(run_dir: str | Path) -> Path:
    p = Path(run_dir)
    return p if p.name == "run.json" and not p.is_dir() else p / "run.json"


def load_run(run_dir: str | Path) -> dict:
    """Read and minimally validate run.json; every problem is a WorkbenchError that names the file."""
    path = run_json_path(run_dir)
    if not path.is_file():
        raise WorkbenchError(f"missing run file {path} (is {Path(run_dir)} a run directory?)")
    try:
        run = read_json(path)
    except WorkbenchError as exc:
        raise WorkbenchError(f"corrupt run file: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkbenchError(f"cannot read run file {path}: {exc}") from exc
    if not isinstance(run, dict):
        raise WorkbenchError(f"corrupt run file {path}: expected a JSON object, got {type(run).__name__}")
    if run.get("format") != RUN_FORMAT:
        raise WorkbenchError(f"corrupt run file {path}: format is {run.get('format')!r}, expected {RUN_FORMAT!r}")
    problems = []
    if not isinstance(run.get("id"), str) or not run["id"]:
        problems.append("'id' is missing or not a string")
    if not isinstance(run.get("criterion"), dict) or not run["criterion"].get("metric"):
        problems.append("'criterion.metric' is missing")
    baselines = run.get("baselines", [])
    if not isinstance(baselines, list) or not all(isinstance(b, dict) and b.get("label") for b in baselines):
        problems.append("'baselines' must be a list of objects with a 'label'")
    for key, typ in (("selected", dict), ("sensitivity", dict), ("trace", list)):
        if run.get(key) is not None and not isinstance(run[key], typ):
            problems.append(f"'{key}' must be a JSON {'object' if typ is dict else 'array'} or null")
    if isinstance(run.get("trace"), list) and not all(isinstance(t, dict) for t in run["trace"]):
        problems.append("'trace' entries must be JSON objects")
    if problems:
        raise WorkbenchError(f"corrupt run file {path}: " + "; ".join(problems))
    return run


# ---------------------------------------------------------------------------------------------- derived values

def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def metric_of(entry: dict | None, name: str) -> float | None:
    return _num(((entry or {}).get("accuracy") or {}).get(name))


def objective_of(entry: dict | None) -> float | None:
    return _num(((entry or {}).get("latency") or {}).get("objective_ms"))


def cases_of(entry: dict | None) -> dict[tuple, float]:
    """{(model, bs, sl): median_ms} of one entry's latency cases."""
    out = {}
    for c in ((entry or {}).get("latency") or {}).get("cases") or []:
        if isinstance(c, dict) and _num(c.get("median_ms")) is not None:
            out[(str(c.get("model", "?")), c.get("bs"), c.get("sl"))] = float(c["median_ms"])
    return out


def _case_sort_key(key: tuple) -> tuple:
    model, bs, sl = key
    order = {"encoder": 0, "decoder": 1}.get(model, 2)
    return (order, model, bs if isinstance(bs, (int, float)) else 0, sl if isinstance(sl, (int, float)) else 0)


def _precision(b: dict) -> str:
    return str(b.get("precision") or "").lower()


def fp32_baseline(run: dict) -> dict | None:
    bl = run.get("baselines") or []
    return (next((b for b in bl if _precision(b) == "fp32"), None)
            or next((b for b in bl if str(b.get("label", "")).lower() == "fp32"), None))


def fp16_baseline(run: dict) -> dict | None:
    bl = run.get("baselines") or []
    return (next((b for b in bl if _precision(b) == "fp16"), None)
            or next((b for b in bl if str(b.get("label", "")).lower() == "fp16"), None))


def int8_baselines(run: dict) -> list[dict]:
    return [b for b in run.get("baselines") or [] if _precision(b) == "int8"]


def best_int8_baseline(run: dict) -> dict | None:
    """The fastest all-INT8 baseline (lowest latency objective); None if none was timed."""
    timed = [b for b in int8_baselines(run) if objective_of(b) is not None]
    return min(timed, key=objective_of, default=None)


def threshold_of(run: dict) -> float | None:
    crit = run.get("criterion") or {}
    thr = _num(crit.get("threshold"))
    if thr is None:
        ref, delta = _num(crit.get("reference")), _num(crit.get("delta"))
        if ref is not None and delta is not None:
            thr = ref + delta if crit.get("kind") == "absolute" else ref * (1 + delta) if crit.get("kind") == "relative" else None
    return thr


def _passes(entry: dict, metric: str, threshold: float | None, higher_is_better: bool = False) -> bool | None:
    if isinstance(entry.get("passed"), bool):
        return entry["passed"]
    m = metric_of(entry, metric)
    if m is None or threshold is None:
        return None
    return m >= threshold if higher_is_better else m <= threshold


def metric_names(run: dict) -> list[str]:
    """The criterion metric first, then CER/WER/greedy CER, then any other accuracy key that occurs."""
    names = [run["criterion"]["metric"]]
    entries = list(run.get("baselines") or []) + ([run["selected"]] if run.get("selected") else [])
    seen = {k for e in entries for k in (e.get("accuracy") or {})}
    names += [m for m in METRIC_ORDER if m in seen]
    names += sorted(seen - set(METRIC_ORDER))
    return list(dict.fromkeys(names))


def _speedup(ref: float | None, val: float | None) -> float | None:
    return ref / val if ref is not None and val not in (None, 0.0) else None


def result_rows(run: dict) -> list[dict]:
    """One row per baseline and the selected mix: metrics, pass, hackathon, objective, speedups vs FP32."""
    fp32 = fp32_baseline(run)
    ref_obj, ref_cases = objective_of(fp32), cases_of(fp32)
    metric, thr = run["criterion"]["metric"], threshold_of(run)
    entries = [("baseline", b) for b in run.get("baselines") or []]
    entries += [("search", x["best"]) for x in run.get("searches") or [] if isinstance(x.get("best"), dict)]
    if run.get("selected"):
        entries.append(("selected", run["selected"]))
    rows = []
    for kind, e in entries:
        hk = e.get("hackathon") or {}
        cases = cases_of(e)
        # The selected mix was re-timed side by side with FP32: its speedups use that FP32 timing.
        ref_e = {"latency": e["reference_latency"]} if isinstance(e.get("reference_latency"), dict) else None
        r_obj, r_cases = (objective_of(ref_e), cases_of(ref_e)) if ref_e else (ref_obj, ref_cases)
        rows.append({
            "label": str(e.get("label") or (SELECTED_LABEL if kind == "selected" else "?")),
            "kind": kind,
            "precision": e.get("precision"),
            "calibrator": e.get("calibrator"),
            "metrics": {m: metric_of(e, m) for m in metric_names(run)},
            "metric": metric_of(e, metric),
            "passed": _passes(e, metric, thr, bool(run["criterion"].get("higher_is_better"))),
            "ci": e.get("ci") if isinstance(e.get("ci"), dict) else None,
            "hackathon": (f"{hk['passed']}/{hk['total']}" if "passed" in hk and "total" in hk else None),
            "objective_ms": objective_of(e),
            "speedup": _speedup(r_obj, objective_of(e)),
            "cases": {k: {"median_ms": v, "speedup": _speedup(r_cases.get(k), v)} for k, v in cases.items()},
        })
    return rows


def side_by_side_of(run: dict, label: str) -> dict | None:
    """The side-by-side timing row that covers `label` (timed itself, or the same plan as a timed option)."""
    rows = (run.get("side_by_side") or {}).get("rows") or []
    return next((r for r in rows if r.get("label") == label or label in (r.get("same_plan") or [])), None)


def qat_comparison(run: dict, rows: list[dict] | None = None) -> list[dict] | None:
    """Issue 8's comparison, when the run has a QAT calibrator: FP32, the most accurate PTQ all-INT8, the
    search from it, QAT all-INT8 and the search from QAT scales (`rows`: result_rows(run), relabelled)."""
    rows = rows if rows is not None else result_rows(run)
    qat = next((r for r in rows if r["kind"] == "baseline" and r["calibrator"] == "qat"), None)
    if qat is None:
        return None
    ptq = [r for r in rows if r["kind"] == "baseline" and r["precision"] == "int8" and r["calibrator"] != "qat"
           and r["metric"] is not None]
    best_ptq = min(ptq, key=lambda r: r["metric"], default=None)
    search = {r["label"].removeprefix("search from "): r for r in rows if r["kind"] == "search"}
    picks = [("FP32", next((r for r in rows if r["precision"] == "fp32"), None)),
             (f"best PTQ all-INT8 ({best_ptq['calibrator']})" if best_ptq else "best PTQ all-INT8", best_ptq),
             ("PTQ selected mix (search from it)", search.get(best_ptq["calibrator"]) if best_ptq else None),
             ("QAT all-INT8", qat), ("QAT + search", search.get("qat"))]
    return [{**r, "label": label, "source_label": r["label"]} if r else {"label": label, "missing": True}
            for label, r in picks]


# -------------------------------------------------------------------------------------------------- formatting

def fmt_metric(name: str, v: float | None) -> str:
    if v is None:
        return "—"
    if name.startswith(("cer", "wer")):
        return f"{100 * v:.2f} %"
    return f"{v:.4g}"


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def fmt_interval(ci: dict | None) -> str:
    """A change with its interval, in points for rates (cer/wer), e.g. "+0.05 [-0.10, +0.22] pt"."""
    if not ci:
        return "—"
    if str(ci.get("metric", "")).startswith(("cer", "wer")):
        return f"{100 * ci['delta']:+.2f} [{100 * ci['low']:+.2f}, {100 * ci['high']:+.2f}] pt"
    return f"{ci['delta']:+.4g} [{ci['low']:+.4g}, {ci['high']:+.4g}]"


def _probe_ratio(st) -> str:
    return f"{st['median']:.3f} ± {st['se']:.3f}" if isinstance(st, dict) and "median" in st else "—"


def fmt_x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def fmt_pass(v: bool | None) -> str:
    return "—" if v is None else "yes" if v else "NO"


def host_words(host: dict | None) -> str:
    """The int8 ISA flags and library versions of a run's host record (core.host.host_info), in one line."""
    if not host:
        return "not recorded (a run made before hosts were recorded)"
    flags = (host.get("cpu") or {}).get("flags") or {}
    have = [f for f, on in flags.items() if on] or ["none of " + ", ".join(flags)]
    versions = ", ".join(f"{k} {v}" for k, v in (host.get("versions") or {}).items())
    return f"{' '.join(have)}; {versions}"


def metric_label(name: str) -> str:
    return METRIC_LABELS.get(name, name)


def criterion_words(crit: dict, threshold: float | None) -> str:
    m = crit.get("metric", "?")
    rate = m.startswith(("cer", "wer"))
    ref, delta, kind = _num(crit.get("reference")), _num(crit.get("delta")), crit.get("kind")
    hi = bool(crit.get("higher_is_better"))
    s = (f"A precision mix passes when its {metric_label(m)} (`{m}`, {'higher' if hi else 'lower'} is better) is at "
         f"{'least' if hi else 'most'} {fmt_metric(m, threshold)}")
    if ref is not None and delta is not None and kind == "absolute":
        margin = f"{100 * delta:.2f} percentage points" if rate else f"{delta:g}"
        s += f": the FP32 reference {fmt_metric(m, ref)} {'minus' if hi else 'plus'} an absolute margin of {margin}"
    elif ref is not None and delta is not None and kind == "relative":
        s += f": the FP32 reference {fmt_metric(m, ref)} {'minus' if hi else 'plus'} a relative margin of {100 * delta:.1f} %"
    s += "."
    if crit.get("text"):
        s += f' (As stated in the run: "{crit["text"]}".)'
    return s


def _short_node(name: str, width: int = 66) -> str:
    if len(name) <= width:
        return name
    model, sep, path = name.partition(":")
    if sep and len(model) < 12:
        return f"{model}:…{path[-(width - len(model) - 2):]}"
    return "…" + name[-(width - 1):]


# ------------------------------------------------------------------------------------------------------- plots

def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _placeholder(title: str, why: str) -> bytes:
    fig = _figure(7, 2.2)
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.45, why, ha="center", va="center", fontsize=11, color="#555555", transform=ax.transAxes)
    return _png(fig)


def _percent_axis(axis, metric: str) -> None:
    if metric.startswith(("cer", "wer")):
        from matplotlib.ticker import PercentFormatter
        axis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=2))


def plot_sensitivity(run: dict) -> bytes:
    sens = {k: _num(v) for k, v in (run.get("sensitivity") or {}).items()}
    items = sorted(((k, v) for k, v in sens.items() if v is not None), key=lambda kv: -kv[1])
    title = "Per-layer INT8 sensitivity"
    if not items:
        return _placeholder(title, "run.json has no per-layer sensitivity")
    top = items[:SENSITIVITY_TOP]
    fallback = set((run.get("selected") or {}).get("fallback_nodes") or [])
    fig = _figure(10.5, max(3.0, 0.26 * len(top) + 1.6))
    ax = fig.add_subplot()
    colours = [C_HILITE if k in fallback else C_BASE for k, _ in top]
    ax.barh(range(len(top)), [v for _, v in top], color=colours, height=0.75)
    ax.set_yticks(range(len(top)), [_short_node(k) for k, _ in top], fontsize=7.5)
    for tick, (k, _) in zip(ax.get_yticklabels(), top):
        if k in fallback:
            tick.set_color(C_HILITE)
            tick.set_fontweight("bold")
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_xlabel("sensitivity (higher = more harmful when this layer is INT8)")
    shown = f"top {len(top)} of {len(items)}" if len(items) > len(top) else f"all {len(items)}"
    ax.set_title(f"{title} ({shown} layers)")
    from matplotlib.patches import Patch
    handles = [Patch(color=C_BASE, label="other layers")]
    if run.get("selected"):
        n_in = sum(k in fallback for k, _ in top)
        handles.insert(0, Patch(color=C_HILITE, label=f"kept out of INT8 in the selected mix ({n_in} of {len(fallback)} shown)"))
    else:
        handles = [Patch(color=C_BASE, label="layers (no selected mix in this run)")]
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    return _png(fig)


def _pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Minimise both coordinates: (latency, metric) points no other point beats on both."""
    front, best = [], math.inf
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def plot_pareto(run: dict) -> bytes:
    metric, thr = run["criterion"]["metric"], threshold_of(run)
    title = f"Accuracy vs latency ({metric_label(metric)} vs latency objective)"
    cand = []
    for t in run.get("trace") or []:
        m, o = metric_of(t, metric), objective_of(t)
        if m is not None and o is not None:
            cand.append((o, m, _passes(t, metric, thr)))
    base = [(objective_of(b), metric_of(b, metric), _passes(b, metric, thr), str(b["label"]))
            for b in run.get("baselines") or [] if objective_of(b) is not None and metric_of(b, metric) is not None]
    sel = run.get("selected")
    sel_pt = (objective_of(sel), metric_of(sel, metric)) if sel else (None, None)
    if not cand and not base and None in sel_pt:
        return _placeholder(title, "no candidate has both an accuracy metric and a latency")
    fig = _figure(9.5, 6.0)
    ax = fig.add_subplot()
    ok = [(x, y) for x, y, p in cand if p]
    bad = [(x, y) for x, y, p in cand if not p]
    if ok:
        ax.scatter(*zip(*ok), marker="o", s=36, color=C_PASS, alpha=0.8, label=f"candidate, passes ({len(ok)})", zorder=3)
    if bad:
        ax.scatter(*zip(*bad), marker="x", s=40, color=C_FAIL, alpha=0.9, label=f"candidate, fails ({len(bad)})", zorder=3)
    for i, (x, y, p, label) in enumerate(base):
        ax.scatter([x], [y], marker="s", s=55, facecolor="white", edgecolor=C_PASS if p else C_FAIL, linewidth=1.8,
                   zorder=4, label="baseline (outline: pass/fail)" if i == 0 else None)
        ax.annotate(label, (x, y), xytext=(7, 6 if i % 2 == 0 else -12), textcoords="offset points", fontsize=8,
                    color="#333333")
    passing = ok + [(x, y) for x, y, p, _ in base if p]
    if sel and None not in sel_pt and sel.get("passed", True):
        passing.append(sel_pt)
    front = _pareto_front(passing)
    if len(front) >= 2:
        fx, fy = zip(*front)
        ax.step(fx, fy, where="post", color=C_PASS, linestyle="-", linewidth=1.2, alpha=0.7,
                label="Pareto front of passing plans", zorder=2)
    if thr is not None:
        ax.axhline(thr, color=C_FAIL, linestyle="--", linewidth=1.2, label=f"threshold {fmt_metric(metric, thr)}")
    ref = _num((run.get("criterion") or {}).get("reference"))
    if ref is not None:
        ax.axhline(ref, color="#555555", linestyle=":", linewidth=1.0, label=f"FP32 reference {fmt_metric(metric, ref)}")
    if None not in sel_pt:
        ax.scatter([sel_pt[0]], [sel_pt[1]], marker="*", s=320, color=C_SEL, edgecolor="black", linewidth=0.8,
                   zorder=5, label=f"selected mix ({fmt_ms(sel_pt[0])} ms)")
    ax.set_xlabel("latency objective (ms, lower is better)")
    ax.set_ylabel(f"{metric_label(metric)} (lower is better)")
    _percent_axis(ax.yaxis, metric)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def plot_calibrators(run: dict) -> bytes:
    metric, thr = run["criterion"]["metric"], threshold_of(run)
    title = f"All-INT8 baselines: {metric_label(metric)} per calibrator"
    bars = [(str(b.get("calibrator") or b["label"]), metric_of(b, metric), _passes(b, metric, thr))
            for b in int8_baselines(run) if metric_of(b, metric) is not None]
    if not bars:
        return _placeholder(title, "run.json has no all-INT8 baseline with an accuracy metric")
    fig = _figure(max(6.0, 1.1 * len(bars) + 3.0), 4.6)
    ax = fig.add_subplot()
    xs = range(len(bars))
    ax.bar(xs, [v for _, v, _ in bars], color=[C_PASS if p else C_FAIL for _, _, p in bars], width=0.6)
    for x, (_, v, p) in zip(xs, bars):
        ax.annotate(fmt_metric(metric, v) + ("" if p else "  fails"), (x, v), xytext=(0, 3), textcoords="offset points",
                    ha="center", fontsize=8)
    ax.set_xticks(list(xs), [n for n, _, _ in bars])
    ref = metric_of(fp32_baseline(run), metric)
    if ref is None:
        ref = _num((run.get("criterion") or {}).get("reference"))
    if ref is not None:
        ax.axhline(ref, color="#555555", linestyle=":", linewidth=1.2, label=f"FP32 {fmt_metric(metric, ref)}")
    if thr is not None:
        ax.axhline(thr, color=C_FAIL, linestyle="--", linewidth=1.2, label=f"threshold {fmt_metric(metric, thr)}")
    top = max([v for _, v, _ in bars] + [x for x in (ref, thr) if x is not None])
    ax.set_ylim(0, top * 1.15)
    _percent_axis(ax.yaxis, metric)
    ax.set_ylabel(f"{metric_label(metric)} (lower is better)")
    ax.set_xlabel("calibrator (green: passes the criterion, red: fails)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(title)
    if ref is not None or thr is not None:
        ax.legend(fontsize=8, loc="upper right")
    return _png(fig)


def latency_series(run: dict) -> list[tuple[str, dict]]:
    """The entries the latency plot compares: FP32, FP16, the fastest all-INT8 baseline, the selected mix."""
    best = best_int8_baseline(run)
    series = [("FP32", fp32_baseline(run)), ("FP16", fp16_baseline(run)),
              (f"best all-INT8: {best['label']}" if best else "all-INT8", best),
              (SELECTED_LABEL, run.get("selected"))]
    return [(name, e) for name, e in series if e and cases_of(e)]


def plot_latency(run: dict) -> bytes:
    title = "Median latency per grid case"
    series = latency_series(run)
    if not series:
        return _placeholder(title, "run.json has no per-case latency")
    data = [(name, cases_of(e)) for name, e in series]
    keys = sorted({k for _, c in data for k in c}, key=_case_sort_key)
    models = list(dict.fromkeys(k[0] for k in keys))
    fig = _figure(11.5, 3.6 * len(models) + 0.6)
    axes = fig.subplots(len(models), 1, squeeze=False)[:, 0]
    ref = dict(data[0][1]) if series[0][0] == "FP32" else {}
    sel = dict(data[-1][1]) if series[-1][0] == SELECTED_LABEL else {}
    width = 0.8 / len(data)
    for ax, model in zip(axes, models):
        mkeys = [k for k in keys if k[0] == model]
        for j, (name, cases) in enumerate(data):
            xs = [i - 0.4 + width * (j + 0.5) for i in range(len(mkeys))]
            ys = [cases.get(k, math.nan) for k in mkeys]
            ax.bar(xs, ys, width=width * 0.95, color=SERIES_COLOURS[j % len(SERIES_COLOURS)], label=name)
            if name == SELECTED_LABEL and ref:
                for x, k in zip(xs, mkeys):
                    s = _speedup(ref.get(k), sel.get(k))
                    if s is not None:
                        ax.annotate(f"{s:.2f}×", (x, sel[k]), xytext=(0, 2), textcoords="offset points",
                                    ha="center", fontsize=7, rotation=90)
        vals = [v for _, c in data for k, v in c.items() if k[0] == model and v > 0]
        if vals and max(vals) / min(vals) > 20:
            ax.set_yscale("log")
        ax.set_xticks(range(len(mkeys)), [f"bs={k[1]}\nsl={k[2]}" for k in mkeys], fontsize=8)
        ax.set_ylabel("median latency (ms)")
        ax.grid(axis="y", alpha=0.3, which="both")
        ax.set_axisbelow(True)
        ax.margins(y=0.15)
        ax.set_title(f"{model}: {title.lower()}" + (" (labels: selected-mix speedup vs FP32)" if ref and sel else ""),
                     fontsize=10)
    axes[0].legend(fontsize=8, loc="upper left")
    return _png(fig)


# ------------------------------------------------------------------------------------ document (md and html)

def _text_cols(headers: list[str]) -> set[int]:
    """Columns aligned left (the first one and the free-text ones); numbers are aligned right."""
    return {0} | {j for j, h in enumerate(headers) if h in ("label", "stage") or h.startswith("same plan")}


class _Doc:
    """A tiny block list rendered both to Markdown and to HTML, so the two reports cannot drift apart."""

    def __init__(self) -> None:
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def banner(self, text: str, ok: bool) -> None:
        self.blocks.append(("banner", text, ok))

    def kv(self, items: Iterable[tuple[str, str]]) -> None:
        self.blocks.append(("kv", list(items)))

    def ul(self, items: Iterable[str]) -> None:
        self.blocks.append(("ul", list(items)))

    def table(self, headers: list[str], rows: list[list[str]], highlight: set[int] = frozenset()) -> None:
        self.blocks.append(("table", headers, rows, set(highlight)))

    def img(self, filename: str, alt: str, png: bytes) -> None:
        self.blocks.append(("img", filename, alt, png))

    # -- Markdown
    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            kind = b[0]
            if kind == "h":
                out.append("#" * b[1] + " " + b[2])
            elif kind == "p":
                out.append(b[1])
            elif kind == "banner":
                out.append(f"> **{b[1]}**")
            elif kind == "kv":
                out.append("\n".join(f"- **{k}:** {v}" for k, v in b[1]))
            elif kind == "ul":
                out.append("\n".join(f"- {x}" for x in b[1]) if b[1] else "- (none)")
            elif kind == "table":
                headers, rows, hi = b[1], b[2], b[3]
                cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
                lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
                         "| " + " | ".join("---" if j in _text_cols(headers) else "---:" for j in range(len(headers))) + " |"]
                for i, r in enumerate(rows):
                    cells = [cell(c) for c in r]
                    if i in hi:
                        cells = [f"**{c}**" if c else c for c in cells]
                    lines.append("| " + " | ".join(cells) + " |")
                out.append("\n".join(lines))
            elif kind == "img":
                out.append(f"![{b[2]}]({b[1]})")
        return "\n\n".join(out) + "\n"

    # -- HTML
    @staticmethod
    def _inline(text: str) -> str:
        """Escape, then render `code` spans (the only inline markup the report uses)."""
        parts = html.escape(text).split("`")
        return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))

    def html(self, title: str) -> str:
        e = self._inline
        body = []
        for b in self.blocks:
            kind = b[0]
            if kind == "h":
                body.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
            elif kind == "p":
                body.append(f"<p>{e(b[1])}</p>")
            elif kind == "banner":
                body.append(f'<div class="banner {"ok" if b[2] else "failed"}">{e(b[1])}</div>')
            elif kind == "kv":
                body.append("<ul class=\"kv\">" + "".join(f"<li><b>{e(k)}:</b> {e(v)}</li>" for k, v in b[1]) + "</ul>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in b[1] or ["(none)"]) + "</ul>")
            elif kind == "table":
                headers, rows, hi = b[1], b[2], b[3]
                t = ["<div class=\"tw\"><table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr></thead><tbody>"]
                left = _text_cols(headers)
                for i, r in enumerate(rows):
                    cls = ' class="hi"' if i in hi else ""
                    t.append(f"<tr{cls}>" + "".join(f'<td class="l">{e(str(c))}</td>' if j in left else f"<td>{e(str(c))}</td>"
                                                    for j, c in enumerate(r)) + "</tr>")
                body.append("".join(t) + "</tbody></table></div>")
            elif kind == "img":
                data = base64.b64encode(b[3]).decode("ascii")
                body.append(f'<figure><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{e(b[2])}</figcaption></figure>")
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #ddd;padding-bottom:.3em}h2{font-size:1.25em;margin-top:1.8em}
.banner{padding:.8em 1.1em;border-radius:6px;font-weight:600;font-size:1.1em;margin:1em 0}
.banner.failed{background:#fde2e1;border:2px solid #d62728;color:#8b0000;font-size:1.4em}
.banner.ok{background:#e3f4e3;border:1px solid #2ca02c;color:#1d5e1d}
.tw{overflow-x:auto}table{border-collapse:collapse;font-size:.88em;margin:.6em 0}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right;white-space:nowrap}
th{background:#f3f3f3}td:first-child,th:first-child,td.l{text-align:left}tr.hi td{background:#fff6d5;font-weight:600}
code{background:#f3f3f3;padding:0 .25em;border-radius:3px;font-size:.92em}
figure{margin:1.2em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
ul.kv{list-style:none;padding-left:0}
"""


def _build_doc(run: dict, pngs: dict[str, bytes]) -> _Doc:
    crit, metric, thr = run["criterion"], run["criterion"]["metric"], threshold_of(run)
    status, sel = run.get("status"), run.get("selected")
    rows = result_rows(run)
    d = _Doc()
    d.h(1, f"Precision search report: {run.get('model', '?')} — run {run['id']}")
    if status != "passed":
        why = ("no precision mix passed the accuracy criterion, so there is no selected mix"
               if status == "no_passing_plan" else "the run did not finish with a passing plan")
        d.banner(f"FAILED (status: {status}): {why}.", ok=False)
    elif not sel:
        d.banner("Status is passed, but run.json records no selected mix.", ok=False)
    else:
        s = next((r for r in rows if r["kind"] == "selected"), None)
        d.banner(f"PASSED: selected mix {fmt_metric(metric, s and s['metric'])} {metric_label(metric)}, "
                 f"{fmt_x(s and s['speedup'])} faster than FP32 on the latency objective.", ok=True)

    d.h(2, "Summary")
    wall = _num(run.get("wall_s"))
    d.kv([("created", str(run.get("created", "?"))), ("model", str(run.get("model", "?"))),
          ("backend", str(run.get("backend", "?"))), ("device", str(run.get("device", "?"))),
          ("CPU int8 flags and versions", host_words(run.get("host"))),
          ("status", str(status)),
          ("full evaluations", f"{run.get('n_full_evals', '?')} (cache hits: {run.get('n_cache_hits', 0)})"),
          ("wall time", f"{wall / 60:.1f} min" if wall is not None else "?")])
    d.h(3, "Accuracy criterion")
    d.p(criterion_words(crit, thr))

    d.h(2, "Results")
    mnames = metric_names(run)
    with_ci = any(r["ci"] for r in rows)
    headers = ["label"] + [metric_label(m) + (" (criterion)" if m == metric else "") for m in mnames] + \
              (["change vs FP32 [95 % interval]"] if with_ci else []) + \
              ["passes", "hackathon check", "objective (ms)", "speedup vs FP32"]
    table = [[r["label"]] + [fmt_metric(m, r["metrics"][m]) for m in mnames] +
             ([fmt_interval(r["ci"])] if with_ci else []) +
             [fmt_pass(r["passed"]), r["hackathon"] or "—", fmt_ms(r["objective_ms"]), fmt_x(r["speedup"])]
             for r in rows]
    d.table(headers, table, {i for i, r in enumerate(rows) if r["kind"] == "selected"})
    if fp32_baseline(run) is None:
        d.p("No FP32 baseline in this run: speedups cannot be computed.")
    if with_ci:
        d.p("Change vs FP32: the metric's change with its paired bootstrap 95 % interval over the test items "
            "(resampled together for both models, 2000 times, seeded; evaluation/bootstrap.py). The criterion "
            "compares point estimates; an interval that crosses the threshold means the test split cannot tell.")
    d.p("Speedup = FP32 latency / this latency (objective, and per case below); above 1 is faster than FP32. "
        "The hackathon check compares outputs with the FP32 reference over the bs×sl grid (cases passed/total).")

    sbs = run.get("side_by_side") or {}
    if sbs.get("rows"):
        d.h(3, "Side-by-side timing of the passing options")
        timed = sorted(sbs["rows"], key=lambda r: r.get("objective_ms") or 0)

        def paired(r, key):
            st = r.get(key) or {}
            return "—" if "median" not in st else f"{st['median']:.3f} ({st['q25']:.3f}–{st['q75']:.3f})"

        d.table(["label", "same plan (same graph) as", "fallback layers", metric_label(metric), "objective (ms)",
                 "speedup vs FP32", "paired ratio to FP32 (IQR)", "paired ratio to the fastest (IQR)"],
                [[r["label"], ", ".join(r.get("same_plan") or []) or "—", str(r.get("n_fallback", "—")),
                  fmt_metric(metric, metric_of(r, metric)), fmt_ms(_num(r.get("objective_ms"))),
                  fmt_x(_num(r.get("speedup_vs_fp32"))), paired(r, "paired_vs_fp32"), paired(r, "paired_vs_fastest")]
                 for r in timed],
                {i for i, r in enumerate(timed) if sel and r["label"] == sel.get("source")})
        if sbs.get("rule"):
            d.p(f"How the choice was made: these options were timed interleaved run by run with FP32 "
                f"({fmt_ms(_num(sbs.get('fp32_objective_ms')))} ms here), so run i of each was taken together and "
                f"its ratio cancels the machine's drift. Fastest by the median paired ratio: "
                f"{sbs.get('fastest')}. Within noise of it: {', '.join(sbs.get('within_noise') or []) or '—'}. "
                f"Rule: {sbs['rule']}."
                + (f" Not timed side by side (slower by their sequential timings): {', '.join(sbs['not_timed'])}."
                   if sbs.get("not_timed") else ""))
        else:
            d.p(f"One option per plan (the most accurate; options with the same plan differ only in scale values, "
                f"so their engines are equally fast), re-timed interleaved run by run with FP32 "
                f"({fmt_ms(_num(sbs.get('fp32_objective_ms')))} ms here): on a noisy machine only ratios measured "
                f"side by side are comparable.")

    case_keys = sorted({k for r in rows for k in r["cases"]}, key=_case_sort_key)
    for model in dict.fromkeys(k[0] for k in case_keys):
        mk = [k for k in case_keys if k[0] == model]
        d.h(3, f"{model}: median latency per case (ms, speedup vs FP32)")
        trows = []
        for r in rows:
            cells = []
            for k in mk:
                c = r["cases"].get(k)
                cells.append("—" if c is None else fmt_ms(c["median_ms"]) +
                             (f" ({fmt_x(c['speedup'])})" if c["speedup"] is not None else ""))
            trows.append([r["label"]] + cells)
        d.table(["label"] + [f"bs={k[1]} sl={k[2]}" for k in mk], trows,
                {i for i, r in enumerate(rows) if r["kind"] == "selected"})
    if not case_keys:
        d.p("No per-case latency was recorded in this run.")

    comp = qat_comparison(run, rows)
    if comp:
        d.h(3, "PTQ vs QAT")
        fp32m = comp[0].get("metric")
        crows = []
        for r in comp:
            if r.get("missing"):
                crows.append([r["label"], "not run", "", "", "", ""])
                continue
            delta = None if fp32m is None or r["metric"] is None else r["metric"] - fp32m
            sbs = side_by_side_of(run, r["source_label"])
            crows.append([r["label"], fmt_metric(metric, r["metric"]),
                          "—" if delta is None else f"{100 * delta:+.2f} pt", fmt_pass(r["passed"]),
                          fmt_ms(sbs["objective_ms"]) if sbs else "—", fmt_x(sbs["speedup_vs_fp32"]) if sbs else "—"])
        d.table(["label", metric_label(metric), "vs FP32", "passes", "objective (ms, side by side)",
                 "speedup vs FP32"], crows)
        d.p("QAT rows place the fine-tuned weights of the QAT directory with its ranges (calibrator `qat`); "
            "FP32 is the original model. Each search starts from its all-INT8 row. Latency is the side-by-side "
            "timing above (rows with the same plan share it: same graph, same speed); “—”: not timed side by side "
            "(failing options are not).")

    d.h(2, "Selected mix")
    if sel:
        sens = {k: _num(v) for k, v in (run.get("sensitivity") or {}).items()}
        ranked = [k for k, v in sorted(((k, v) for k, v in sens.items() if v is not None), key=lambda kv: -kv[1])]
        rank = {k: i + 1 for i, k in enumerate(ranked)}
        fb = sel.get("fallback_nodes") or []
        d.kv([("plan hash", f"`{sel.get('plan_hash', '?')}`"), ("INT8 layers", str(sel.get("n_int8", "?"))),
              ("fallback layers (kept out of INT8)", str(sel.get("n_fallback", len(fb))))])
        d.ul([f"`{n}`" + (f" — sensitivity {sens[n]:.4g} (rank {rank[n]} of {len(ranked)})" if n in rank else "")
              for n in fb])
    else:
        d.p("None: no plan passed the criterion." if status != "passed" else "None recorded in run.json.")

    d.h(2, "Plots")
    captions = {
        "sensitivity": f"Per-layer sensitivity, top {SENSITIVITY_TOP}; highlighted: layers the selected mix keeps out of INT8.",
        "pareto": f"{metric_label(metric)} vs latency objective of every candidate with both; "
                  "the line is the Pareto front of passing plans, the star the selected mix.",
        "calibrators": f"{metric_label(metric)} of the all-INT8 baselines per calibrator, with FP32 and the threshold.",
        "latency": "Median latency per grid case: FP32, FP16, the fastest all-INT8 baseline and the selected mix.",
    }
    for name in PLOTS:
        d.img(f"{name}.png", captions[name], pngs[name])

    d.h(2, "Search trace")
    trace = run.get("trace") or []
    ref_obj = objective_of(fp32_baseline(run))
    trows = []
    for i, t in enumerate(trace, 1):
        trows.append([str(i), str(t.get("label", "?")), str(t.get("stage", "?")), str(t.get("n_int8", "—")),
                      str(t.get("n_fallback", "—")), fmt_metric(metric, metric_of(t, metric)),
                      fmt_pass(t.get("passed") if isinstance(t.get("passed"), bool) else None),
                      fmt_ms(objective_of(t)), fmt_x(_speedup(ref_obj, objective_of(t))),
                      _probe_ratio(t.get("paired_vs_base")), "yes" if t.get("cached") else "no"])
    sel_hash = (sel or {}).get("plan_hash")
    d.table(["#", "label", "stage", "#int8", "#fallback", metric_label(metric), "passed", "objective (ms)",
             "speedup", "paired ratio to the probed plan (median ± SE)", "cached"], trows,
            {i for i, t in enumerate(trace) if sel_hash and t.get("plan_hash") == sel_hash})
    d.p(f"{len(trace)} candidates; {run.get('n_full_evals', '?')} full accuracy evaluations, "
        f"{run.get('n_cache_hits', 0)} answered from the evaluation cache. "
        "“—” means not measured at that stage (latency probes have no accuracy, accuracy-only steps no latency). "
        "A latency probe is validated only when its paired ratio to the plan it reverts from, timed interleaved, "
        "is below 1 by more than its standard error.")

    rtx = run.get("rtx_builds")  # wb rtx-check's rtx_builds.json, when it ran on this run
    if rtx:
        d.h(2, f"TensorRT-RTX plans (SM{rtx['compute_capability']}, built on CPU, not run)")
        from pipeline.rtx_check import RTX_TABLE_HEADERS, rtx_table_rows

        d.table(RTX_TABLE_HEADERS, rtx_table_rows(rtx))
        d.p(f"TensorRT-RTX {rtx['tensorrt_rtx']} parsed and built every graph above ahead of time"
            + (f", except {len(rtx['failures'])} it refused" if rtx["failures"] else "")
            + "; an INT8 plan of about half the FP32 plan's bytes is the evidence that its weights are INT8.")

    d.h(2, "What was measured where")
    backend, device = str(run.get("backend", "?")), str(run.get("device", "?"))
    items = [f"Accuracy ({', '.join(metric_label(m) for m in mnames)}) and latency: backend `{backend}` on {device}.",
             "Latency: median over timed runs per grid case (batch size × sequence length) for encoder and decoder; "
             "the objective is the single number the search minimises."]
    if backend == "onnxruntime":
        items.append("These numbers come from ONNX Runtime, not TensorRT: they rank plans for this backend and device "
                     "only, and say nothing about TensorRT speed on a GPU.")
    d.ul(items)
    return d


# -------------------------------------------------------------------------------------------------- entry point

def write_report(run_dir: str | Path) -> dict[str, Path]:
    """Write report.md, report.html and the four PNGs beside run.json; returns {name: path}."""
    run_dir = run_json_path(run_dir).parent
    run = load_run(run_dir)
    if (run_dir / "rtx_builds.json").is_file():
        run["rtx_builds"] = read_json(run_dir / "rtx_builds.json")
    makers = {"sensitivity": plot_sensitivity, "pareto": plot_pareto, "calibrators": plot_calibrators,
              "latency": plot_latency}
    pngs = {name: makers[name](run) for name in PLOTS}
    paths: dict[str, Path] = {}
    for name, data in pngs.items():  # PNGs first, so report.md never refers to a missing image
        paths[name] = run_dir / f"{name}.png"
        with atomic_path(paths[name]) as tmp:
            tmp.write_bytes(data)
    doc = _build_doc(run, pngs)
    paths["markdown"] = run_dir / "report.md"
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text(doc.markdown(), encoding="utf-8")
    paths["html"] = run_dir / "report.html"
    with atomic_path(paths["html"]) as tmp:
        tmp.write_text(doc.html(f"{run.get('model', '?')} run {run['id']}"), encoding="utf-8")
    return paths
