"""Engines: the ONNX Runtime backend against a plain session, artifacts (atomic, content-hashed), bench
statistics, the INT8 kernel report, the TensorRT-absent paths, bad inputs, the one runner base (feeds checked
once, for every backend), the backend registry, and no raw ONNX Runtime sessions outside engines/."""
import argparse
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import engines
from engines import EngineArtifact, bench, bench_cases, build, default_shapes, int8_kernel_report, load
from engines import EngineRunner, ort_backend, trt_backend
from engines.runner import interface_specs
from evaluation.interface import TensorSpec
from models.export import dummy_decoder_inputs, dummy_encoder_inputs
from workbench.commands import engines as engines_cmd
from core.errors import WorkbenchError

DECODER_NAMES = ["encoder_out", "encoder_out_lens", "hyps_pad_sos_eos", "hyps_lens_sos", "r_hyps_pad_sos_eos",
                 "ctc_score"]
TRT_ABSENT = pytest.mark.skipif(trt_backend.TENSORRT.available()[0], reason="TensorRT is usable here")


@pytest.fixture(scope="module")
def artifacts(tiny_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines")
    return {p.stem: build(p, None, out / p.stem, backend="onnxruntime", threads=2) for p in tiny_onnx}


def _enc_feeds(batch=2, frames=100):
    speech, lengths = dummy_encoder_inputs(batch, frames)
    return {"speech": speech.numpy(), "speech_lengths": lengths.numpy()}


def _dec_feeds(model, inputs):
    values = dummy_decoder_inputs(model, batch=2, t_out=24)
    return {n: v.numpy() for n, v in zip(DECODER_NAMES, values) if n in inputs}


# ------------------------------------------------------------------ ONNX Runtime backend


def test_ort_engine_matches_plain_session(tiny_model, tiny_onnx, artifacts):
    enc_path, dec_path = tiny_onnx
    dec_inputs = [i.name for i in ort.InferenceSession(str(dec_path)).get_inputs()]
    for path, art, feeds in ((enc_path, artifacts["encoder"], _enc_feeds()),
                             (dec_path, artifacts["decoder"], _dec_feeds(tiny_model, dec_inputs))):
        plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        want = dict(zip([o.name for o in plain.get_outputs()], plain.run(None, feeds)))
        got = load(art).run(feeds)
        assert set(got) == set(want)
        for name in want:
            assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, err_msg=name)


def test_artifact_layout(artifacts, tiny_onnx):
    art = artifacts["encoder"]
    meta = json.loads((art.path / "engine.json").read_text())
    assert meta["backend"] == "onnxruntime" and meta["kind"] == "encoder"
    assert meta["source"]["sha256"] == engines.base.sha256_file(tiny_onnx[0])
    assert meta["shapes"]["speech"] == {"min": [1, 16, 80], "opt": [16, 256, 80], "max": [16, 1024, 80]}
    assert meta["options"] == {"threads": 2, "providers": ["CPUExecutionProvider"]}
    assert {"onnxruntime", "onnx", "numpy", "python"} <= set(meta["versions"])
    from core.host import cpu_info
    assert meta["host"]["cpu"] == cpu_info() and meta["host"]["cpu"]["isa"]  # where it was built and runs
    for role in ("engine", "optimized", "kernels"):
        assert art.file(role).is_file()
    assert (art.path / "encoder.optimized.onnx").is_file()
    dec = artifacts["decoder"].shapes
    assert dec["encoder_out"]["max"] == [16, 256, 64] and dec["hyps_pad_sos_eos"]["min"] == [1, 10, 64]


