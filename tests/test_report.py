"""Run report (markdown, self-contained HTML, plots) and the SQLite run index, on synthetic run.json files."""
import copy
import json
import re

import pytest

from core.errors import WorkbenchError
from pipeline.runfile import RUN_FORMAT, load_run, save_run
from report.document import write_report
from report.index import compare_runs, index_run, list_runs, reindex

GRID = [(bs, sl) for bs in (1, 4, 16) for sl in (16, 64, 256)]
METRIC = "cer_rescore"


def latency(factor, objective):
    """FP32 per-case medians times `factor`: encoder 1 + 0.01*bs*sl ms, decoder 0.2 + 0.002*bs*sl ms."""
    cases = []
    for model, base, per in (("encoder", 1.0, 0.01), ("decoder", 0.2, 0.002)):
        for bs, sl in GRID:
            ms = (base + per * bs * sl) * factor
            cases.append({"model": model, "bs": bs, "sl": sl, "median_ms": ms, "p90_ms": ms * 1.08,
                          "throughput": bs * sl / ms * 1000})
    return {"objective_ms": objective, "cases": cases}


def acc(cer):
    return {"cer_rescore": cer, "cer_greedy": cer + 0.002, "wer_rescore": cer * 2.9}


NODES = ([f"encoder:/encoder/encoders.{i}/self_attn/linear_{p}/MatMul" for i in range(4) for p in "qkv"]
         + [f"encoder:/encoder/encoders.{i}/conv_module/depthwise_conv/Conv" for i in range(4)]
         + [f"encoder:/encoder/encoders.{i}/feed_forward/w_1/MatMul" for i in range(4)]
         + [f"decoder:/decoder/decoders.{i}/src_attn/linear_out/MatMul" for i in range(6)]
         + ["encoder:/encoder/embed/conv/conv.0/Conv", "encoder:/encoder/embed/conv/conv.2/Conv",
            "encoder:/encoder/embed/out/out.0/MatMul", "decoder:/decoder/output_layer/MatMul"])
FALLBACK = ["encoder:/encoder/embed/conv/conv.0/Conv", "decoder:/decoder/output_layer/MatMul",
            "encoder:/encoder/encoders.0/self_attn/linear_q/MatMul", "encoder:/encoder/encoders.3/feed_forward/w_1/MatMul"]


