"""Issue 19: the search fanned out on Ray gives the serial run's results, and a worker killed mid-run loses
nothing. One local cluster (127.0.0.1, two CPUs, a small object store, no dashboard) serves every test here:
Ray's start is the slow part."""
from __future__ import annotations

import json
import operator
import os
import signal
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from test_task_search import project, write_config  # noqa: E402,F401 - the tiny transformer and its feeds

from workbench.cli import main  # noqa: E402

EXTRA = """
[distributed]
engine = "{engine}"
address = "auto"
max_parallel = 2
"""


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024 ** 2, _node_ip_address="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _config(d: Path, name: str, engine: str) -> Path:
    # all-INT8 fails this threshold, so the search bisects and refines (speculation); tie_tolerance 10 makes
    # the selection depend on accuracy and plans alone, not on this machine's timing noise
    cfg = write_config(d, name, metric="snr_db", delta=44.0)
    cfg.write_text(cfg.read_text().replace("tie_tolerance", "x").replace("search_iters = 2", "search_iters = 2\n"
                   "tie_tolerance = 10.0") + EXTRA.format(engine=engine))
    return cfg


def _search(d: Path, engine: str, run: str) -> dict:
    runs = d / "runs-ray"
    assert main(["search", "--config", str(_config(d, f"{run}.toml", engine)), "--runs-root", str(runs),
                 "--run-dir", str(runs / run)]) == 0
    return json.loads((runs / run / "run.json").read_text())


def _same_results(a: dict, b: dict) -> None:
    assert a["sensitivity"] == b["sensitivity"]  # bit-identical: same ORT thread count in the workers
    assert [(x["label"], x.get("accuracy")) for x in a["baselines"]] == [(x["label"], x.get("accuracy"))
                                                                          for x in b["baselines"]]
    # latency probes follow the fastest passing plan by sequential timing: noise here, in serial runs too
    strip = lambda t: [(r["label"], r["stage"], r["plan_hash"], r["accuracy"], r["passed"], r["cached"])  # noqa: E731
                       for r in t if r["stage"] != "latency-probe"]
    assert strip(a["trace"]) == strip(b["trace"])
    for k in ("n_full_evals", "n_computed_evals", "status"):  # cache hits count the probes' timings too
        assert a[k] == b[k], k
    # the plan and its accuracy; its label names the search's best, the fastest by sequential timing (noise)
    assert (a["selected"]["plan_hash"], a["selected"]["accuracy"]) == (b["selected"]["plan_hash"],
                                                                       b["selected"]["accuracy"])


@pytest.fixture(scope="module")
def serial_run(project):  # noqa: F811
    return _search(project, "serial", "serial")


def test_ray_search_gives_the_serial_result(project, cluster, serial_run):  # noqa: F811
    run = _search(project, "ray", "ray1")
    _same_results(serial_run, run)
    assert any(r["stage"] in ("bisect", "refine") for r in run["trace"])  # the fan-out had search work to do
    assert (project / "runs-ray" / "ray1" / "ray" / "session.txt").is_file()
    cache = (project / "runs-ray" / "ray1" / "cache.jsonl").read_text()
    assert cache.count('"key": "sensitivity:') == len(run["sensitivity"]) + 1  # each probe cached as it came


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _busy_workers() -> list[int]:
    """Ray workers of this test's cluster running one of our tasks (Ray names a busy worker `ray::<function>`)."""
    pids = []
    for pid in _descendants(os.getpid()):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if title.startswith(b"ray::_run"):
            pids.append(pid)
    return pids


def test_killed_worker_is_retried_and_no_evaluation_is_lost(project, cluster, serial_run):  # noqa: F811
    killed: list[int] = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            busy = _busy_workers()
            if busy:
                os.kill(busy[0], signal.SIGKILL)
                killed.append(busy[0])
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    run = _search(project, "ray", "ray-killed")
    t.join(timeout=1)
    assert killed, "no busy worker was seen to kill"
    _same_results(serial_run, run)