def test_bench_statistics(artifacts):
    art = artifacts["decoder"]
    runner = load(art)
    cases = bench_cases(art.meta["io"], "decoder", batch_sizes=(1, 2), seq_lens=(16, 20))
    rows = bench(runner, cases, warmup=1, iters=4)
    assert [(r["bs"], r["sl"]) for r in rows] == [(1, 16), (1, 20), (2, 16), (2, 20)]
    for r in rows:
        assert r["iters"] == 4 and len(r["latencies_ms"]) == 4 and r["warmup"] == 1
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"] <= r["max_ms"]
        assert r["min_ms"] <= r["mean_ms"] <= r["max_ms"]
        assert r["throughput"] == pytest.approx(r["bs"] * r["sl"] / (r["median_ms"] / 1e3))
    json.dumps(rows)  # plain JSON data


def test_bench_cases_are_deterministic_and_fit_the_model(artifacts):
    io = artifacts["encoder"].meta["io"]
    a, b = bench_cases(io, "encoder", (1, 4), (16,)), bench_cases(io, "encoder", (4,), (16,))
    np.testing.assert_array_equal(a[(4, 16)]["speech"], b[(4, 16)]["speech"])
    assert a[(4, 16)]["speech"].shape == (4, 16, 80) and list(a[(4, 16)]["speech_lengths"]) == [16] * 4
    dec = bench_cases(artifacts["decoder"].meta["io"], "decoder", (2,), (16,))[(2, 16)]
    assert dec["encoder_out"].shape == (2, 16, 64) and dec["hyps_pad_sos_eos"].shape == (2, 10, 64)
    load(artifacts["decoder"]).run(dec)


def test_artifact_reused_rebuilt_and_atomic(tiny_onnx, tmp_path, monkeypatch):
    model = tmp_path / "encoder.onnx"
    shutil.copyfile(tiny_onnx[0], model)
    out = tmp_path / "eng"
    first = build(model, None, out, backend="onnxruntime", threads=1)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = build(model, None, out, backend="onnxruntime", threads=1)
    assert again.reused and not first.reused
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp

    # The model's content changes (one weight): rebuilt, with the new hash.
    m = onnx.load(str(model))
    w = m.graph.initializer[0]
    arr = onnx.numpy_helper.to_array(w).copy()
    arr.flat[0] += 1.0
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    onnx.save(m, str(model))
    changed = build(model, None, out, backend="onnxruntime", threads=1)
    assert not changed.reused
    assert changed.meta["source"]["sha256"] != first.meta["source"]["sha256"]
    assert (out / "engine.json").stat().st_mtime_ns != stamp["engine.json"]

    # Options change: rebuilt; same options again: reused.
    assert not build(model, None, out, backend="onnxruntime", threads=2).reused
    assert build(model, None, out, backend="onnxruntime", threads=2).reused

    # A build failing half-way leaves the previous artifact whole and no temporary directory behind.
    before = (out / "engine.json").read_text()

    def broken(onnx_path, tmp, *a):
        (tmp / "encoder.onnx").write_bytes(b"partial")
        raise WorkbenchError("simulated failure")

    monkeypatch.setattr(ort_backend, "build_files", broken)
    with pytest.raises(WorkbenchError, match="simulated"):
        build(model, None, out, backend="onnxruntime", threads=3)
    assert (out / "engine.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.onnx", "eng"]
    load(out).run(_enc_feeds())


def test_int8_kernel_report_counts_integer_kernels(tiny_onnx, tmp_path, artifacts):
    from onnxruntime.quantization import QuantFormat, quantize_static

    class Reader:
        def __init__(self):
            self.feeds = iter([_enc_feeds(1, 40), _enc_feeds(1, 60)])

        def get_next(self):
            return next(self.feeds, None)

    qdq = tmp_path / "encoder_int8.onnx"
    with np.errstate(all="ignore"):
        quantize_static(str(tiny_onnx[0]), str(qdq), Reader(), quant_format=QuantFormat.QDQ)
    art = build(qdq, None, tmp_path / "eng_int8", backend="onnxruntime")
    report = int8_kernel_report(art)
    assert report["input_quantize_linear"] > 0 and report["input_dequantize_linear"] > 0
    assert report["integer_kernel_total"] > 0
    assert report["integer_kernel_total"] == sum(report["integer_kernels"].values())
    assert all(ort_backend.is_integer_kernel(op) for op in report["integer_kernels"])
    assert art.meta["int8_kernels"]["integer_kernel_total"] == report["integer_kernel_total"]
    fp32 = int8_kernel_report(artifacts["encoder"].path)
    assert fp32["integer_kernel_total"] == 0 and fp32["input_quantize_linear"] == 0
    assert fp32["float_compute_kernels"]


