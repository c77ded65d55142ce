"""Issue 16 (reliability): results survive kills and copies, bad inputs fail early with one line."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.fsutil import RunDirLock
from search.evalcache import EvalCache


# -- 1. the evaluation cache survives a torn last line ---------------------------------------------------------

def test_evalcache_append_after_torn_line_keeps_every_record(tmp_path):
    path = tmp_path / "cache.jsonl"
    path.write_text(json.dumps({"key": "a", "value": 1}) + "\n" + '{"key": "b", "val')  # killed mid-write
    cache = EvalCache(path)
    assert dict(cache.entries) == {"a": 1}
    assert cache.get_or_compute("b", lambda: 2) == 2
    assert cache.get_or_compute("c", lambda: 3) == 3
    assert cache.computed == 2 and cache.hits == 0
    again = EvalCache(path)
    assert again.entries == {"a": 1, "b": 2, "c": 3}
    assert again.get_or_compute("a", lambda: pytest.fail("recomputed")) == 1
    assert again.hits == 1 and again.computed == 0


def test_evalcache_torn_multibyte_and_junk_lines_are_skipped(tmp_path):
    path = tmp_path / "cache.jsonl"
    rec = json.dumps({"key": "a", "value": "é"}, ensure_ascii=False).encode()
    path.write_bytes(rec + b"\n[1, 2]\n" + rec[:-3])  # a JSON line that is not a record, a cut character
    cache = EvalCache(path)
    assert cache.entries == {"a": "é"}
    cache.get_or_compute("b", lambda: 2)
    assert EvalCache(path).entries == {"a": "é", "b": 2}


# -- 2. one run per run directory -------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    """A child process that takes the run-directory lock as `wb search` does and keeps it until killed."""
    code = ("import sys, time; from core.fsutil import RunDirLock; l = RunDirLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True,
                             env=_env(), cwd=REPO)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_second_search_on_a_locked_run_dir_fails_at_once_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    holder = _hold_lock(run_dir)
    try:
        t0 = time.time()
        res = subprocess.run([sys.executable, "-m", "workbench.cli", "search", "--quick", "--run-dir", str(run_dir),
                              "--runs-root", str(tmp_path / "runs")], capture_output=True, text=True, env=_env(),
                             cwd=REPO, timeout=120)
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and f"pid {holder.pid}" in lines[0], res.stderr
        assert "in use" in lines[0] and time.time() - t0 < 60
        assert not (run_dir / "cache.jsonl").exists()  # nothing was computed
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel drops a killed holder's lock: the directory is usable again, by this process, re-entrantly
    with RunDirLock(run_dir), RunDirLock(run_dir):
        assert (run_dir / ".lock").read_text().strip() == str(os.getpid())


def test_run_dir_lock_is_released_for_the_next_process(tmp_path):
    with RunDirLock(tmp_path / "run"):
        pass
    holder = _hold_lock(tmp_path / "run")  # would block forever / fail if the lock were still held here
    holder.kill()
    holder.wait()


# -- 3. every config key: type and range checked before any work -----------------------------------------------

@pytest.mark.parametrize("text,match", [
    ('[criterion]\ndelta = "big"\n', "criterion.delta must be a number, got a string 'big'"),
    ('[criterion]\ndelta = true\n', "criterion.delta must be a number, got a boolean"),
    ('[criterion]\ndelta = nan\n', "criterion.delta must be a number"),
    ('[criterion]\ndelta = -0.01\n', "criterion.delta must be >= 0"),
    ('[backend]\nthreads = "two"\n', "backend.threads must be an integer, got a string 'two'"),
    ('[backend]\nthreads = 0\n', "backend.threads must be >= 1"),
    ('[backend]\nthreads = 2.0\n', "backend.threads must be an integer, got a number 2.0"),
    ('[backend]\nname = ["onnxruntime"]\n', "backend.name must be a string"),
    ('[data]\neval_utts = "many"\n', "data.eval_utts must be an integer"),
    ('[data]\neval_utts = 2.5\n', "data.eval_utts must be an integer, got a number 2.5"),
    ('[data]\ncalib_utts = 0\n', "data.calib_utts must be >= 1"),
    ('[data]\nranking_utts = true\n', "data.ranking_utts must be an integer, got a boolean"),
    ('[data]\neval_split = 3\n', "data.eval_split must be a string"),
    ('[model]\nopset = 11\n', "model.opset must be >= 13"),
    ('[calibration]\npercentile = 100\n', "calibration.percentile must be > 0 and < 100"),
    ('[calibration]\npercentile = 0\n', "calibration.percentile must be > 0 and < 100"),
    ('[calibration]\nbatch_size = 0\n', "calibration.batch_size must be >= 1"),
    ('[calibration]\nmethods = "max"\n', r"calibration.methods must be a list, got a string 'max' \(e.g. \['max'\]\)"),
    ('[calibration]\nmethods = []\n', "calibration.methods must not be empty"),
    ('[calibration]\nmethods = ["max", 3]\n', r"calibration.methods\[1\] must be a string"),
    ('[latency]\niters = 0\n', "latency.iters must be >= 1"),
    ('[latency]\nsearch_iters = 0\n', "latency.search_iters must be >= 1"),
    ('[latency]\nwarmup = -1\n', "latency.warmup must be >= 0"),
    ('[latency]\ntie_tolerance = -0.1\n', "latency.tie_tolerance must be >= 0"),
    ('[latency]\nbatch_sizes = [1, 0]\n', "latency.batch_sizes must be >= 1"),
    ('[latency]\nseq_lens = [16, "x"]\n', r"latency.seq_lens\[1\] must be an integer"),
    ('[latency]\nmodels = "encoder"\n', "latency.models must be a list"),
    ('[budget]\nmax_full_evals = 1\n', "max_full_evals must be at least 2"),
    ('[budget]\nmax_full_evals = "ten"\n', "budget.max_full_evals must be an integer"),
    ('[quantize]\nfallback = 16\n', "quantize.fallback must be a string"),
    ('[qat]\ndir = false\n', "qat.dir must be a string"),
    ('[task]\noptions = 3\n', "task.options must be a table"),
    ('[task]\ngraphs = [1]\n', r"task.graphs\[0\] must be a table"),
    ('[task]\ngraphs = "a.onnx"\n', "task.graphs must be a list"),
    ('data = 3\n', "config data must be a table, got an integer 3"),
])
def test_bad_config_values_fail_before_any_work(tmp_path, capsys, text, match):
    import re

    from workbench.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    runs = tmp_path / "runs"
    assert main(["search", "--config", str(bad), "--runs-root", str(runs)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: config "), err
    assert re.search(match, err[0]), err[0]
    assert not runs.exists()  # no run directory was created


def test_shipped_configs_pass_the_checks():
    from pipeline.config import CONFIG_DIR, load_config

    assert load_config()["backend"]["threads"] == 2
    assert load_config(CONFIG_DIR / "quick.toml")["data"]["eval_utts"] == 100


def test_task_options_free_form_and_ints_for_floats(tmp_path):
    from pipeline.config import load_config

    p = tmp_path / "ok.toml"
    p.write_text('[task]\noptions = { root = "x", n = [1, "a"], deep = { a = 1 } }\n'
                 '[criterion]\ndelta = 0\n[calibration]\npercentile = 99\n[latency]\ntie_tolerance = 0\n')
    cfg = load_config(p)
    assert cfg["task"]["options"]["deep"] == {"a": 1} and cfg["criterion"]["delta"] == 0


# -- 4. calibration tables and plans: damaged values are one-line errors, by both readers -----------------------

def _table(tensors=None, weights=None):
    return {"format": "wb-calibration-table/1", "default_method": "max",
            "tensors": tensors if tensors is not None else {"x": {"amax": {"max": 1.5}, "min": -1.0, "max": 1.5}},
            "weights": weights if weights is not None else {"W": {"axis": 1, "amax": [0.5, 0.0, 0.25]}}}


@pytest.mark.parametrize("data,match", [
    (_table({"x": {"amax": {"max": 1e-30}}}), r"amax of tensor 'x' \((max|node 'node')\) is 1e-30; it must be a "
                                              r"finite number > 1e-12.*recalibrate with `wb calibrate`"),
    (_table({"x": {"amax": {"max": "abc"}}}), r"amax of tensor 'x' \(max\) is 'abc', not a number"),
    (_table({"x": {"amax": {"max": float("nan")}}}), "amax of tensor 'x' .* is nan"),
    (_table({"x": {"amax": {"max": -2.0}}}), r"amax of tensor 'x' \((max|node 'node')\) is -2.0"),
    (_table({"x": {"amax": {"max": 1.0}, "max": "big"}}), "max of tensor 'x' is 'big', not a number"),
    (_table({"x": 3}), "tensor 'x' must be an object"),
    (_table([]), '"tensors" must be an object'),
    (_table(weights={"W": {"axis": 1, "amax": [0.5, -0.1]}}), "weight 'W' channel 1 amax is -0.1; it must be a "
                                                              "finite number >= 0"),
    (_table(weights={"W": {"axis": 1, "amax": [float("inf")]}}), "weight 'W' channel 0 amax is inf"),
    (_table(weights={"W": {"axis": "0", "amax": [1.0]}}), "weight 'W' has axis '0', not an integer"),
    (_table(weights={"W": {"axis": 0, "amax": "1.0"}}), "weight 'W' has amax '1.0', not a non-empty list"),
    ({"x": "abc"}, "amax of tensor 'x' is 'abc', not a number"),
])
def test_damaged_tables_are_refused_by_both_readers(tmp_path, data, match):
    from core.errors import WorkbenchError
    from graph.calib import load_table
    from quant.table import CalibrationTable

    p = tmp_path / "t.json"
    p.write_text(json.dumps(data))
    with pytest.raises(WorkbenchError, match=match):  # at load (types, weights) or where the tensor is used
        load_table(p).scale("x", "node")
    if "format" in data:
        with pytest.raises(WorkbenchError, match=match):
            CalibrationTable.load(p).amax("x")


def test_plain_dict_amax_is_checked_where_it_is_used():
    from core.errors import WorkbenchError
    from graph.calib import load_table

    t = load_table({"x": 1e-30, "mask": float("inf"), "y": 2.0})  # unused entries may be anything numeric
    assert t.scale("y", "n") == pytest.approx(2.0 / 127)
    for name, shown in (("x", "1e-30"), ("mask", "inf")):
        with pytest.raises(WorkbenchError, match=rf"amax of tensor '{name}' \(node 'conv'\) is {shown}; it must be a "
                                                 r"finite number > 1e-12 .*; recalibrate"):
            t.scale(name, "conv")


def test_good_table_loads_in_both_readers(tmp_path):
    from graph.calib import load_table
    from quant.table import CalibrationTable

    p = tmp_path / "t.json"
    p.write_text(json.dumps(_table()))
    t = load_table(p)
    assert t.amax == {"x": 1.5} and t.weights == {"W": (1, [0.5, 0.0, 0.25])}
    assert CalibrationTable.load(p).amax("x") == 1.5


@pytest.mark.parametrize("content,match", [
    (bytes(range(256)) * 4, "not a JSON file \\(not UTF-8 text\\)"),
    (b"amax: 3\n", "is not valid JSON"),
])
def test_random_bytes_table_is_one_line(tmp_path, content, match):
    from core.errors import WorkbenchError
    from graph.calib import load_table
    from quant.table import CalibrationTable

    p = tmp_path / "t.json"
    p.write_bytes(content)
    for reader in (load_table, CalibrationTable.load):
        with pytest.raises(WorkbenchError, match=match):
            reader(p)


@pytest.mark.parametrize("nodes,match", [
    ([], r"'nodes' must be an object \{node id: precision\}, got \[\]"),
    (["a", "int8"], "'nodes' must be an object"),
    ({"a": ["int8"]}, "precision \\['int8'\\] is not one of"),
    ({"a": 8}, "precision 8 is not one of"),
])
def test_bad_plan_nodes_are_one_line(tmp_path, nodes, match):
    from core.errors import WorkbenchError
    from graph.plan import PLAN_FORMAT, load_plan

    p = tmp_path / "p.json"
    p.write_text(json.dumps({"format": PLAN_FORMAT, "model": {"sha256": "x"}, "default": "int8", "nodes": nodes}))
    with pytest.raises(WorkbenchError, match=match):
        load_plan(p)


def _matmul_model(path: Path) -> Path:
    """x[2,16] @ W[16,8] -> y: the smallest model with a quantizable node."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm/MatMul")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_quantize_bad_inputs_are_one_line_and_write_nothing(tmp_path, capsys):
    from graph.plan import PLAN_FORMAT
    from workbench.cli import main as _main

    def main(argv):
        return _main([str(a) for a in argv])

    model = _matmul_model(tmp_path / "m.onnx")
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"x": 2.0, "y": 3.0}))
    out = tmp_path / "q.onnx"
    assert main(["quantize", "--model", model, "--table", good, "--out", out]) == 0
    out.unlink()
    capsys.readouterr()

    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps({"x": 1e-30, "y": 3.0}))
    assert main(["quantize", "--model", model, "--table", tiny, "--out", out, "--write-plan", tmp_path / "p"]) == 2
    assert "amax of tensor 'x' (node 'mm/MatMul') is 1e-30" in _one_error_line(capsys) and not out.exists()

    junk = tmp_path / "junk.json"
    junk.write_bytes(bytes(range(256)))
    assert main(["quantize", "--model", model, "--table", junk, "--out", out]) == 2
    assert "not UTF-8" in _one_error_line(capsys) and not out.exists()

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": PLAN_FORMAT, "model": {"sha256": "x"}, "default": "int8", "nodes": []}))
    assert main(["quantize", "--model", model, "--table", good, "--plan", plan, "--out", out]) == 2
    assert "'nodes' must be an object" in _one_error_line(capsys) and not out.exists()

    (tmp_path / "adir").mkdir()
    assert main(["quantize", "--model", model, "--table", good, "--out", tmp_path / "adir"]) == 2
    assert "is a directory" in _one_error_line(capsys)

    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    for argv in (["quantize", "--model", empty, "--table", good, "--out", out],
                 ["calibrate", "--model", empty, "--data", tmp_path, "--out", tmp_path / "t.json"]):
        assert main(argv) == 2
        assert "is empty" in _one_error_line(capsys) and not out.exists()