def test_driver_resume_keeps_every_finished_probe(project, cluster, tmp_path):  # noqa: F811
    """The executor hands each result to the driver as it arrives: a driver that stops half-way has cached
    those, and the next run computes only the rest."""
    from search.evalcache import EvalCache
    from search.executor import RayExecutor

    # operator.mul(context, item): a function every worker can import (this test module is not on their path)
    ex = RayExecutor("auto", 2, 1)
    cache = EvalCache(tmp_path / "c.jsonl")

    def stop_after_two(i, value):
        cache.get_or_compute(f"k{i}", lambda: value)
        if len(cache.entries) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ex.map(operator.mul, 3, list(range(6)), stop_after_two, progress=False)
    again = EvalCache(tmp_path / "c.jsonl")
    assert len(again.entries) == 2
    left = [i for i in range(6) if f"k{i}" not in again]
    ex.map(operator.mul, 3, left, lambda j, v: again.get_or_compute(f"k{left[j]}", lambda: v), progress=False)
    assert {k: v for k, v in EvalCache(tmp_path / "c.jsonl").entries.items()} == {f"k{i}": 3 * i for i in range(6)}
    assert again.computed == 4


def test_stream_sends_parts_as_they_arrive_highest_priority_first(cluster):
    """A part's items go out while the producer makes the next part (the driver's feeds of the next graph);
    waiting items go out highest priority first; results come back per part; a producer's error is raised."""
    from search.executor import RayExecutor

    ex = RayExecutor("auto", 1, 1)  # one in flight: the submission order is the order results arrive
    seen: list[tuple[int, int, int]] = []
    gate, produced = threading.Event(), threading.Event()

    def parts():
        yield 2, [1, 2, 3], 0.0
        gate.wait(30)  # the first part's items are running before the next two parts exist
        yield 10, [4], 1.0
        yield 100, [5, 6], 5.0
        produced.set()  # runs once the last part is queued

    def got(p, i, r):
        seen.append((p, i, r))
        gate.set()
        produced.wait(30)

    outs = ex.stream(operator.mul, parts(), got, progress=False)
    assert outs == [[2, 4, 6], [40], [500, 600]]
    # the first item ran before the other parts existed; then the waiting items by priority (5, 1, 0)
    assert seen == [(0, 0, 2), (2, 0, 500), (2, 1, 600), (1, 0, 40), (0, 1, 4), (0, 2, 6)]

    def broken():
        yield 2, [1], 0.0
        raise ValueError("the producer broke")

    with pytest.raises(ValueError, match="the producer broke"):
        ex.stream(operator.mul, broken(), progress=False)
    assert ex.map(operator.mul, 3, [1, 2], progress=False) == [3, 6]


def test_speculative_search_keeps_the_serial_trace():
    """Bisection and refinement with 4 workers' worth of speculation: the same trace, budget and best as the
    serial search; speculative evaluations only add cache entries (accuracy here: a synthetic error model)."""
    import tempfile

    from search.algorithm import SearchProblem, flat_plan_hash, search
    from search.evalcache import EvalCache

    nodes = [f"n{i:02d}" for i in range(24)]
    harm = {n: (0.3 if i % 5 == 0 else 0.01) for i, n in enumerate(nodes)}
    acc = lambda plan: {"err": sum(harm[n] for n, p in plan.items() if p == "int8")}  # noqa: E731
    lat = lambda plan: {"objective_ms": 10 + sum(p == "fp32" for p in plan.values()) * 0.1}  # noqa: E731

    def problem(**kw):
        return SearchProblem(nodes=nodes, fallback="fp32", accuracy=acc, passes=lambda a: a["err"] <= 0.35,
                             latency=lat, sensitivity={n: harm[n] + i * 1e-4 for i, n in enumerate(nodes)},
                             groups={"all": nodes[:6]}, max_full_evals=14, **kw)

    seen = []

    def many(plans, on_result):
        seen.extend(flat_plan_hash(p) for p in plans)
        for i, p in enumerate(plans):
            on_result(i, acc(p))

    with tempfile.TemporaryDirectory() as d:
        serial = search(problem(), EvalCache(Path(d) / "a.jsonl"), progress=False)
        spec = search(problem(accuracy_many=many, parallel=4), EvalCache(Path(d) / "b.jsonl"), progress=False)
    assert {r["stage"] for r in serial.trace} >= {"bisect", "refine"}
    assert spec.trace == serial.trace and spec.best == serial.best
    assert (spec.n_full_evals, spec.n_computed, spec.n_cache_hits) == \
        (serial.n_full_evals, serial.n_computed, serial.n_cache_hits)
    assert len(seen) > serial.n_computed and spec.n_speculative == len(seen) - serial.n_computed + 1