# ------------------------------------------------------------------ TensorRT absent


@TRT_ABSENT
def test_tensorrt_absent_is_one_clear_error(tiny_onnx, tmp_path):
    ok, reason = trt_backend.TENSORRT.available()
    assert not ok and "TensorRT" in reason
    with pytest.raises(WorkbenchError, match="tensorrt backend cannot build here.*onnxruntime"):
        build(tiny_onnx[0], None, tmp_path / "trt", backend="tensorrt")
    assert not (tmp_path / "trt").exists()


@TRT_ABSENT
def test_auto_falls_back_to_onnxruntime(tiny_onnx, tmp_path):
    assert engines.resolve_backend("auto") == "onnxruntime"
    art = build(tiny_onnx[0], None, tmp_path / "auto", backend="auto")
    assert art.backend == "onnxruntime" and load(art).run(_enc_feeds())["encoder_out"].shape[0] == 2


@TRT_ABSENT
def test_tensorrt_engine_files_checked_then_tensorrt_required(tmp_path, artifacts):
    fake = tmp_path / "trt_engine"
    shutil.copytree(artifacts["encoder"].path, fake)
    (fake / "encoder.plan").write_bytes(b"not a plan")
    meta = json.loads((fake / "engine.json").read_text())
    meta["backend"] = "tensorrt"
    meta["files"] = {"engine": {"name": "encoder.plan", "sha256": "0" * 64}}
    (fake / "engine.json").write_text(json.dumps(meta))
    with pytest.raises(WorkbenchError, match="does not match the sha256"):
        load(fake)
    meta["files"]["engine"]["sha256"] = engines.base.sha256_file(fake / "encoder.plan")
    (fake / "engine.json").write_text(json.dumps(meta))
    with pytest.raises(WorkbenchError, match="cannot run the tensorrt engine .* here"):
        load(fake)
    with pytest.raises(WorkbenchError, match="is a tensorrt engine, not an onnxruntime one"):
        ort_backend.load(EngineArtifact.open(fake))
    with pytest.raises(WorkbenchError, match="tensorrt engine"):
        int8_kernel_report(fake)


# ------------------------------------------------------------------ bad inputs


def test_shapes_outside_built_range(artifacts):
    runner = load(artifacts["encoder"])
    with pytest.raises(WorkbenchError, match=r"input speech .*\[1, 8, 80\].*outside.*\[1, 16, 80\]\.\.\[16, 1024, 80\]"):
        runner.run(_enc_feeds(1, 8))
    with pytest.raises(WorkbenchError, match="input speech .*outside"):
        runner.run(_enc_feeds(17, 20))
    narrow = default_shapes(artifacts["encoder"].file("engine"), batch=(1, 1, 2), time_range=(16, 32, 64))
    assert narrow["speech"]["max"] == [2, 64, 80]


def test_wrong_feed_names_and_dtypes(artifacts):
    runner = load(artifacts["encoder"])
    feeds = _enc_feeds()
    with pytest.raises(WorkbenchError, match="missing inputs \\['speech_lengths'\\]"):
        runner.run({"speech": feeds["speech"]})
    with pytest.raises(WorkbenchError, match="unexpected inputs \\['speech_len'\\]"):
        runner.run({**feeds, "speech_len": feeds["speech_lengths"]})
    with pytest.raises(WorkbenchError, match="input speech .* must be float32, got float64"):
        runner.run({**feeds, "speech": feeds["speech"].astype(np.float64)})
    with pytest.raises(WorkbenchError, match="input speech_lengths .* must be int32, got int64"):
        runner.run({**feeds, "speech_lengths": feeds["speech_lengths"].astype(np.int64)})