def make_run(run_id="20261124-0512-ab12cd", created="2026-11-24T05:12:00Z"):
    hk = {"passed": 18, "total": 18}
    baselines = [
        {"label": "FP32", "precision": "fp32", "calibrator": None, "accuracy": acc(0.0789), "passed": True,
         "hackathon": hk, "latency": latency(1.0, 120.0)},
        {"label": "FP16", "precision": "fp16", "calibrator": None, "accuracy": acc(0.0791), "passed": True,
         "hackathon": hk, "latency": latency(0.6, 72.0)},
        {"label": "INT8 all (max)", "precision": "int8", "calibrator": "max", "accuracy": acc(0.1204),
         "passed": False, "hackathon": {"passed": 9, "total": 18}, "latency": latency(0.35, 42.0)},
        {"label": "INT8 all (entropy)", "precision": "int8", "calibrator": "entropy", "accuracy": acc(0.0957),
         "passed": False, "hackathon": {"passed": 12, "total": 18}, "latency": latency(0.36, 43.2)},
        {"label": "INT8 all (percentile)", "precision": "int8", "calibrator": "percentile", "accuracy": acc(0.0911),
         "passed": False, "hackathon": {"passed": 14, "total": 18}, "latency": latency(0.36, 43.5)},
    ]
    selected = {"label": "selected mix", "plan_hash": "9f3c2a1b", "n_int8": 26, "n_fallback": 4,
                "fallback_nodes": FALLBACK, "accuracy": acc(0.0812), "passed": True,
                "hackathon": {"passed": 17, "total": 18}, "latency": latency(0.4, 48.0)}
    sens = {n: round(0.002 + 0.0015 * ((i * 7) % 30), 5) for i, n in enumerate(NODES)}
    for i, n in enumerate(FALLBACK[:3]):
        sens[n] = 0.09 - 0.02 * i  # the most harmful layers are the ones kept out of INT8
    t = lambda label, stage, h, n8, nfb, cer, passed, obj, cached=False: {  # noqa: E731
        "label": label, "stage": stage, "plan_hash": h, "n_int8": n8, "n_fallback": nfb,
        "accuracy": None if cer is None else {"cer_rescore": cer}, "passed": passed,
        "latency": None if obj is None else {"objective_ms": obj}, "cached": cached}
    trace = [
        t("all-int8", "start", "a0", 30, 0, 0.0911, False, 43.5),
        t("probe: depthwise -> fp32", "latency-probe", "p1", 26, 4, None, None, 44.1),
        t("bisect: top 15 -> fp32", "bisect", "b1", 15, 15, 0.0801, True, 70.2),
        t("bisect: top 8 -> fp32", "bisect", "b2", 22, 8, 0.0806, True, 56.3),
        t("bisect: top 4 -> fp32", "bisect", "9f3c2a1b", 26, 4, 0.0812, True, 48.0),
        t("bisect: top 2 -> fp32", "bisect", "b4", 28, 2, 0.0869, False, 45.9),
        t("refine: drop conv.2", "refine", "r1", 27, 3, 0.0833, False, None),
        t("bisect: top 4 -> fp32", "refine", "9f3c2a1b", 26, 4, 0.0812, True, 48.0, True),
    ]
    return {"format": "wb-run/1", "id": run_id, "created": created, "model": "wenet-small",
            "backend": "onnxruntime", "device": "CPU: 2 cores (synthetic test)", "status": "passed",
            "criterion": {"metric": METRIC, "kind": "absolute", "delta": 0.003, "reference": 0.0789,
                          "threshold": 0.0819, "text": "CER <= FP32 CER + 0.3 points"},
            "baselines": baselines, "selected": selected, "sensitivity": sens, "trace": trace,
            "n_full_evals": 7, "n_cache_hits": 1, "wall_s": 812.3}


def save(run, directory):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "run.json").write_text(json.dumps(run, indent=1))
    return directory


def failing_run(run_id="20261125-0900-ff00aa", created="2026-11-25T09:00:00Z"):
    run = make_run(run_id, created)
    run["status"], run["selected"] = "no_passing_plan", None
    run["baselines"] = [b for b in run["baselines"] if b["precision"] != "fp16"]  # no FP16 baseline
    run["baselines"][-1]["latency"] = None  # a baseline that was never timed
    for c in run["trace"]:
        if c["accuracy"]:
            c["accuracy"]["cer_rescore"] += 0.01
            c["passed"] = False
    return run


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run_dir = save(make_run(), tmp_path_factory.mktemp("runs") / "20261124-0512-ab12cd")
    return run_dir, write_report(run_dir)


def table_row(md, label):
    rows = [ln for ln in md.splitlines() if ln.startswith(f"| {label} |") or ln.startswith(f"| **{label}** |")]
    assert rows, f"no table row for {label!r}"
    return rows