def test_config_errors_are_one_line(tmp_path):
    from core.errors import WorkbenchError
    from pipeline.config import load_config

    bad = tmp_path / "bad.toml"
    for text, match in (('[distributed]\nengine = "dask"\n', "distributed.engine"),
                        ('[distributed]\naddress = "host:1"\n', "ray://host:port"),
                        ('[distributed]\nmax_parallel = -1\n', "distributed.max_parallel must be >= 0"),
                        ('[distributed]\nworkers = 2\n', "unknown config key distributed.'workers'")):
        bad.write_text(text)
        with pytest.raises(WorkbenchError, match=match):
            load_config(bad)


def test_ray_missing_names_the_extra(monkeypatch):
    import builtins

    from core.errors import WorkbenchError
    from search.executor import import_ray

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "ray" else real(name, *a, **k))
    with pytest.raises(WorkbenchError, match=r"pip install -e \.\[ray\]"):
        import_ray()


class _FlakyRay:
    """Stands in for `ray` in `search.executor._connect`: the first `fails` calls of init raise `error`."""

    def __init__(self, fails: int, error: str):
        self.fails, self.error, self.inits, self.shutdowns = fails, error, 0, 0

    def init(self, **kwargs):
        self.inits += 1
        if self.inits <= self.fails:
            raise ConnectionError(self.error)

    def shutdown(self):
        self.shutdowns += 1


def test_client_connection_retries_only_the_client_server_start_failure(capsys):
    from core.errors import WorkbenchError
    from search.executor import CLIENT_ATTEMPTS, _connect

    start = ("Initialization failure from server:\nTraceback (most recent call last):\n  File proxier.py, in Datapath\n"
             "RuntimeError: Starting Ray client server failed. See ray_client_server_23000.err for detailed logs.")
    ray = _FlakyRay(CLIENT_ATTEMPTS - 1, start)  # fails on all attempts but the last: connected
    _connect(ray, "ray://127.0.0.1:10001", wait_s=0)
    assert (ray.inits, ray.shutdowns) == (CLIENT_ATTEMPTS, CLIENT_ATTEMPTS - 1)
    assert capsys.readouterr().err.count("connecting again") == CLIENT_ATTEMPTS - 1

    ray = _FlakyRay(CLIENT_ATTEMPTS, start)  # fails every time: one line naming the address and Ray's cause
    with pytest.raises(WorkbenchError, match=r"ray://127\.0\.0\.1:10001.*Starting Ray client server failed") as e:
        _connect(ray, "ray://127.0.0.1:10001", wait_s=0)
    assert ray.inits == CLIENT_ATTEMPTS and "\n" not in str(e.value)

    for address, error in (("ray://127.0.0.1:10001", "ConnectionError: ray client connection timeout"),
                           ("127.0.0.1:6379", start)):  # another failure, or no client: refused at once
        ray = _FlakyRay(1, error)
        with pytest.raises(WorkbenchError, match="cannot start or reach the Ray cluster"):
            _connect(ray, address, wait_s=0)
        assert (ray.inits, ray.shutdowns) == (1, 0)