def test_bad_shape_ranges_and_options(tiny_onnx, tmp_path):
    shapes = default_shapes(tiny_onnx[0])
    with pytest.raises(WorkbenchError, match="fixes it to 80"):
        build(tiny_onnx[0], {**shapes, "speech": {"min": [1, 16, 40], "opt": [1, 16, 40], "max": [1, 16, 40]}},
              tmp_path / "e", backend="onnxruntime")
    with pytest.raises(WorkbenchError, match="min <= opt <= max"):
        build(tiny_onnx[0], {**shapes, "speech": {"min": [4, 16, 80], "opt": [1, 16, 80], "max": [8, 16, 80]}},
              tmp_path / "e", backend="onnxruntime")
    with pytest.raises(WorkbenchError, match="exactly its inputs"):
        build(tiny_onnx[0], {"speech": shapes["speech"]}, tmp_path / "e", backend="onnxruntime")
    with pytest.raises(WorkbenchError, match="unknown onnxruntime build options"):
        build(tiny_onnx[0], None, tmp_path / "e", backend="onnxruntime", fp16=True)
    with pytest.raises(WorkbenchError, match="unknown backend"):
        build(tiny_onnx[0], None, tmp_path / "e", backend="openvino")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not onnx")
    with pytest.raises(WorkbenchError, match="not a readable ONNX model"):
        build(garbage, None, tmp_path / "e", backend="onnxruntime")
    assert not (tmp_path / "e").exists()


def test_corrupt_foreign_or_missing_engine(artifacts, tmp_path):
    art = tmp_path / "eng"
    shutil.copytree(artifacts["encoder"].path, art)
    (art / "encoder.onnx").write_bytes(b"garbage")
    with pytest.raises(WorkbenchError, match="corrupt or was replaced"):
        load(art)
    (art / "encoder.onnx").unlink()
    with pytest.raises(WorkbenchError, match="encoder.onnx is missing"):
        load(art)
    meta_path = art / "engine.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "backend": "openvino"}))
    with pytest.raises(WorkbenchError, match="backend 'openvino'"):
        load(art)
    meta_path.write_text(json.dumps({"some": "other json"}))
    with pytest.raises(WorkbenchError, match="not a workbench engine"):
        load(art)
    meta_path.write_text("{ truncated")
    with pytest.raises(WorkbenchError, match="not valid JSON"):
        load(art)
    meta_path.unlink()
    with pytest.raises(WorkbenchError, match="not an engine directory"):
        load(art)
    # A non-engine directory is never replaced by build().
    (art / "precious.txt").write_text("keep")
    with pytest.raises(WorkbenchError, match="not an engine directory; refusing"):
        build(artifacts["encoder"].file("engine"), None, art, backend="onnxruntime")
    assert (art / "precious.txt").read_text() == "keep"


# ------------------------------------------------------------------ CLI