def test_all_files_written_and_html_self_contained(report):
    run_dir, paths = report
    for name in ("report.md", "report.html", "sensitivity.png", "pareto.png", "calibrators.png", "latency.png"):
        assert (run_dir / name).stat().st_size > 1000, name
    assert set(paths) == {"markdown", "html", "sensitivity", "pareto", "calibrators", "latency"}
    assert not list(run_dir.glob(".*.tmp"))  # no leftovers from the atomic writes
    page = (run_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:|//)""", page, re.I)
    assert "http" not in page.lower() and "<link" not in page and "<script" not in page
    assert "<style>" in page and "FAILED" not in page


def test_markdown_tables_and_speedups(report):
    run_dir, _ = report
    md = (run_dir / "report.md").read_text()
    # The main table: FP32 objective 120 ms, selected 48 ms -> 2.50x; CER 8.12 %, 17/18 hackathon cases.
    sel = table_row(md, "selected mix")[0]
    assert "8.12 %" in sel and "17/18" in sel and "48.00" in sel and "2.50×" in sel
    assert "1.67×" in table_row(md, "FP16")[0]  # 120 / 72
    assert "2.86×" in table_row(md, "INT8 all (max)")[0]  # 120 / 42
    fp32 = table_row(md, "FP32")[0]
    assert "7.89 %" in fp32 and "18/18" in fp32 and "1.00×" in fp32
    # Per case: encoder bs=16 sl=256 is 1 + 0.01*16*256 = 41.96 ms in FP32 and 0.4 * 41.96 = 16.78 ms selected.
    enc_sel = table_row(md, "selected mix")[1]
    assert "16.78 (2.50×)" in enc_sel
    assert "| bs=16 sl=256 |" in md
    # Criterion in words, evaluations, what was measured where.
    assert "at most 8.19 %" in md and "0.30 percentage points" in md
    assert "7 full accuracy evaluations" in md
    assert "`onnxruntime` on CPU: 2 cores (synthetic test)" in md
    # The search trace lists every candidate, the cached one included.
    trace_rows = [ln for ln in md.splitlines() if re.match(r"^\| (\*\*)?\d+(\*\*)? \|", ln)]
    assert len(trace_rows) == 8
    assert "latency-probe" in md and trace_rows[-1].rstrip(" |*").endswith("yes")
    for node in FALLBACK:
        assert node in md


def test_pngs_are_valid_images(report):
    import matplotlib.image as mpimg

    _, paths = report
    for name in ("sensitivity", "pareto", "calibrators", "latency"):
        img = mpimg.imread(paths[name])
        assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 400, (name, img.shape)
        assert img[..., :3].std() > 0.05, name  # not a blank canvas


def test_failing_run_has_banner_and_tolerates_missing_pieces(tmp_path):
    run_dir = save(failing_run(), tmp_path / "failed")
    paths = write_report(run_dir)
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    assert "> **FAILED (status: no_passing_plan)" in md
    assert 'class="banner failed">FAILED' in page
    assert "| selected mix |" not in md and "None: no plan passed the criterion." in md
    assert "| FP16 |" not in md
    percentile = table_row(md, "INT8 all (percentile)")[0]
    assert percentile.count("—") >= 2  # no objective, no speedup
    for name in ("sensitivity", "pareto", "calibrators", "latency"):
        assert paths[name].stat().st_size > 1000


def test_index_list_compare_reindex_roundtrip(tmp_path, capsys):
    from workbench.cli import main

    root = tmp_path / "runs"
    a = save(make_run(), root / "a")
    b = save(failing_run(), root / "b")
    assert index_run(a, root)["speedup"] == pytest.approx(2.5)
    row_b = index_run(b, root)
    assert row_b["status"] == "no_passing_plan" and row_b["selected_metric"] is None and row_b["speedup"] is None
    index_run(a, root)  # upsert, not a duplicate
    runs = list_runs(root)
    assert [r["id"] for r in runs] == ["20261125-0900-ff00aa", "20261124-0512-ab12cd"]  # newest first
    assert runs[1]["fp32_objective_ms"] == 120.0 and runs[1]["selected_objective_ms"] == 48.0
    assert runs[1]["n_full_evals"] == 7 and runs[1]["path"] == str(a.resolve())

    c = compare_runs(root, "20261124", "20261125")  # unique prefixes work
    fields = {s["field"]: (s["a"], s["b"]) for s in c["summary"]}
    assert fields["status"] == ("passed", "no_passing_plan")
    rows = {r["label"]: r for r in c["rows"]}
    assert rows["FP16"]["b"] is None and rows["selected mix"]["b"] is None
    assert rows["selected mix"]["a"]["speedup"] == pytest.approx(2.5)
    assert c["rows"][-1]["label"] == "selected mix"
    with pytest.raises(WorkbenchError, match="ambiguous"):
        compare_runs(root, "2026112", "20261125")

    (root / "index.sqlite").unlink()
    assert sorted(reindex(root)["indexed"]) == sorted(r["id"] for r in runs)
    assert [r["id"] for r in list_runs(root)] == [r["id"] for r in runs]

    assert main(["runs", "list", "--root", str(root)]) == 0
    assert main(["runs", "compare", "20261124-0512-ab12cd", "20261125-0900-ff00aa", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "20261124-0512-ab12cd" in out and "2.50×" in out and "no_passing_plan" in out
    assert main(["runs", "report", str(b), "--root", str(root)]) == 0
    assert (b / "report.html").is_file()


def test_corrupt_or_missing_run_json_is_a_clear_error(tmp_path, capsys):
    from workbench.cli import main

    root = tmp_path / "runs"
    bad = root / "bad"
    bad.mkdir(parents=True)
    (bad / "run.json").write_text('{"format": "wb-run/1", "id": "x", "baseli')  # cut short
    for call in (lambda: write_report(bad), lambda: index_run(bad, root)):
        with pytest.raises(WorkbenchError, match=re.escape(str(bad / "run.json"))):
            call()
    with pytest.raises(WorkbenchError, match=r"missing run file .*nowhere"):
        write_report(tmp_path / "nowhere")
    wrong = copy.deepcopy(make_run("20261126-0000-000000"))
    del wrong["criterion"]
    save(wrong, root / "wrong")
    with pytest.raises(WorkbenchError, match="criterion.metric"):
        write_report(root / "wrong")
    save(make_run(), root / "good")
    with pytest.raises(WorkbenchError) as err:  # good runs are indexed, the bad ones named
        reindex(root)
    assert str(bad / "run.json") in str(err.value) and str(root / "wrong" / "run.json") in str(err.value)
    assert [r["id"] for r in list_runs(root)] == ["20261124-0512-ab12cd"]
    assert main(["runs", "report", str(bad), "--root", str(root)]) == 2
    assert "corrupt run file" in capsys.readouterr().err



def test_runfile_save_load_roundtrip_and_validation(tmp_path):
    """pipeline.runfile: save_run validates and writes run.json, load_run reads back the same run; a wrong format
    or a missing required key is a WorkbenchError naming the file, on both sides."""
    run = make_run()
    path = save_run(tmp_path / "r", run)
    assert path == tmp_path / "r" / "run.json" and not list(path.parent.glob(".*.tmp"))
    assert load_run(tmp_path / "r") == run == load_run(path)
    for name, change in (("format", lambda r: r.update(format="wb-run/0")), ("no-id", lambda r: r.pop("id")),
                         ("no-criterion", lambda r: r.pop("criterion"))):
        bad = copy.deepcopy(run)
        change(bad)
        save(bad, tmp_path / name)
        with pytest.raises(WorkbenchError, match=re.escape(str(tmp_path / name / "run.json"))):
            load_run(tmp_path / name)
        with pytest.raises(WorkbenchError, match="not writing invalid run file"):
            save_run(tmp_path / f"{name}-new", bad)
        assert not (tmp_path / f"{name}-new" / "run.json").exists()
    with pytest.raises(WorkbenchError, match=f"format is 'wb-run/0', expected '{RUN_FORMAT}'"):
        load_run(tmp_path / "format")
    with pytest.raises(WorkbenchError, match="'id' is missing"):
        load_run(tmp_path / "no-id")


def test_selected_fallbacks_less_the_least_sensitive():
    """pipeline.runfile.selected_fallbacks (what `wb qat --mix-of` trains for): the selected mix's fallbacks of one
    graph, most sensitive first, with the `release` least sensitive moved to the second list; a run without a
    passing mix, or without the sensitivity to rank them, is refused."""
    from pipeline.runfile import selected_fallbacks

    run = {"id": "r", "status": "passed", "sensitivity": {"g:a": 0.1, "g:b": 0.3, "g:c": 0.2, "h:a": 9.0},
           "selected": {"passed": True, "fallback_nodes": ["g:a", "g:b", "h:a", "g:c"]}}
    assert selected_fallbacks(run, "g") == (["b", "c", "a"], [])
    assert selected_fallbacks(run, "g", release=1) == (["b", "c"], ["a"])
    assert selected_fallbacks(run, "g", release=5) == ([], ["b", "c", "a"])
    assert selected_fallbacks(run, "h", release=1) == ([], ["a"])
    assert selected_fallbacks(run, "x", release=1) == ([], [])
    with pytest.raises(WorkbenchError, match="release must be >= 0"):
        selected_fallbacks(run, "g", release=-1)
    unranked = copy.deepcopy(run)
    del unranked["sensitivity"]["g:c"]
    assert selected_fallbacks(unranked, "g")[0] == ["c", "b", "a"]  # unranked first: nothing released, no harm
    with pytest.raises(WorkbenchError, match="no sensitivity for c"):
        selected_fallbacks(unranked, "g", release=1)
    for failed in ({**run, "status": "failed", "selected": None},
                   {**run, "status": "failed", "selected": {"passed": False, "fallback_nodes": []}}):
        with pytest.raises(WorkbenchError, match="no selected mix that passed"):
            selected_fallbacks(failed, "g")


def test_qat_comparison_and_side_by_side(tmp_path):
    """A run with a QAT calibrator and two searches: the PTQ-vs-QAT table and the side-by-side timing, whose
    FP32 timing (not the sequential baseline's) gives the selected mix its speedup."""
    run = make_run("20261126-1000-qat001")
    qat = {"label": "INT8 all (qat)", "precision": "int8", "calibrator": "qat", "accuracy": acc(0.0790),
           "passed": True, "hackathon": {"passed": 0, "total": 18}, "latency": latency(0.4, 48.0)}
    run["baselines"].append(qat)
    best = lambda label, cal, cer, obj: {"label": label, "calibrator": cal, "accuracy": acc(cer),  # noqa: E731
                                         "passed": True, "latency": latency(obj / 120, obj)}
    run["searches"] = [{"label": "search from percentile", "calibrator": "percentile", "status": "passed",
                        "best": best("search from percentile", "percentile", 0.0812, 50.0)},
                       {"label": "search from qat", "calibrator": "qat", "status": "passed",
                        "best": best("search from qat", "qat", 0.0791, 47.0)}]
    run["selected"].update(source="INT8 all (qat)", latency=latency(0.4, 60.0),
                           reference_latency=latency(1.0, 150.0), accuracy=acc(0.0790))
    run["side_by_side"] = {"fp32_objective_ms": 150.0, "rows": [
        {"label": "INT8 all (qat)", "same_plan": ["INT8 all (max)"], "objective_ms": 60.0, "speedup_vs_fp32": 2.5,
         "accuracy": acc(0.0790)},
        {"label": "FP32", "same_plan": [], "objective_ms": 150.0, "speedup_vs_fp32": 1.0, "accuracy": acc(0.0789)}]}
    run_dir = save(run, tmp_path / run["id"])
    write_report(run_dir)
    md = (run_dir / "report.md").read_text()
    assert "2.50×" in table_row(md, "selected mix")[0]  # 150 / 60: side by side, not 120 / 60
    assert index_run(run_dir, tmp_path / "idx")["speedup"] == pytest.approx(2.5)  # the run index agrees
    assert "search from qat" in md and "47.00" in table_row(md, "search from qat")[0]
    section = md.split("### PTQ vs QAT")[1].split("##")[0]
    assert "| best PTQ all-INT8 (percentile) | 9.11 % | +1.22 pt | NO | — | — |" in section  # failing: not timed
    assert "| QAT all-INT8 | 7.90 % | +0.01 pt | yes | 60.00 | 2.50× |" in section
    assert "| PTQ selected mix (search from it) | 8.12 % | +0.23 pt | yes |" in section
    assert "| QAT + search | 7.91 % |" in section
    sbs = md.split("### Side-by-side timing")[1].split("###")[0]
    assert "| **INT8 all (qat)** | **INT8 all (max)** |" in sbs


def test_qat_comparison_follows_the_metric_direction_and_the_run_recipe():
    """A higher-is-better metric: the best PTQ row is the highest one, and the second recipe's rows (which may be
    the lowest, or share a calibrator name) take no part: its search from qat is not the QAT + search row."""
    from report.model import qat_comparison

    def b(label, cal, m, recipe=None):
        return {"label": label, "precision": "int8", "calibrator": cal, "accuracy": {"margin": m},
                **({"recipe": recipe} if recipe else {})}

    run = {"criterion": {"metric": "margin", "threshold": 0.0, "higher_is_better": True},
           "baselines": [{"label": "FP32", "precision": "fp32", "calibrator": None, "accuracy": {"margin": 0.01}},
                         b("INT8 all (max)", "max", -0.010), b("INT8 all (mse)", "mse", -0.025),
                         b("INT8 all (qat)", "qat", -0.007),
                         b("INT8 all (max, tensorrt recipe)", "max", -0.18, "tensorrt"),
                         b("INT8 all (qat, tensorrt recipe)", "qat", -0.17, "tensorrt")],
           "searches": [{"label": s, "best": {**b(s, cal, m, recipe), "precision": None}}
                        for s, cal, m, recipe in (("search from max", "max", 0.002, None),
                                                  ("search from qat", "qat", 0.003, None),
                                                  ("search from qat (tensorrt recipe)", "qat", 0.004, "tensorrt"))]}
    rows = {r["label"]: r for r in qat_comparison(run)}
    assert rows["best PTQ all-INT8 (max)"]["source_label"] == "INT8 all (max)"
    assert rows["PTQ selected mix (search from it)"]["source_label"] == "search from max"
    assert rows["QAT all-INT8"]["source_label"] == "INT8 all (qat)"
    assert rows["QAT + search"]["source_label"] == "search from qat"


def test_runs_record_their_cpu_and_compare_warns_across_isas(tmp_path, capsys):
    """run.json's host record reaches the index and the report; `wb runs compare` warns when two runs were
    measured on different int8 ISAs (and when one of them did not record its CPU)."""
    from core.host import parse_cpuinfo
    from workbench.cli import main

    def host(flags):
        return {"cpu": parse_cpuinfo(f"model name\t: Test CPU\nflags\t\t: {flags}\n", "x86_64"),
                "versions": {"onnxruntime": "1.32.0"}}

    root = tmp_path / "runs"
    runs = {"avx2": make_run("20261201-0001-aaaaaa"), "vnni": make_run("20261201-0002-bbbbbb"),
            "avx2b": make_run("20261201-0003-cccccc"), "none": make_run("20261201-0004-dddddd")}
    runs["avx2"]["host"] = runs["avx2b"]["host"] = host("avx avx2")
    runs["vnni"]["host"] = host("avx2 avx512f avx512_vnni")
    for name, run in runs.items():
        index_run(save(run, root / name), root)
    rows = {r["id"]: r for r in list_runs(root)}
    assert rows["20261201-0001-aaaaaa"]["isa"] == "avx2" and rows["20261201-0002-bbbbbb"]["isa"] == "avx512-vnni"
    assert rows["20261201-0004-dddddd"]["isa"] is None
    assert compare_runs(root, "20261201-0001", "20261201-0003")["warnings"] == []
    w = compare_runs(root, "20261201-0001", "20261201-0002")["warnings"]
    assert len(w) == 1 and "avx2" in w[0] and "avx512-vnni" in w[0]
    assert compare_runs(root, "20261201-0001", "20261201-0004")["warnings"]
    assert main(["runs", "compare", "20261201-0001", "20261201-0002", "--root", str(root)]) == 0
    assert "warning: the runs were measured on different CPUs' int8 instruction sets" in capsys.readouterr().err
    md = write_report(root / "vnni")["markdown"].read_text()
    assert "avx512_vnni" in md and "onnxruntime 1.32.0" in md


def test_old_index_gains_new_columns(tmp_path):
    """An index written before the cpu/isa columns existed is migrated, not refused."""
    import sqlite3

    root = tmp_path / "runs"
    root.mkdir()
    con = sqlite3.connect(root / "index.sqlite")
    con.execute("CREATE TABLE runs (id TEXT PRIMARY KEY, created TEXT, model TEXT, backend TEXT, status TEXT, "
                "metric TEXT, fp32_metric REAL, selected_metric REAL, selected_objective_ms REAL, "
                "fp32_objective_ms REAL, speedup REAL, n_full_evals INTEGER, path TEXT, indexed_at TEXT)")
    con.commit()
    con.close()
    index_run(save(make_run(), root / "a"), root)
    assert list_runs(root)[0]["isa"] is None


def test_report_lists_rtx_plan_sizes(tmp_path):
    """`wb rtx-check` leaves rtx_builds.json in the run directory: the report lists each variant's plan size."""
    run_dir = save(make_run(), tmp_path / "rtx")
    rows = [{"variant": "FP32", "kind": "encoder", "onnx_bytes": 40e6, "plan_bytes": 47.1e6, "build_s": 27.0,
             "vs_fp32": 1.0, "validator_problems": None},
            {"variant": "INT8 all (max)", "kind": "encoder", "onnx_bytes": 11e6, "plan_bytes": 22.3e6, "build_s": 21.0,
             "vs_fp32": 0.473, "validator_problems": 0},
            {"variant": "FP16", "kind": "decoder", "onnx_bytes": 5e6, "validator_problems": 0, "error": "refused"}]
    (run_dir / "rtx_builds.json").write_text(json.dumps({"compute_capability": 89, "tensorrt_rtx": "1.7.1.116",
                                                         "rows": rows, "failures": ["FP16 decoder: refused"]}))
    md = write_report(run_dir)["markdown"].read_text()
    assert "## TensorRT-RTX plans (SM89, built on CPU, not run)" in md
    assert table_row(md, "INT8 all (max)")[-1].split(" | ")[3:6] == ["22.3", "0.47", "21"]
    assert "FAILED" in table_row(md, "FP16")[-1] and "except 1 it refused" in md


def test_baseline_intervals_shown_when_recorded(tmp_path):
    """A baseline's paired bootstrap interval (run.json "ci") gets its own column, in CER points; a latency
    probe's paired ratio shows in the search trace."""
    run = make_run("20261201-1400-ci0001")
    run["baselines"][-1]["ci"] = {"metric": "cer_rescore", "delta": 0.0005, "low": -0.001, "high": 0.0022,
                                  "level": 0.95, "n_items": 500, "n_boot": 2000, "seed": 0}
    probe = next(t for t in run["trace"] if t["stage"] == "latency-probe")
    probe["paired_vs_base"] = {"median": 0.95, "q25": 0.94, "q75": 0.96, "se": 0.01, "runs": 10}
    d = save(run, tmp_path / "r")
    write_report(d)
    md = (d / "report.md").read_text()
    assert "| 0.950 ± 0.010 |" in md  # the probe's paired ratio in the search trace
    assert "change vs FP32 [95 % interval]" in md and "paired bootstrap 95 % interval" in md
    assert "+0.05 [-0.10, +0.22] pt" in table_row(md, run["baselines"][-1]["label"])[0]
    assert "| — |" in table_row(md, "FP32")[0]


def test_evaluation_sets_and_confirmation_rows(tmp_path):
    """Issue 18: one row per (baseline or selected mix, evaluation set) with the change against FP32 on the set
    and its interval, and the confirmation split's table with a rejected and a confirmed attempt."""
    run = make_run("20261202-1000-sets01")
    run["task"] = {"eval_sets": ["test-a", "test-b"], "confirm_set": "confirm"}
    run["criterion"].update({"sets": "each", "mode": "point", "set_rules": {
        "test-a": {"reference": 0.07, "threshold": 0.073}, "test-b": {"reference": 0.088, "threshold": 0.091}}})
    ci = lambda d: {"metric": METRIC, "delta": d, "low": d - 0.001, "high": d + 0.0015}  # noqa: E731
    for b in run["baselines"]:
        shift = b["accuracy"]["cer_rescore"] - 0.0789
        b["accuracy"]["sets"] = {"test-a": {METRIC: 0.07 + shift}, "test-b": {METRIC: 0.088 + shift}}
        if b["precision"] != "fp32":
            b["accuracy"]["intervals"] = {"test-a": ci(shift), "test-b": ci(shift)}
            b["verdicts"] = {"test-a": shift <= 0.003, "test-b": shift <= 0.003}
        b["confirmation"] = {"set": "confirm", "accuracy": {METRIC: 0.08 + shift}, "passed": shift <= 0.003,
                             **({"ci": ci(shift)} if b["precision"] != "fp32" else {})}
    sel = run["selected"]
    sel["accuracy"]["sets"] = {"test-a": {METRIC: 0.072}, "test-b": {METRIC: 0.0905}}
    sel["accuracy"]["intervals"] = {"test-a": ci(0.002), "test-b": ci(0.0025)}
    sel["verdicts"] = {"test-a": True, "test-b": True}
    sel["source"] = "search from max"
    run["confirmation"] = {"set": "confirm", "criterion": {"threshold": 0.083, "reference": 0.08},
                           "max_confirmations": 3, "confirmed": "search from max", "attempts": [
                               {"label": "INT8 all (percentile)", "accuracy": {METRIC: 0.0811},
                                "confirmation": {"accuracy": {METRIC: 0.0862}, "ci": ci(0.0062), "passed": False}},
                               {"label": "search from max", "accuracy": {METRIC: 0.0812},
                                "confirmation": {"accuracy": {METRIC: 0.0821}, "ci": ci(0.0021), "passed": True}}]}
    d = save(run, tmp_path / "r")
    write_report(d)
    md = (d / "report.md").read_text()
    assert "### Evaluation sets" in md and "### Confirmation split (confirm)" in md
    rows = [r.replace("**", "") for r in table_row(md, "selected mix")]  # highlighted rows are bold
    a = next(r for r in rows if "| test-a |" in r)
    assert "7.20 %" in a and "+0.20 [+0.10, +0.35] pt" in a and a.rstrip().endswith("| yes |")
    assert any("| test-b |" in r and "9.05 %" in r for r in rows)
    fp32_a = next(r for r in table_row(md, "FP32") if "| test-a |" in r)
    assert "+0.00 pt" in fp32_a
    assert any("| test-b |" in r and "| NO |" in r for r in table_row(md, "INT8 all (max)"))
    rej = table_row(md, "rejected: INT8 all (percentile)")[0]
    assert "8.62 %" in rej and "+0.62 [+0.52, +0.77] pt" in rej and "| NO |" in rej
    assert "8.21 %" in table_row(md, "selected: search from max")[0].replace("**", "")
    assert "failed confirmation, so rejected: INT8 all (percentile)" in md and "Confirmed: search from max." in md
    run["status"], run["confirmation"]["confirmed"] = "not_confirmed", None
    write_report(save(run, tmp_path / "r2"))
    assert "failed the confirmation split" in (tmp_path / "r2" / "report.md").read_text()