class _PoolTask:
    """Mixed into the tiny model's onnx task: a ranking that picks its feeds from per-item scores (noise-to-signal
    of all-INT8 against FP32 on each eval feed), like wenet_asr's pool, recording which items each call scored."""

    calls: list = []

    def ranking_pool_size(self):
        return len(self.feeds("classifier", "eval"))

    def ranking_scores(self, runners, int8, items=None):
        from tasks.fidelity import noise_to_signal

        feeds = self.feeds("classifier", "eval")
        items = list(range(len(feeds))) if items is None else list(items)
        _PoolTask.calls.append(items)
        return [noise_to_signal(int8["classifier"].run(feeds[i])["logits"], runners["classifier"].run(feeds[i])["logits"])
                for i in items]

    def ranking_feeds(self, graph, runners=None, int8=None, scores=None):
        import numpy as np

        scores = self.ranking_scores(runners, int8) if scores is None else scores
        return [self.feeds(graph, "eval")[i] for i in np.argsort(scores)[::-1][:2]]


class _InProcessFanout:
    """A distributed fan-out run in this process, each task on a copy of its context (as a worker unpickles it)
    and a fresh worker state per fan-out: the driver's side of Ray's path (shares, order, reassembly)."""

    distributed, parallel = True, 2

    def map(self, fn, ctx, items, on_result=None, desc=""):
        import copy

        import pipeline.fanout as fanout

        fanout._CTX.clear()
        fanout._WS.clear()
        out = []
        for i, item in enumerate(items):
            out.append(fn(copy.deepcopy(ctx), item))
            if on_result:
                on_result(i, out[-1])
        return out

    def stream(self, fn, parts, on_result=None, desc=""):
        return [self.map(fn, ctx, items, None if on_result is None else (lambda i, r, p=p: on_result(p, i, r)), desc)
                for p, (ctx, items, _) in enumerate(parts)]

    def probes(self, *a, **k):
        from pipeline.fanout import Fanout

        return Fanout.probes(self, *a, **k)


def test_ranking_pool_scored_in_shares_gives_the_serial_sensitivity(project, tmp_path):  # noqa: F811
    """The ranking's per-item scores fanned out in interleaved shares (the driver opens no all-INT8 runner) and
    the probes in cost order: the serial stage's ranking, bit for bit; the probes' runners (no artifact) score
    as the engines' do."""
    from pipeline.calibration import calibrate_stage
    from pipeline.config import load_config, resolve_backend_and_recipe
    from pipeline.experiment import Experiment
    from pipeline.sensitivity import mean_noise_to_signal, ranking_inputs, sensitivity_stage
    from tasks.onnx_task import OnnxTask

    pool_task = type("PoolTask", (_PoolTask, OnnxTask), {})
    cfg = resolve_backend_and_recipe(load_config(write_config(project, "pool.toml")))
    runs = {}
    for name in ("serial", "fanned"):
        task = pool_task.from_config(cfg["task"], project)
        exp = Experiment(cfg, task, tmp_path / name, progress=False)
        if name == "fanned":
            exp._fanout = _InProcessFanout()
        exp.methods = calibrate_stage(exp)
        _PoolTask.calls = []
        runs[name] = (sensitivity_stage(exp, exp.methods[0]), list(_PoolTask.calls), exp)
    assert runs["serial"][0] == runs["fanned"][0] and len(runs["serial"][0]) > 1
    for _, _, e in runs.values():  # the probes' single-node models are deleted once scored; all-INT8 stays
        plans = [json.loads(f.read_text()) for f in (e.dir / "models" / "classifier").glob("*.plan.json")]
        assert plans and all(sum(p == "int8" for p in pl["nodes"].values()) > 1 for pl in plans)
        assert len(plans) == len(list((e.dir / "models" / "classifier").glob("*.onnx")))
    assert runs["serial"][1] == [[0, 1, 2]] and runs["fanned"][1] == [[0, 2], [1]]
    exp, m = runs["serial"][2], runs["serial"][2].methods[0]
    node = exp.ws.int8_nodes("classifier")[0]
    feeds, refs, _ = ranking_inputs(exp, m)
    engine = exp.ws.runner("classifier", exp.ws.model("classifier", {node: "int8"}, m))
    assert mean_noise_to_signal(engine, refs["classifier"][0], feeds["classifier"], refs["classifier"][1]) == \
        runs["serial"][0][exp.key("classifier", node)]