def _cli(argv):
    parser = argparse.ArgumentParser(prog="wb")
    engines_cmd.register(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_cli_build_and_bench(tiny_onnx, tmp_path, capsys):
    out, js = tmp_path / "dec", tmp_path / "bench.json"
    _cli(["build", "--model", str(tiny_onnx[1]), "--kind", "decoder", "--backend", "onnxruntime", "--out", str(out),
          "--threads", "1", "--time", "16:32:64"])
    assert "built onnxruntime decoder engine" in capsys.readouterr().out
    _cli(["bench", "--engine", str(out), "--batch-sizes", "1,2", "--seq-lens", "16,64", "--warmup", "1", "--iters", "2",
          "--json", str(js)])
    printed = capsys.readouterr().out
    assert "median (ms)" in printed and "throughput" in printed
    data = json.loads(js.read_text())
    assert data["backend"] == "onnxruntime" and data["threads"] == 1
    assert data["host"]["cpu"]["isa"] in printed  # the table names the CPU it was measured on
    assert [(r["bs"], r["sl"]) for r in data["rows"]] == [(1, 16), (1, 64), (2, 16), (2, 64)]
    with pytest.raises(WorkbenchError, match="outside the engine's built range"):
        _cli(["bench", "--engine", str(out), "--seq-lens", "128", "--batch-sizes", "1", "--iters", "1"])


@TRT_ABSENT
def test_cli_tensorrt_missing(tiny_onnx, tmp_path):
    with pytest.raises(WorkbenchError, match="tensorrt backend cannot build here"):
        _cli(["build", "--model", str(tiny_onnx[0]), "--backend", "tensorrt", "--out", str(tmp_path / "t")])


def test_bench_interleaved_runs_alternate_and_rows_per_case():
    from engines import bench_interleaved

    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def run(self, feeds):
            calls.append((self.name, feeds["x"]))
            return {}

    cases = {(1, 16): {"x": 1}, (4, 64): {"x": 2}}
    rows = bench_interleaved({"a": Fake("a"), "b": Fake("b")}, cases, warmup=1, iters=3)
    assert set(rows) == {"a", "b"}
    assert [(r["bs"], r["sl"], r["iters"]) for r in rows["a"]] == [(1, 16, 3), (4, 64, 3)]
    # per case: warm-up a b, then timed a b a b a b (never all of a, then all of b)
    assert calls[:8] == [("a", 1), ("b", 1)] * 4 and calls[8:] == [("a", 2), ("b", 2)] * 4
    with pytest.raises(WorkbenchError):
        bench_interleaved({"a": Fake("a")}, cases, warmup=0, iters=0)


# ------------------------------------------------------------------ the runner base: feeds checked once, every backend


class _FakeCudart:
    """cuda-python's runtime, every call succeeding: enough for TrtEngineRunner's run/time_runs bookkeeping."""

    class cudaMemcpyKind:  # noqa: N801 - cuda-python's name
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    def __getattr__(self, name):
        return (lambda *a: (0, 1.0)) if name == "cudaEventElapsedTime" else (lambda *a: (0, 0))


def _device_free_trt_runner(art, calls):
    """A TrtEngineRunner over the ORT artifact's specs and built ranges, its device work (bind, execute) faked:
    no TensorRT here, but its run/time_runs are the ones a real TensorRT engine goes through."""
    r = trt_backend.TrtEngineRunner.__new__(trt_backend.TrtEngineRunner)
    io = art.meta["io"]
    EngineRunner.__init__(r, art.file("engine"), art.kind, interface_specs(art.kind, list(io["inputs"])),
                          interface_specs(art.kind, list(io["outputs"]), outputs=True), shapes=art.shapes,
                          shapes_where=f"engine {art.path}")
    r.cudart, r._stream, r._buffers, r._cache = _FakeCudart(), None, {}, None

    def bind(feeds):
        calls["backend"] += 1
        r._buffers.update({n: (0, 4) for n in r.output_names})
        return {n: np.zeros(1, np.float32) for n in r.output_names}

    def execute():
        calls["execute"] += 1

    r._bind, r._execute = bind, execute
    return r


class _SpyRunner(EngineRunner):
    """The smallest backend runner: the specs and ranges of an artifact, `_run` counting its calls."""

    def __init__(self, art, calls):
        ins = [TensorSpec(n, np.dtype(d["dtype"]), len(d["shape"])) for n, d in art.meta["io"]["inputs"].items()]
        super().__init__(art.file("engine"), art.kind, ins, [TensorSpec("total", np.float32, 0)], shapes=art.shapes,
                         shapes_where=f"engine {art.path}")
        self.calls = calls

    def _run(self, feeds, outputs):
        self.calls["backend"] += 1
        return {"total": np.float32(sum(float(np.sum(v)) for v in feeds.values()))}


RUNNER_KINDS = ("onnxruntime", "onnx-file", "tensorrt", "registered")


@pytest.fixture
def counted(monkeypatch):
    """Counts of EngineRunner.check calls (the one place feeds are checked) and of backend work."""
    calls = {"check": 0, "backend": 0, "execute": 0}
    check = EngineRunner.check

    def counting(self, feeds):
        calls["check"] += 1
        return check(self, feeds)

    monkeypatch.setattr(EngineRunner, "check", counting)
    return calls


def _runner_of(kind, artifacts, tiny_onnx, calls, monkeypatch):
    art = artifacts["encoder"]
    if kind == "onnxruntime":
        runner = load(art)
    elif kind == "onnx-file":
        runner = engines.open_onnx(tiny_onnx[0], threads=1)
    elif kind == "tensorrt":
        return _device_free_trt_runner(art, calls)
    else:
        return _SpyRunner(art, calls)
    real = runner.session

    class CountingSession:  # ONNX Runtime's session, its runs counted
        def run(self, names, feeds):
            calls["backend"] += 1
            return real.run(names, feeds)

    monkeypatch.setattr(runner, "session", CountingSession())
    return runner


@pytest.mark.parametrize("kind", RUNNER_KINDS)
def test_every_runner_checks_feeds_once_in_the_base(kind, artifacts, tiny_onnx, counted, monkeypatch):
    runner = _runner_of(kind, artifacts, tiny_onnx, counted, monkeypatch)
    assert isinstance(runner, EngineRunner)
    feeds = _enc_feeds()
    bad = {
        "dtype": ({**feeds, "speech": feeds["speech"].astype(np.float64)},
                  r"input speech .* must be float32, got float64"),
        "rank": ({**feeds, "speech": feeds["speech"][0]}, r"input speech .* must have rank 3, got shape \(100, 80\)"),
        "not an array": ({**feeds, "speech_lengths": [100, 100]}, r"input speech_lengths .* must be int32, got list"),
        "unknown name": ({**feeds, "speech_len": feeds["speech_lengths"]}, r"unexpected inputs \['speech_len'\]"),
        "missing name": ({"speech": feeds["speech"]}, r"missing inputs \['speech_lengths'\]"),
        "range": (_enc_feeds(1, 8), r"input speech of engine .* \[1, 8, 80\], outside the engine's built range "
                                    r"\[1, 16, 80\]\.\.\[16, 1024, 80\]"),
        "not a dict": ([feeds], r"must be a dict of input name -> array, got list"),
    }
    if kind == "onnx-file":  # an ONNX file as it is has no built ranges
        assert runner.shapes is None
        del bad["range"]
    for case, (wrong, message) in bad.items():
        for call in (lambda: runner.run(wrong), lambda: runner.time_runs(wrong, 1, 2)):
            with pytest.raises(WorkbenchError, match=message):
                call()
    assert counted["backend"] == 0 and counted["execute"] == 0  # nothing ran on a bad feed
    assert counted["check"] == 2 * len(bad)

    counted["check"] = 0
    out = runner.run(feeds)
    assert set(out) == set(runner.output_names) and counted == {**counted, "check": 1, "backend": 1}
    times, timer = runner.time_runs(feeds, 2, 3)
    assert len(times) == 3 and counted["check"] == 2  # checked once, before the timed loop
    if kind == "tensorrt":  # bound once, executed warm-up + timed times, timed by CUDA events
        assert timer == "cuda_event" and counted["backend"] == 2 and counted["execute"] == 1 + 2 + 3
    else:
        assert timer == "perf_counter" and counted["backend"] == 1 + 2 + 3
    # engines.bench_interleaved times each run with time_runs(feeds, 0, 1): one check per timed run, as before
    engines.bench_interleaved({"r": runner}, {(2, 100): feeds}, warmup=1, iters=2)
    assert counted["check"] == 2 + 1 + 2


def test_onnx_file_runner_matches_engine_and_output_subsets(artifacts, tiny_onnx):
    feeds = _enc_feeds()
    plain, engine = engines.open_onnx(tiny_onnx[0]), load(artifacts["encoder"])
    assert isinstance(plain, ort_backend.OnnxFileRunner) and not isinstance(plain, ort_backend.OrtEngineRunner)
    assert plain.kind == engine.kind == "encoder" and plain.input_names == engine.input_names
    a, b = plain.run(feeds), engine.run(feeds)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-6, err_msg=name)
    only = engine.run(feeds, ["encoder_out"])
    assert list(only) == ["encoder_out"]
    np.testing.assert_array_equal(only["encoder_out"], b["encoder_out"])
    with pytest.raises(WorkbenchError, match=r"outputs \['logits'\] are not outputs of .*encoder_out"):
        engine.run(feeds, ["logits"])
    assert plain.input_specs["speech"].last_dim == 80 and plain.output_specs["encoder_out"].rank == 3
    generic = engines.open_onnx(tiny_onnx[0], kind="generic")  # its own interface, read from the session
    assert generic.input_specs["speech_lengths"].dtype == np.int32 and generic.run(feeds).keys() == a.keys()
    with pytest.raises(WorkbenchError, match="unknown model kind 'vision'"):
        engines.open_onnx(tiny_onnx[0], kind="vision")


