"""Engines: the ONNX Runtime backend against a plain session, artifacts (atomic, content-hashed), bench
statistics, the INT8 kernel report, the TensorRT-absent paths and bad inputs."""
import argparse
import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import engines
from engines import EngineArtifact, bench, bench_cases, build, default_shapes, int8_kernel_report, load
from engines import ort_backend, trt_backend
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
