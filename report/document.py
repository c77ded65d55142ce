"""The human-readable report of one search run: report.md, a self-contained report.html and four PNG plots.

Everything is derived from `run_dir/run.json` (pipeline/runfile.py), so a report can be regenerated at any time
with `wb runs report RUN_DIR`. All files are written atomically beside run.json. This module only assembles the
document, section by section; the numbers come from report/model.py, their text from report/format.py and the
figures from report/plots.py.
"""
from __future__ import annotations

from pathlib import Path

from core.fsutil import atomic_path, read_json
from pipeline.runfile import load_run, run_json_path
from report.format import (Doc, criterion_words, fmt_change, fmt_interval, fmt_metric, fmt_ms, fmt_pass, fmt_probe_ratio, fmt_x,
                           host_words, stage_words)
from report.model import (case_sort_key, confirmation_rows, fp32_baseline, metric_label, metric_names, metric_of, num,
                          objective_of, qat_comparison, result_rows, set_rows, side_by_side_of, speedup, threshold_of)
from report.plots import PLOTS, SENSITIVITY_TOP, plot_all


def _build_doc(run: dict, pngs: dict[str, bytes]) -> Doc:
    """The whole report as one Doc, section by section; `pngs`: plot_all(run), embedded in the HTML."""
    crit, metric, thr = run["criterion"], run["criterion"]["metric"], threshold_of(run)
    status, sel = run.get("status"), run.get("selected")
    rows = result_rows(run)
    d = Doc()
    d.h(1, f"Precision search report: {run.get('model', '?')} — run {run['id']}")
    if status != "passed":
        why = ("no precision mix passed the accuracy criterion, so there is no selected mix"
               if status == "no_passing_plan" else
               "the selected mix passed the search sets but failed the confirmation split (and so did every "
               "other option tried within the budget)" if status == "not_confirmed" else
               "the run did not finish with a passing plan")
        d.banner(f"FAILED (status: {status}): {why}.", ok=False)
    elif not sel:
        d.banner("Status is passed, but run.json records no selected mix.", ok=False)
    else:
        s = next((r for r in rows if r["kind"] == "selected"), None)
        d.banner(f"PASSED: selected mix {fmt_metric(metric, s and s['metric'])} {metric_label(metric)}, "
                 f"{fmt_x(s and s['speedup'])} faster than FP32 on the latency objective.", ok=True)

    d.h(2, "Summary")
    wall = num(run.get("wall_s"))
    d.kv([("created", str(run.get("created", "?"))), ("model", str(run.get("model", "?"))),
          ("backend", str(run.get("backend", "?"))), ("device", str(run.get("device", "?"))),
          ("CPU int8 flags and versions", host_words(run.get("host"))),
          ("status", str(status)),
          ("full evaluations", f"{run.get('n_full_evals', '?')} (cache hits: {run.get('n_cache_hits', 0)})"),
          ("wall time", f"{wall / 60:.1f} min" if wall is not None else "?")]
         + ([("stages", stage_words(run["stage_s"]))] if isinstance(run.get("stage_s"), dict) else []))
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
             [fmt_pass(r["passed"]), r["hackathon"] or "—",
              fmt_ms(r["objective_ms"]) + (" ¹" if r["timed_as"] else ""), fmt_x(r["speedup"])]
             for r in rows]
    d.table(headers, table, {i for i, r in enumerate(rows) if r["kind"] == "selected"})
    shared = sorted({r["timed_as"] for r in rows if r["timed_as"]})
    if shared:
        d.p("¹ The same graph as " + ", ".join(shared) + " (the same all-INT8 plan and recipe; only the "
            "calibrators' scales differ, which int8 kernels do not see): timed once, for all of them.")
    if fp32_baseline(run) is None:
        d.p("No FP32 baseline in this run: speedups cannot be computed.")
    if with_ci:
        d.p("Change vs FP32: the metric's change with its paired bootstrap 95 % interval over the test items "
            "(resampled together for both models, 2000 times, seeded; evaluation/bootstrap.py). The criterion "
            "compares point estimates; an interval that crosses the threshold means the test split cannot tell.")
    protocol = next((f"{b['latency']['warmup']} warm-up and {b['latency']['iters']} timed runs per case"
                     for b in run.get("baselines") or [] if isinstance(b.get("latency"), dict)
                     and "warmup" in b["latency"] and "iters" in b["latency"]), None)
    d.p("Speedup = FP32 latency / this latency (objective, and per case below); above 1 is faster than FP32. "
        + (f"Baselines were timed one after another ({protocol}): these ratios rank; the selected mix's speedup "
           "comes from the side-by-side timing below. " if protocol else "")
        + "The hackathon check compares outputs with the FP32 reference over the bs×sl grid (cases passed/total).")

    srows = set_rows(run)
    if srows:
        d.h(3, "Evaluation sets")
        d.table(["label", "set", metric_label(metric), "FP32", "change vs FP32 [95 % interval]", "passes on the set"],
                [[r["label"], r["set"], fmt_metric(metric, r["metric"]), fmt_metric(metric, r["reference"]),
                  fmt_interval(r["ci"]) if r["ci"] else fmt_change(metric, r["change"]), fmt_pass(r["passed"])]
                 for r in srows], {i for i, r in enumerate(srows) if r["selected"]})
        rules = crit.get("set_rules") or {}
        how = ("each set passes against its own threshold (" +
               ", ".join(f"{n} {fmt_metric(metric, num(r.get('threshold')))}" for n, r in rules.items()) + ")"
               if crit.get("sets") != "weighted" else
               f"the sets' weighted mean passes against {fmt_metric(metric, num((crit.get('weighted') or {}).get('threshold')))}"
               f" (weights {', '.join(f'{n} {w:g}' for n, w in (crit.get('weights') or {}).items())}); "
               "“passes on the set” is then not judged per set")
        d.p(f"The criterion applies to the evaluation sets: {how}; mode {crit.get('mode', 'point')} "
            f"({'the point estimate' if crit.get('mode', 'point') == 'point' else 'the bound of the 95 % interval in the metric’s bad direction'}). "
            "The flat metrics above are over all of the sets' items together.")

    crows = confirmation_rows(run)
    if crows:
        conf = run["confirmation"]
        d.h(3, f"Confirmation split ({conf.get('set', '?')})")
        d.table(["label", f"{metric_label(metric)} (search sets)", f"{metric_label(metric)} (confirmation)",
                 "change vs FP32 [95 % interval]", "passes confirmation"],
                [[r["label"], fmt_metric(metric, r["search_metric"]), fmt_metric(metric, r["metric"]),
                  fmt_interval(r["ci"]), fmt_pass(r["passed"])] for r in crows],
                {i for i, r in enumerate(crows) if r["kind"] == "selected"})
        ccrit = conf.get("criterion") or {}
        rejected = [r["label"].removeprefix("rejected: ") for r in crows if r["kind"] == "rejected"]
        d.p(f"Measured after the selection on data the search and the selection never read; threshold "
            f"{fmt_metric(metric, num(ccrit.get('threshold')))} from FP32's {fmt_metric(metric, num(ccrit.get('reference')))} "
            f"on it. " + (f"Passed the search sets but failed confirmation, so rejected: {', '.join(rejected)}. "
                          if rejected else "") +
            (f"Confirmed: {conf['confirmed']}." if conf.get("confirmed") else
             f"No option was confirmed within the budget of {conf.get('max_confirmations')}."))

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
                  fmt_metric(metric, metric_of(r, metric)), fmt_ms(num(r.get("objective_ms"))),
                  fmt_x(num(r.get("speedup_vs_fp32"))), paired(r, "paired_vs_fp32"), paired(r, "paired_vs_fastest")]
                 for r in timed],
                {i for i, r in enumerate(timed) if sel and r["label"] == sel.get("source")})
        if sbs.get("rule"):
            d.p(f"How the choice was made: these options were timed interleaved run by run with FP32 "
                f"({fmt_ms(num(sbs.get('fp32_objective_ms')))} ms here), so run i of each was taken together and "
                f"its ratio cancels the machine's drift. Fastest by the median paired ratio: "
                f"{sbs.get('fastest')}. Within noise of it: {', '.join(sbs.get('within_noise') or []) or '—'}. "
                f"Rule: {sbs['rule']}."
                + (f" Not timed side by side (slower by their sequential timings): {', '.join(sbs['not_timed'])}."
                   if sbs.get("not_timed") else ""))
        else:
            d.p(f"One option per plan (the most accurate; options with the same plan differ only in scale values, "
                f"so their engines are equally fast), re-timed interleaved run by run with FP32 "
                f"({fmt_ms(num(sbs.get('fp32_objective_ms')))} ms here): on a noisy machine only ratios measured "
                f"side by side are comparable.")

    case_keys = sorted({k for r in rows for k in r["cases"]}, key=case_sort_key)
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
                          fmt_change(metric, delta), fmt_pass(r["passed"]),
                          fmt_ms(sbs["objective_ms"]) if sbs else "—", fmt_x(sbs["speedup_vs_fp32"]) if sbs else "—"])
        d.table(["label", metric_label(metric), "vs FP32", "passes", "objective (ms, side by side)",
                 "speedup vs FP32"], crows)
        d.p("QAT rows place the fine-tuned weights of the QAT directory with its ranges (calibrator `qat`); "
            "FP32 is the original model. Each search starts from its all-INT8 row. Latency is the side-by-side "
            "timing above (rows with the same plan share it: same graph, same speed); “—”: not timed side by side "
            "(failing options are not).")

    d.h(2, "Selected mix")
    if sel:
        sens = {k: num(v) for k, v in (run.get("sensitivity") or {}).items()}
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
                      fmt_ms(objective_of(t)), fmt_x(speedup(ref_obj, objective_of(t))),
                      fmt_probe_ratio(t.get("paired_vs_base")), "yes" if t.get("cached") else "no"])
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
            + "; an INT8 plan smaller than the FP32 plan by about three quarters of its INT8 layers' weight "
              "bytes is the evidence that those weights are stored as INT8 (float weights, such as embeddings, "
              "keep theirs).")

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
    pngs = plot_all(run)
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