# -- 5. baseline cache keys: content and config, not paths -------------------------------------------------------

def test_baseline_key_follows_content_and_config_not_paths(tmp_path):
    import copy
    import shutil

    from pipeline.config import load_config
    from pipeline.baselines import baseline_key

    cfg = load_config()
    run = tmp_path / "R" / "models" / "fp32"
    run.mkdir(parents=True)
    for k in ("encoder", "decoder"):
        (run / f"{k}.onnx").write_bytes(f"{k} weights".encode())
    shutil.copytree(tmp_path / "R", tmp_path / "R2")  # cp -a R R2
    fp32 = {k: tmp_path / "R" / "models" / "fp32" / f"{k}.onnx" for k in ("encoder", "decoder")}
    fp32_copy = {k: tmp_path / "R2" / "models" / "fp32" / f"{k}.onnx" for k in ("encoder", "decoder")}
    data = {"vocab": ["a", "b"], "eval_texts": "t"}
    key = baseline_key(cfg, fp32, fp32, data)
    assert baseline_key(cfg, fp32_copy, fp32_copy, data) == key  # the copy reuses FP32

    changed = copy.deepcopy(cfg)
    changed["latency"]["tie_tolerance"] = 0.5  # ranks search candidates only
    changed["latency"]["iters"] = 3  # the selection's protocol: baselines are timed with the search's
    changed["calibration"]["methods"] = ["max"]  # not part of an FP32 record
    assert baseline_key(changed, fp32, fp32, data) == key
    for section, name, value in (("data", "eval_utts", 7), ("backend", "threads", 1), ("latency", "search_iters", 3),
                                 ("quantize", "fallback", "fp16"), ("latency", "batch_sizes", [1])):
        changed = copy.deepcopy(cfg)
        changed[section][name] = value
        assert baseline_key(changed, fp32, fp32, data) != key, (section, name)
    assert baseline_key(cfg, fp32, fp32, {**data, "vocab": ["a"]}) != key
    assert baseline_key(cfg, fp32, fp32, data, calibrator="max") != key
    fp32_copy["encoder"].write_bytes(b"retrained")  # other content under the same path: another key
    assert baseline_key(cfg, fp32_copy, fp32_copy, data) != key


