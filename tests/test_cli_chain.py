"""The README's CLI chain as a user types it, through `wb`'s entry point, never with hand-made tables:
`wb data` -> `wb export` -> `wb calibrate` (encoder and decoder) -> `wb quantize` (both recipes, int8 and fp16
default plans) -> `wb build` -> `wb bench` -> `wb check`, on the tiny model; then the bad inputs of that chain."""
import json

import numpy as np
import onnx
import pytest

from graph.analysis import analyze
from graph.placement import calibration_tensors, required_tensors
from graph.plan import create_plan
from graph.validate import validate
from cli_helpers import wb

KINDS = ("encoder", "decoder")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Every artifact of one run of the chain, written as the README's commands write them."""
    d = tmp_path_factory.mktemp("chain")
    corpus = d / "corpus"
    wb("data", "--cache", corpus, "--splits", "calib", "--sizes", "calib=6", "--workers", "1")
    wb("export", "--config", "tiny", "--out", d / "fp32")
    fp32 = {k: d / "fp32" / f"{k}.onnx" for k in KINDS}
    wb("calibrate", "--model", fp32["encoder"], "--cache", corpus, "--limit", "6", "--batch-size", "3",
       "--out", d / "encoder.table.json", "--trt-cache", d / "encoder.cache")
    wb("calibrate", "--model", fp32["decoder"], "--encoder", fp32["encoder"], "--cache", corpus, "--limit", "6",
       "--batch-size", "3", "--out", d / "decoder.table.json")
    return d, corpus, fp32


def test_calibrate_tables_cover_every_plan_of_both_recipes(chain):
    d, _, fp32 = chain
    assert (d / "encoder.cache").read_text().startswith("TRT-")
    for kind in KINDS:
        table = json.loads((d / f"{kind}.table.json").read_text())
        a = analyze(fp32[kind])
        assert set(calibration_tensors(a)) <= set(table["tensors"])
        for recipe in ("tensorrt", "onnxruntime"):
            need = required_tensors(a, create_plan(a, "int8", act_matmul="int8"), recipe)
            assert set(need) <= set(table["tensors"]), (kind, recipe)
        assert table["weights"], kind


@pytest.mark.parametrize("recipe, default", [("tensorrt", "int8"), ("tensorrt", "fp16"), ("onnxruntime", "int8")])
def test_quantize_build_bench(chain, recipe, default, capsys):
    d, _, fp32 = chain
    for kind in KINDS:
        capsys.readouterr()
        q = d / f"{kind}.{recipe}.{default}.onnx"
        plan = d / f"{kind}.{recipe}.{default}.plan.json"
        wb("quantize", "--model", fp32[kind], "--table", d / f"{kind}.table.json", "--recipe", recipe,
           "--default-plan", default, "--out", q, "--write-plan", plan)
        report = json.loads(capsys.readouterr().out)
        assert validate(onnx.load(str(q)), json.loads(plan.read_text()), recipe=recipe, original=fp32[kind]) == []
        if recipe == "onnxruntime":
            assert report["ort_mode"] in ("u8s8", "u8s8-rr", "s8s8")
        eng = d / f"{kind}.{recipe}.{default}_engine"
        wb("build", "--model", q, "--kind", kind, "--backend", "onnxruntime", "--out", eng, "--threads", "1",
           "--time", "16:32:64")
        kernels = json.loads((eng / "kernels.json").read_text())
        if default == "int8":
            assert kernels["integer_kernel_total"] > 0, (kind, recipe)
        bench = d / f"{kind}.{recipe}.{default}.bench.json"
        wb("bench", "--engine", eng, "--batch-sizes", "1", "--seq-lens", "16", "--warmup", "0", "--iters", "2",
           "--json", bench, *(["--random-features"] if kind == "encoder" else []))
        rows = json.loads(bench.read_text())["rows"]
        assert rows and rows[0]["median_ms"] > 0
    capsys.readouterr()