# ------------------------------------------------------------------ the backend registry


class _FakeBackend:
    """A backend of the registry's protocol: its "engine" is a note of the source model; its runner sums feeds."""

    UNKEYED_OPTIONS = ("note",)

    def __init__(self):
        self.builds = 0

    def check_usable(self):
        pass

    def versions(self):
        return {"fake": "1.0"}

    def normalize_options(self, options):
        unknown = set(options) - {"scale", "note"}
        if unknown:
            raise WorkbenchError(f"unknown fake build options {sorted(unknown)}")
        return {"scale": options.get("scale", 1), "note": options.get("note")}

    def build_files(self, onnx_path, tmp, kind, shapes, options):
        self.builds += 1
        (tmp / f"{kind}.fake").write_text(f"{onnx_path} x{options['scale']}")
        return {"engine": f"{kind}.fake"}, {"fake_extra": True}

    def load(self, artifact, **options):
        return _SpyRunner(artifact, {"check": 0, "backend": 0})


@pytest.fixture
def fake_backend():
    backend = _FakeBackend()
    engines.register_backend("fake", backend)
    yield backend
    engines.unregister_backend("fake")


def test_registry_lists_the_built_in_backends():
    assert engines.backends()[:3] == ("onnxruntime", "tensorrt", "tensorrt-rtx") == engines.BACKENDS
    assert engines.get_backend("onnxruntime") is ort_backend
    assert engines.get_backend("tensorrt") is trt_backend.TENSORRT
    assert engines.get_backend("tensorrt-rtx") is trt_backend.RTX


