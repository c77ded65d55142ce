"""The report's four PNG plots (PLOTS): per-layer sensitivity, accuracy vs latency, calibrators, latency per case.

Each plot_* takes a loaded run and returns PNG bytes; a run without the data for a plot gets a placeholder image
that says what is missing. matplotlib's object API on the Agg canvas (no pyplot, no global backend switch).
"""
from __future__ import annotations

import io
import math

from report.format import fmt_metric, fmt_ms
from report.model import (SELECTED_LABEL, case_sort_key, cases_of, fp32_baseline, int8_baselines, latency_series,
                          metric_label, metric_of, num, objective_of, passes, speedup, threshold_of)

PLOTS = ("sensitivity", "pareto", "calibrators", "latency")
SENSITIVITY_TOP = 40

# Colours (colour-blind safe pairs: blue/orange, green/red differ also in marker shape).
C_BASE, C_HILITE = "#4c72b0", "#dd8452"
C_PASS, C_FAIL, C_SEL = "#2ca02c", "#d62728", "#f2b701"
SERIES_COLOURS = ("#7f7f7f", "#4c72b0", "#dd8452", "#2ca02c")


def _short_node(name: str, width: int = 66) -> str:
    """A node name cut to `width` characters for a tick label, keeping its model prefix and its tail."""
    if len(name) <= width:
        return name
    model, sep, path = name.partition(":")
    if sep and len(model) < 12:
        return f"{model}:…{path[-(width - len(model) - 2):]}"
    return "…" + name[-(width - 1):]


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
    sens = {k: num(v) for k, v in (run.get("sensitivity") or {}).items()}
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
            cand.append((o, m, passes(t, metric, thr)))
    base = [(objective_of(b), metric_of(b, metric), passes(b, metric, thr), str(b["label"]))
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
    ref = num((run.get("criterion") or {}).get("reference"))
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
    bars = [(str(b.get("calibrator") or b["label"]), metric_of(b, metric), passes(b, metric, thr))
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
        ref = num((run.get("criterion") or {}).get("reference"))
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


def plot_latency(run: dict) -> bytes:
    title = "Median latency per grid case"
    series = latency_series(run)
    if not series:
        return _placeholder(title, "run.json has no per-case latency")
    data = [(name, cases_of(e)) for name, e in series]
    keys = sorted({k for _, c in data for k in c}, key=case_sort_key)
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
                    s = speedup(ref.get(k), sel.get(k))
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


def plot_all(run: dict) -> dict[str, bytes]:
    """{name: PNG bytes} of every plot, in PLOTS order."""
    makers = {"sensitivity": plot_sensitivity, "pareto": plot_pareto, "calibrators": plot_calibrators,
              "latency": plot_latency}
    return {name: makers[name](run) for name in PLOTS}