def test_check_against_the_fp32_pair(chain, capsys):
    d, corpus, fp32 = chain
    for kind in KINDS:
        wb("quantize", "--model", fp32[kind], "--table", d / f"{kind}.table.json", "--recipe", "onnxruntime",
           "--out", d / f"check.{kind}.onnx")
    capsys.readouterr()
    wb("check", "--encoder", d / "check.encoder.onnx", "--decoder", d / "check.decoder.onnx",
       "--ref-encoder", fp32["encoder"], "--ref-decoder", fp32["decoder"], "--cache", corpus,
       "--json", d / "check.json")
    rows = json.loads((d / "check.json").read_text())
    assert {r["model"] for r in rows} == set(KINDS) and len(rows) == 18
    assert all(np.isfinite(r["max_abs"]) for r in rows)
    assert "decoder" in capsys.readouterr().out


def _files(d):
    return sorted(p.name for p in d.iterdir())


def test_bad_inputs_one_clear_error_and_nothing_written(chain, tmp_path, capsys):
    d, corpus, fp32 = chain
    out = tmp_path / "q.onnx"
    # a decoder table for the encoder
    wb("quantize", "--model", fp32["encoder"], "--table", d / "decoder.table.json", "--out", out, ok=False)
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "another model" in err
    # a plan of another model
    plan = d / "decoder.tensorrt.int8.plan.json"
    if not plan.exists():
        wb("quantize", "--model", fp32["decoder"], "--table", d / "decoder.table.json", "--out", tmp_path / "x.onnx",
           "--write-plan", plan)
    capsys.readouterr()
    wb("quantize", "--model", fp32["encoder"], "--table", d / "encoder.table.json", "--plan", plan, "--out", out,
       ok=False)
    assert "another model" in capsys.readouterr().err
    # a decoder without --encoder
    wb("calibrate", "--model", fp32["decoder"], "--cache", corpus, "--out", tmp_path / "t.json", ok=False)
    assert "--encoder" in capsys.readouterr().err
    assert _files(tmp_path) == (["x.onnx"] if (tmp_path / "x.onnx").exists() else [])


@pytest.mark.parametrize("mutate, message", [
    (lambda f: f.pop("speech_lengths"), "lacks input 'speech_lengths'"),
    (lambda f: f.update(speech=f["speech"].astype(np.float64)), "is float64, the model takes float32"),
    (lambda f: f.update(speech=f["speech"][0]), "has rank 2"),
    (lambda f: f.update(speech=f["speech"][:, :, :40]), "axis 2 is 40, the model fixes it to 80"),
    (lambda f: f.update(extra=np.zeros(1)), "not an input of the model"),
])
def test_data_feeds_are_checked_before_the_pass(chain, tmp_path, capsys, mutate, message):
    _, _, fp32 = chain
    data = tmp_path / "feeds"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        feed = {"speech": rng.normal(size=(2, 40, 80)).astype(np.float32),
                "speech_lengths": np.array([40, 31], np.int32)}
        if i == 2:
            mutate(feed)
        np.savez(data / f"{i:03d}.npz", **feed)
    out = tmp_path / "t.json"
    wb("calibrate", "--model", fp32["encoder"], "--data", data, "--out", out, ok=False)
    err = capsys.readouterr().err
    assert message in err and "002.npz" in err and err.count("\n") == 1
    assert not out.exists()


def test_data_feeds_calibrate_any_model(chain, tmp_path, capsys):
    """`--data` alone calibrates: the same table as the corpus path gives for the same batches."""
    _, _, fp32 = chain
    data = tmp_path / "feeds"
    data.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        np.savez(data / f"{i}.npz", speech=rng.normal(10, 2, size=(2, 48, 80)).astype(np.float32),
                 speech_lengths=np.array([48, 40], np.int32))
    wb("calibrate", "--model", fp32["encoder"], "--data", data, "--out", tmp_path / "t.json")
    table = json.loads((tmp_path / "t.json").read_text())
    assert table["data"]["n_samples"] == 4 and table["data"]["files"] == 2
    assert set(calibration_tensors(analyze(fp32["encoder"]))) <= set(table["tensors"])