def test_fake_backend_builds_and_loads_through_the_registry(fake_backend, tiny_onnx, tmp_path):
    assert "fake" in engines.backends()
    art = build(tiny_onnx[0], None, tmp_path / "fake", backend="fake", scale=3)
    assert art.backend == "fake" and art.kind == "encoder" and fake_backend.builds == 1
    meta = json.loads((art.path / "engine.json").read_text())
    assert meta["backend"] == "fake" and meta["versions"]["fake"] == "1.0" and meta["fake_extra"]
    assert meta["options"] == {"scale": 3, "note": None}
    assert build(tiny_onnx[0], None, tmp_path / "fake", backend="fake", scale=3, note="x").reused  # unkeyed option
    assert not build(tiny_onnx[0], None, tmp_path / "fake", backend="fake", scale=4).reused
    assert fake_backend.builds == 2
    runner = load(tmp_path / "fake")
    assert isinstance(runner, EngineRunner)
    feeds = _enc_feeds(1, 20)
    assert runner.run(feeds)["total"] == pytest.approx(float(feeds["speech"].sum()) + 20, rel=1e-5)
    with pytest.raises(WorkbenchError, match="input speech of engine .* outside the engine's built range"):
        runner.run(_enc_feeds(1, 8))  # the base's checks come with the registration
    with pytest.raises(WorkbenchError, match="unknown fake build options"):
        build(tiny_onnx[0], None, tmp_path / "fake2", backend="fake", fp16=True)

    engines.unregister_backend("fake")
    try:
        with pytest.raises(WorkbenchError, match=r"backend 'fake', which this workbench does not know \(registered "
                                                 r"backends: onnxruntime, tensorrt, tensorrt-rtx\)"):
            load(tmp_path / "fake")
    finally:
        engines.register_backend("fake", fake_backend)