# -- 6. Ctrl-C: one line with how to resume, exit 130 --------------------------------------------------------------

def test_interrupted_search_says_how_to_resume(tmp_path, capsys, monkeypatch):
    import tasks
    from workbench.cli import main

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tasks, "load_task", interrupted)  # the bundled task is made inside the run's lock
    run_dir = tmp_path / "run"
    assert main(["search", "--quick", "--run-dir", str(run_dir), "--runs-root", str(tmp_path / "runs")]) == 130
    assert capsys.readouterr().err.strip().splitlines() == [f"interrupted; resume with wb search --run-dir {run_dir}"]
    with RunDirLock(run_dir):  # released on the way out
        pass


def test_interrupt_elsewhere_and_disk_full_are_one_line(tmp_path, capsys, monkeypatch):
    import errno

    import workbench.commands.quantize as q
    from workbench.cli import main

    model = _matmul_model(tmp_path / "m.onnx")
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"x": 2.0, "y": 3.0}))
    argv = ["quantize", "--model", str(model), "--table", str(table), "--out", str(tmp_path / "q.onnx")]

    def raiser(exc):
        def f(*a, **k):
            raise exc
        return f

    import graph.placement
    monkeypatch.setattr(graph.placement, "quantize", raiser(KeyboardInterrupt()))
    assert main(argv) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["interrupted"]
    monkeypatch.setattr(graph.placement, "quantize", raiser(OSError(errno.ENOSPC, "No space left on device", "q.onnx")))
    assert main(argv) == 2
    assert _one_error_line(capsys) == "error: No space left on device: q.onnx"
    monkeypatch.setattr(graph.placement, "quantize", raiser(OSError(errno.EBADF, "Bad file descriptor")))
    with pytest.raises(OSError):  # a bug keeps its traceback
        main(argv)


def test_real_sigint_of_wb_search(tmp_path):
    """SIGINT to a running `wb search` (here in the pipeline, after the corpus exists): the hint, exit 130, no
    traceback. The corpus is made first without worker processes, so that no pool worker can outlive the
    interrupted parent and hold its output pipes open (which made this test hang once under CI load)."""
    run_dir = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "workbench.cli", "data", "--cache", str(tmp_path / "corpus"), "--splits",
                    "calib,test", "--sizes", "calib=64,test=100", "--workers", "1"], check=True, env=_env(), cwd=REPO,
                   capture_output=True)
    # A shell starts background jobs with SIGINT ignored, and Python keeps an inherited SIG_IGN: the child gets the
    # default disposition back, as a terminal's foreground `wb search` has it.
    child = subprocess.Popen([sys.executable, "-m", "workbench.cli", "search", "--quick", "--run-dir", str(run_dir),
                              "--runs-root", str(tmp_path / "runs"), "--cache", str(tmp_path / "corpus")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (run_dir / ".lock").exists() and time.time() < deadline and child.poll() is None:
        time.sleep(0.1)
    time.sleep(1.0)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 130, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == f"interrupted; resume with wb search --run-dir {run_dir}", err[-2000:]


# -- 7. engine.json with damaged shape ranges ----------------------------------------------------------------------

@pytest.mark.parametrize("edit,match", [
    (lambda s: s["speech"].update(max="big"), "expected {'min','opt','max'} integer lists"),
    (lambda s: s["speech"].update(max=[16.5, 2048, 80]), "integer lists"),
    (lambda s: s["speech"].update(min=[True, 7, 80]), "integer lists"),
    (lambda s: s["speech"].update(opt=[999, 256, 80]), "need 1 <= min <= opt <= max"),
    (lambda s: s.pop("speech"), "must name exactly its inputs"),
    (lambda s: s.update(speech=3), "integer lists"),
])
def test_engine_json_with_bad_shapes_is_one_line(tiny_onnx, tmp_path, capsys, edit, match):
    import engines
    from core.errors import WorkbenchError
    from engines.base import EngineArtifact
    from workbench.cli import main

    enc = tiny_onnx[0]
    art = engines.build(enc, engines.default_shapes(enc, "encoder"), tmp_path / "eng", backend="onnxruntime")
    meta_path = art.path / "engine.json"
    meta = json.loads(meta_path.read_text())
    edit(meta["shapes"])
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(WorkbenchError, match=match):
        EngineArtifact.open(art.path)
    assert main(["bench", "--engine", str(art.path), "--batch-sizes", "1", "--seq-lens", "16", "--warmup", "0",
                 "--iters", "1", "--random-features"]) == 2
    line = _one_error_line(capsys)
    assert "engine.json" in line and "rebuild" in line, line


# -- a real kill: SIGKILL of a child `wb search` at a chosen stage, then a resume that redoes nothing finished -----

from test_task_search import project, write_config  # noqa: E402,F401  (the small transformer classifier task)

_KILL_AT = """
import os, signal, sys
from search import evalcache
target, nth = sys.argv[1], int(sys.argv[2])
orig, seen = evalcache.EvalCache._append, [0]
def append(self, line):
    if self.path.name.startswith(target):
        seen[0] += 1
        if seen[0] == nth:  # killed in the middle of writing this record: a torn last line
            with open(self.path, "ab") as f:
                f.write(line[: len(line) // 2].encode()); f.flush(); os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
    orig(self, line)
evalcache.EvalCache._append = append
from workbench.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _records(run_dir: Path) -> dict[str, list[str]]:
    """Keys of the complete records of every evaluation cache of a run, in file order (duplicates kept)."""
    out = {}
    for p in sorted(run_dir.glob("*.jsonl")):
        keys = []
        for line in p.read_text().splitlines():
            try:
                keys.append(json.loads(line)["key"])
            except (json.JSONDecodeError, KeyError, TypeError):
                pass
        out[p.name] = keys
    return out


@pytest.mark.parametrize("stage,nth", [("cache.jsonl", 2),  # during the baselines (FP32 done, FP16 cut)
                                       ("search_cache.", 3)])  # inside the precision search
def test_sigkill_at_a_stage_then_resume_redoes_no_finished_evaluation(project, tmp_path, stage, nth, capsys):
    from workbench.cli import main

    cfg = write_config(project, f"kill-{nth}.toml")
    run_dir, runs = tmp_path / "run", tmp_path / "runs"
    argv = ["search", "--config", str(cfg), "--runs-root", str(runs), "--run-dir", str(run_dir)]
    child = subprocess.run([sys.executable, "-c", _KILL_AT, stage, str(nth), *argv], capture_output=True, text=True,
                           env=_env(), cwd=REPO, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    before = _records(run_dir)
    torn = [p for p in run_dir.glob(f"{stage}*") if not p.read_bytes().endswith(b"\n")]
    assert torn, "the kill should leave a torn last line"
    assert not (run_dir / "run.json").exists()

    assert main(argv) == 0  # the resume, on the same directory (the dead child's lock is gone with it)
    after = _records(run_dir)
    for name, keys in after.items():
        assert len(keys) == len(set(keys)), f"{name}: an evaluation was computed twice"
        assert keys[:len(before.get(name, []))] == before.get(name, []), name  # finished records kept, not redone
    assert sum(len(k) for k in after.values()) > sum(len(k) for k in before.values())
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] in ("passed", "failed")


def _fake_split(cache: Path, name: str, frames: list[int]) -> None:
    import numpy as np

    d = cache / name
    d.mkdir(parents=True)
    feats = np.random.default_rng(0).normal(size=(sum(frames), 80)).astype(np.float32)
    np.save(d / "feats.npy", feats)
    np.save(d / "offsets.npy", np.concatenate([[0], np.cumsum(frames)]).astype(np.int64))
    (d / "manifest.jsonl").write_text("".join(json.dumps({"index": i, "text": "a b", "frames": f}) + "\n"
                                              for i, f in enumerate(frames)))
    (d / "meta.json").write_text(json.dumps({"split": name, "size": len(frames)}))


@pytest.mark.parametrize("frames,match", [([20, 3, 30, 5], "utterance 1 has 3 frames \\(and 1 more\\)"),
                                          ([3], "utterance 0 has 3 frames; the encoder's subsampling needs at least 7")])
def test_calibrate_refuses_utterances_too_short_for_the_encoder(tiny_onnx, tmp_path, capsys, frames, match):
    import re

    from workbench.cli import main

    _fake_split(tmp_path / "corpus", "calib", frames)
    out = tmp_path / "t.json"
    assert main(["calibrate", "--model", str(tiny_onnx[0]), "--cache", str(tmp_path / "corpus"), "--methods", "max",
                 "--default-method", "max", "--out", str(out)]) == 2
    assert re.search(match, _one_error_line(capsys)) and not out.exists()


def test_a_larger_split_serves_a_smaller_request(tmp_path):
    import numpy as np

    from calibration_data.corpus import ensure_corpus, generate_split, load_split

    cache = tmp_path / "corpus"
    ensure_corpus(cache, {"calib": 3}, workers=1, progress=False)
    mtime = (cache / "calib" / "meta.json").stat().st_mtime_ns
    ensure_corpus(cache, {"calib": 2}, workers=1, progress=False, at_least=True)  # e.g. wb search --quick
    assert (cache / "calib" / "meta.json").stat().st_mtime_ns == mtime and len(load_split(cache, "calib")) == 3
    small = load_split(generate_split(tmp_path / "small", "calib", 2, workers=1, progress=False).parent, "calib")
    big = load_split(cache, "calib")
    for i in range(2):  # the first utterances of the larger split are the smaller split's
        assert np.array_equal(big.features(i), small.features(i)) and big.texts[i] == small.texts[i]
    ensure_corpus(cache, {"calib": 4}, workers=1, progress=False, at_least=True)  # larger: generated
    assert len(load_split(cache, "calib")) == 4


def test_build_and_bench_check_their_outputs_first(tiny_onnx, tmp_path, capsys):
    import engines
    from workbench.cli import main

    enc = tiny_onnx[0]
    (tmp_path / "afile").write_text("x")
    assert main(["build", "--model", str(enc), "--backend", "onnxruntime", "--out", str(tmp_path / "afile")]) == 2
    assert "is a file: give a directory path" in _one_error_line(capsys)
    empty = tmp_path / "e.onnx"
    empty.write_bytes(b"")
    assert main(["build", "--model", str(empty), "--backend", "onnxruntime", "--out", str(tmp_path / "eng")]) == 2
    assert "is empty" in _one_error_line(capsys) and not (tmp_path / "eng").exists()
    art = engines.build(enc, engines.default_shapes(enc, "encoder"), tmp_path / "eng", backend="onnxruntime")
    (tmp_path / "adir").mkdir()
    assert main(["bench", "--engine", str(art.path), "--json", str(tmp_path / "adir"), "--batch-sizes", "1",
                 "--seq-lens", "16", "--random-features"]) == 2
    assert "is a directory" in _one_error_line(capsys)


def test_resume_with_a_changed_config_is_refused_before_any_work(project, tmp_path, capsys):
    from workbench.cli import main

    cfg = write_config(project, "resume.toml")
    run_dir = tmp_path / "run"
    argv = ["search", "--config", str(cfg), "--runs-root", str(tmp_path / "runs"), "--run-dir", str(run_dir)]
    assert main(argv) == 0
    capsys.readouterr()
    before = _records(run_dir)
    changed = project / "resume-changed.toml"
    changed.write_text(cfg.read_text().replace("iters = 3", "iters = 4"))
    assert main(["search", "--config", str(changed), *argv[3:]]) == 2
    line = _one_error_line(capsys)
    assert "was started with another config (latency.iters = 3 there, 4 now)" in line, line
    assert _records(run_dir) == before
    relaxed = project / "resume-relaxed.toml"  # the criterion and the budget may change on a resume
    relaxed.write_text(cfg.read_text().replace("max_full_evals = 6", "max_full_evals = 7"))
    assert main(["search", "--config", str(relaxed), *argv[3:]]) == 0


def test_wb_qat_checks_out_and_tables_before_training(tmp_path, capsys):
    from workbench.cli import main

    tables = tmp_path / "calibration"
    tables.mkdir()
    for kind in ("encoder", "decoder"):
        (tables / f"{kind}.json").write_text(json.dumps(_table({"x": {"amax": {"max": 1e-30}}})))
    (tmp_path / "afile").write_text("")
    assert main(["qat", "--tables", str(tables), "--out", str(tmp_path / "afile")]) == 2
    assert "is a file: give a directory path" in _one_error_line(capsys)
    assert main(["qat", "--tables", str(tables), "--out", str(tmp_path / "q")]) == 2
    assert "amax of tensor 'x' (max) is 1e-30" in _one_error_line(capsys) and not (tmp_path / "q").exists()


def test_both_readers_take_the_same_amax(tmp_path):
    """One rule for every reader (graph.calib): a tiny amax is floored at AMAX_FLOOR by both, a stored scale
    stands in for the entry's own method in both, and another method without an amax is refused by both."""
    from core.errors import WorkbenchError
    from graph.calib import AMAX_FLOOR, QMAX, load_table
    from quant.table import CalibrationTable

    data = {"format": "wb-calibration-table/1", "default_method": "max", "tensors": {
        "tiny": {"amax": {"max": 5e-9}}, "scaled": {"amax": {}, "method": "max", "scale": 0.5}}}
    p = tmp_path / "t.json"
    p.write_text(json.dumps(data))
    placement, table = load_table(p), CalibrationTable.load(p)
    assert placement.scale("tiny", "n") == table.scale("tiny") == pytest.approx(AMAX_FLOOR / QMAX)
    assert placement.scale("scaled", "n") == table.scale("scaled") == pytest.approx(0.5)
    with pytest.raises(WorkbenchError, match="method 'entropy' was not calibrated for tensor 'scaled'"):
        table.amax("scaled", "entropy")


def test_one_weight_range_rule():
    """Placement's fallback range and quant.weights' max method are one function: zero channels floored alike."""
    import numpy as np

    from graph.calib import AMAX_FLOOR
    from graph.placement import quantize_weight
    from quant.weights import per_channel_amax

    w = np.array([[0.0, 0.5], [0.0, -1.0], [0.0, 0.25]], np.float32)  # Gemm-style [K, N], axis 1
    amax = per_channel_amax(w, 1)
    assert amax.tolist() == [AMAX_FLOOR, 1.0]
    q, scale = quantize_weight(w, 1, amax)
    assert q[:, 0].tolist() == [0, 0, 0] and scale[0] > 0 and q[1, 1] == -127


# -- issue 15: a search killed (SIGKILL) in the search stage and resumed selects what an uninterrupted run does -----
# Timing is simulated so that the right answer is known: every quantized MatMul/Gemm saves 0.3 ms of 10, with
# fresh per-run noise (3 %) in every process; the criterion is set so that all-INT8 fails, so the search must
# bisect and refine, and the fastest passing mix is the one with the fewest fallback layers the search found.
_TIMED = """
import numpy as np, onnx
from engines import base
rng, truth = np.random.default_rng(), {}
def true_ms(path):
    if path not in truth:
        g = onnx.load(str(path)).graph
        dq = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
        truth[path] = 10.0 - 0.3 * sum(n.op_type in ("MatMul", "Gemm") and any(i in dq for i in n.input)
                                       for n in g.node)
    return truth[path]
def time_runs(runner, feeds, warmup, iters):
    return [true_ms(runner.path) / 1e3 * rng.lognormal(0, 0.03) for _ in range(iters)], "simulated"
base.time_runs = time_runs
""" + _KILL_AT  # then the kill at the nth record (never with nth 0)


def test_sigkill_in_the_search_then_resume_selects_the_uninterrupted_plan(project, tmp_path):
    runs = tmp_path / "runs"

    def wb_search(cfg, run_dir, kill_at=0):
        argv = ["search", "--config", str(cfg), "--runs-root", str(runs), "--run-dir", str(run_dir)]
        return subprocess.run([sys.executable, "-c", _TIMED, "search_cache.", str(kill_at),
                               *argv], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=600)

    probe = wb_search(write_config(project, "kill-probe.toml"), tmp_path / "probe")  # all-INT8's cosine here
    assert probe.returncode == 0, probe.stderr[-3000:]
    c0 = next(b for b in json.loads((tmp_path / "probe" / "run.json").read_text())["baselines"]
              if b["label"] == "INT8 all (max)")["accuracy"]["cosine"]
    cfg = write_config(project, "kill-select.toml", delta=1 - (1 - c0) / 3)  # all-INT8 fails, FP32 passes
    whole = wb_search(cfg, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = wb_search(cfg, tmp_path / "killed", kill_at=4)  # seeded start (2 records), all-FP32, then a cut
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "killed" / "run.json").exists()
    resumed = wb_search(cfg, tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a, b = (json.loads((tmp_path / d / "run.json").read_text()) for d in ("whole", "killed"))
    assert a["status"] == "passed" and a["selected"]["n_fallback"] > 0
    assert not any(bl["passed"] for bl in a["baselines"] if bl.get("precision") == "int8")
    assert a["selected"]["plan_hash"] == b["selected"]["plan_hash"]
    assert [r["label"] for r in a["trace"]] == [r["label"] for r in b["trace"]]
    # ... and it is the passing plan of the fewest fallback layers that the search evaluated (here the fastest)
    fewest = min(r["n_fallback"] for r in a["trace"] if r["passed"])
    assert a["selected"]["n_fallback"] == fewest