def test_unknown_backend_is_one_error_listing_the_registered_ones(fake_backend, tiny_onnx, tmp_path):
    listed = r"unknown backend 'openvino': the registered backends are onnxruntime, tensorrt, tensorrt-rtx, fake"
    for call in (lambda: build(tiny_onnx[0], None, tmp_path / "e", backend="openvino"),
                 lambda: engines.resolve_backend("openvino"), lambda: engines.get_backend("openvino")):
        with pytest.raises(WorkbenchError, match=listed):
            call()
    assert not (tmp_path / "e").exists()


def test_register_backend_refuses_bad_registrations(fake_backend):
    with pytest.raises(WorkbenchError, match="lacks build_files, load"):
        engines.register_backend("half", type("Half", (), {"check_usable": 0, "versions": 0,
                                                           "normalize_options": 0, "UNKEYED_OPTIONS": ()})())
    with pytest.raises(WorkbenchError, match="'fake' is already registered"):
        engines.register_backend("fake", _FakeBackend())
    engines.register_backend("fake", fake_backend)  # the same object again: a no-op
    for name in ("auto", "", " x"):
        with pytest.raises(WorkbenchError, match="non-empty string other than 'auto'"):
            engines.register_backend(name, _FakeBackend())
    with pytest.raises(WorkbenchError, match="'ghost' is not registered"):
        engines.unregister_backend("ghost")
    assert "half" not in engines.backends()


# ------------------------------------------------------------------ ONNX Runtime sessions live in engines/

ROOT = Path(__file__).resolve().parents[1]
# The raw sessions kept outside engines/, each with its reason.
RAW_SESSIONS_ALLOWED = {
    # below engines in the layer order; they observe intermediate tensors (exposed as extra graph outputs),
    # which is calibration's job, not an engine's
    "quant/collect.py", "graph/calib.py",
}


def test_no_raw_onnxruntime_session_outside_engines():
    packages = [p.parent.name for p in ROOT.glob("*/__init__.py")] + ["experiments"]
    found = {str(p.relative_to(ROOT)) for package in packages if package not in ("engines", "tests")
             for p in (ROOT / package).rglob("*.py") if "InferenceSession" in p.read_text()}
    found -= {"experiments/bench_calibration.py"}  # its "fp32" child times a plain session beside other tools
    # scripts recorded with their results as they ran (ablations of Q/DQ arithmetic with ONNX Runtime's graph
    # optimizations off, micro-benchmarks of hand-built one-MatMul graphs, which no engine offers): records, not
    # tool code
    found = {f for f in found if not f.startswith("experiments/results/")}
    assert found <= RAW_SESSIONS_ALLOWED, sorted(found - RAW_SESSIONS_ALLOWED)
    assert not any(f.split("/")[0] in ("evaluation", "tasks", "search", "pipeline", "workbench") for f in found)
    users = [str(p.relative_to(ROOT)) for package in packages + ["tests"]
             for p in (ROOT / package).rglob("*.py")
             if p != Path(__file__).resolve() and re.search(r"\bOrtRunner\b", p.read_text())]
    assert users == []  # the ONNX file runner is engines.open_onnx / engines.ort_backend.OnnxFileRunner
