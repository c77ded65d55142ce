"""TensorRT-RTX (backend tensorrt-rtx): real TensorRT parsing and building on CPU, ahead of time for SM89.

Needs the `tensorrt-rtx` extra. Without it these tests skip on a developer's machine, but fail in CI (CI set),
where tools/bootstrap.sh installs it: the agreement of our validator with a real TensorRT parser and builder
must not silently stop being checked. The error paths (RTX missing, no GPU) run everywhere.
"""
import copy
import json
import os
import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import engines
from engines import trt_backend
from engines.trt_backend import RTX
from graph.analysis import analyze
from graph.placement import quantize
from graph.plan import create_plan
from graph.validate import validate
from core.errors import WorkbenchError

from test_graph_rules import _x, block_model, table_for

SM = [89]


@pytest.fixture(scope="module")
def rtx():
    ok, why = RTX.available()
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"CI must check Q/DQ graphs with TensorRT-RTX, but it is missing: {why}")
        pytest.skip(f"TensorRT-RTX is not installed ({why}); pip install '.[tensorrt-rtx]'")
    return RTX


def _rtx_verdict(path) -> str:
    """"" when TensorRT-RTX parses and builds the model (static shapes) for SM89, else its first error."""
    try:
        plan, _ = RTX.build_plan(path, None, {"compute_capabilities": SM})
    except WorkbenchError as e:
        return str(e)
    assert len(plan) > 0
    return ""


# ------------------------------------------------------------------ good and bad Q/DQ graphs

def _inits(q):
    return {i.name: i for i in q.graph.initializer}


def _set(q, name, arr):
    next(i for i in q.graph.initializer if i.name == name).CopyFrom(numpy_helper.from_array(arr, name))


def _node(q, op, pred=lambda n: True):
    return next(n for n in q.graph.node if n.op_type == op and pred(n))


def _act_pair(q):
    """The first activation Q and its DQ (the LayerNorm output's pair, read by ff/w_1/MatMul)."""
    qn = _node(q, "QuantizeLinear")
    return qn, _node(q, "DequantizeLinear", lambda d: d.input[0] == qn.output[0])


def zero_point_3(q, m):
    qn, _ = _act_pair(q)
    _set(q, qn.input[2], np.full_like(numpy_helper.to_array(_inits(q)[qn.input[2]]), 3))


def negative_scale(q, m):
    qn, _ = _act_pair(q)
    _set(q, qn.input[1], -numpy_helper.to_array(_inits(q)[qn.input[1]]))


def zero_scale(q, m):
    qn, _ = _act_pair(q)
    _set(q, qn.input[1], 0 * numpy_helper.to_array(_inits(q)[qn.input[1]]))


def fp16_scale(q, m):  # an FP16 scale on an FP32 tensor
    qn, _ = _act_pair(q)
    _set(q, qn.input[1], numpy_helper.to_array(_inits(q)[qn.input[1]]).astype(np.float16))


def uint8_zero_point(q, m):  # ONNX Runtime's activation convention, zero point 0
    qn, dq = _act_pair(q)
    q.graph.initializer.append(numpy_helper.from_array(np.zeros((), np.uint8), "zp_u8"))
    qn.input[2] = dq.input[2] = "zp_u8"


def no_zero_point(q, m):  # the type defaults to uint8
    qn, dq = _act_pair(q)
    del qn.input[2], dq.input[2]


def per_channel_wrong_axis(q, m):  # W1 [16, 32]: 32 scales, declared on axis 0
    dq = _node(q, "DequantizeLinear", lambda d: d.input[0] in _inits(q) and d.output[0] in
               _node(q, "MatMul", lambda n: n.name == "ff/w_1/MatMul").input)
    next(a for a in dq.attribute if a.name == "axis").i = 0


def weight_without_dq(q, m):  # ff/w_1/MatMul is int8 in the plan but reads its FP32 weight
    _node(q, "MatMul", lambda n: n.name == "ff/w_1/MatMul").input[1] = "W1"
    q.graph.initializer.append(next(i for i in m.graph.initializer if i.name == "W1"))


def layernorm_input_qdq(q, m):  # a Q/DQ pair of its own on x, read by the LayerNorm only
    qx = _node(q, "QuantizeLinear", lambda n: n.input[0] == "x")
    dx = _node(q, "DequantizeLinear", lambda d: d.input[0] == qx.output[0])
    pair = [helper.make_node("QuantizeLinear", ["x", qx.input[1], qx.input[2]], ["x_ln_q"], name="ln_in/Q"),
            helper.make_node("DequantizeLinear", ["x_ln_q", dx.input[1], dx.input[2]], ["x_ln_dq"], name="ln_in/DQ")]
    for n in q.graph.node:
        if n.name in ("ln/ReduceMean", "ln/Sub"):
            n.input[0] = "x_ln_dq"
    nodes = pair + [copy.deepcopy(n) for n in q.graph.node]
    del q.graph.node[:]
    q.graph.node.extend(nodes)


def fp16_layernorm(q, m):  # the FP16 graph without its FP32 LayerNorm island: LN computes in FP16
    cast_x = _node(q, "Cast", lambda n: n.input[0] == "x")
    cast_ln = _node(q, "Cast", lambda n: n.input[0] == "ln")
    for n in q.graph.node:
        if n.name in ("ln/ReduceMean", "ln/Sub"):
            n.input[0] = cast_x.output[0]
        n.input[:] = ["ln" if t == cast_ln.output[0] else t for t in n.input]
    for name in ("two", "eps", "g", "b"):
        _set(q, name, numpy_helper.to_array(_inits(q)[name]).astype(np.float16))
    nodes = [cast_x] + [n for n in q.graph.node if n is not cast_x and n is not cast_ln]
    nodes = [copy.deepcopy(n) for n in nodes]
    del q.graph.node[:]
    q.graph.node.extend(nodes)


def fp16_missing_cast(q, m):  # FP32 LayerNorm output into an FP16 MatMul, no Cast between
    cast_ln = _node(q, "Cast", lambda n: n.input[0] == "ln")
    for n in q.graph.node:
        n.input[:] = ["ln" if t == cast_ln.output[0] else t for t in n.input]
    q.graph.node.remove(cast_ln)


# name: (base graph, mutation, ours rejects, RTX rejects, why they differ or None). Base graphs: "int8" = the
# block model all-INT8 (activation MatMul too) by our tensorrt recipe, "fp16" = the FP16-typed graph of the
# same recipe (LayerNorm an FP32 island).
CASES = {
    "int8 as placed": ("int8", None, False, False, None),
    "fp16 as placed (FP32 LayerNorm island)": ("fp16", None, False, False, None),
    "zero point 3": ("int8", zero_point_3, True, True, None),
    "negative scale": ("int8", negative_scale, True, True, None),
    "zero scale": ("int8", zero_scale, True, True, None),
    "fp16 scale on an fp32 tensor": ("int8", fp16_scale, True, True, None),
    "per-channel scale on the wrong axis": ("int8", per_channel_wrong_axis, True, True, None),
    "fp16 graph missing a Cast": ("fp16", fp16_missing_cast, True, True, None),
    "uint8 zero point (0)": ("int8", uint8_zero_point, True, False,
                             "RTX 1.7's parser takes UINT8 Q/DQ with zero point 0; our recipe is TensorRT's "
                             "documented explicit quantization, signed INT8 symmetric (a uint8 range with zero "
                             "point 0 would clip every negative activation)"),
    "no zero point (uint8 by default)": ("int8", no_zero_point, True, False, "as for the uint8 zero point"),
    "weight without DQ on an int8 node": ("int8", weight_without_dq, True, False,
                                          "a legal graph (TensorRT runs that MatMul in float), but not the plan: "
                                          "the plan says int8, so our validator calls it a placement error"),
    "Q/DQ on a LayerNorm input": ("int8", layernorm_input_qdq, True, False,
                                  "legal for TensorRT; our recipe keeps LayerNorm float (no Q/DQ there)"),
    "fp16 graph with LayerNorm in FP16": ("fp16", fp16_layernorm, True, False,
                                          "a legal FP16 graph; our recipe keeps LayerNorm an FP32 island "
                                          "(its variance overflows/underflows in FP16)"),
}


@pytest.fixture(scope="module")
def base_graphs():
    m = block_model()
    table = table_for(m, [{"x": _x((2, 8, 16))}])
    int8 = quantize(m, table, create_plan(analyze(m), "int8", act_matmul="int8"), recipe="tensorrt")
    fp16 = quantize(m, table, recipe="tensorrt", default_plan="fp16")
    return m, {"int8": int8, "fp16": fp16}


@pytest.mark.parametrize("name", list(CASES))
def test_validator_and_rtx_agree_or_say_why(rtx, base_graphs, tmp_path, name):
    base, mutate, ours_rejects, rtx_rejects, why = CASES[name]
    m, placed = base_graphs
    q = copy.deepcopy(placed[base].model)
    if mutate:
        mutate(q, m)
    path = tmp_path / "model.onnx"
    onnx.save(q, str(path))
    ours = validate(q, placed[base].plan, "tensorrt", original=m)
    theirs = _rtx_verdict(path)
    assert bool(ours) == ours_rejects, f"our validator on {name!r}: {ours}"
    assert bool(theirs) == rtx_rejects, f"TensorRT-RTX on {name!r}: {theirs or 'built'}"
    assert (why is None) == (ours_rejects == rtx_rejects)  # every disagreement is explained


def test_rtx_names_the_broken_rule(rtx, base_graphs, tmp_path):
    """The issue's observation, kept: RTX's parser refuses a non-zero zero point and a non-positive scale."""
    m, placed = base_graphs
    for mutate, text in ((zero_point_3, "Non-zero zero point is not supported"),
                         (negative_scale, "Scale coefficients must all be positive")):
        q = copy.deepcopy(placed["int8"].model)
        mutate(q, m)
        onnx.save(q, str(tmp_path / "m.onnx"))
        assert text in _rtx_verdict(tmp_path / "m.onnx")


# ------------------------------------------------------------------ engine artifacts

def test_tiny_encoder_and_qdq_encoder_build_with_rtx(rtx, tiny_onnx, tmp_path):
    enc = tiny_onnx[0]
    art = engines.build(enc, None, tmp_path / "fp32", backend="tensorrt-rtx", compute_capabilities=SM)
    plan = art.verified_file("engine")
    meta = json.loads((art.path / "engine.json").read_text())
    assert plan.name == "encoder.plan" and plan.stat().st_size == meta["plan_bytes"] > 100_000
    assert meta["backend"] == "tensorrt-rtx" and meta["options"]["compute_capabilities"] == SM
    assert meta["versions"]["tensorrt-rtx"].startswith("1.7")
    assert meta["shapes"]["speech"] == {"min": [1, 16, 80], "opt": [16, 256, 80], "max": [16, 1024, 80]}
    if not meta["runnable_here"]:  # this workplace: no GPU, so no inspector and a plain reason
        assert meta["why_not_runnable"] and "layers" not in meta["files"]
    again = engines.build(enc, None, tmp_path / "fp32", backend="tensorrt-rtx", compute_capabilities=["sm89"])
    assert again.reused  # content-hash reuse; "sm89" is 89
    other = engines.build(enc, None, tmp_path / "fp32", backend="tensorrt-rtx", compute_capabilities=[80])
    assert not other.reused and other.meta["compute_capabilities"] == [80]

    # the tiny encoder all-INT8 by the tensorrt recipe
    from graph.calib import observe_amax
    from models.export import dummy_encoder_inputs

    speech, lengths = dummy_encoder_inputs(2, 64)
    table = observe_amax(onnx.load(str(enc)), [{"speech": speech.numpy(), "speech_lengths": lengths.numpy()}])
    qdq = quantize(str(enc), table, recipe="tensorrt", out=tmp_path / "encoder.int8.onnx")
    assert validate(qdq.model, qdq.plan, "tensorrt") == []
    art8 = engines.build(tmp_path / "encoder.int8.onnx", None, tmp_path / "int8", backend="tensorrt-rtx",
                         kind="encoder", compute_capabilities=SM)
    assert art8.verified_file("engine").stat().st_size == art8.meta["plan_bytes"] > 0


def test_rtx_engine_without_gpu_explains_itself(rtx, tiny_onnx, tmp_path, capsys):
    ccs, _ = trt_backend.cuda_devices()
    if ccs:
        pytest.skip("a CUDA GPU is visible here")
    from workbench.commands import engines as engines_cmd
    import argparse

    p = argparse.ArgumentParser()
    engines_cmd.register(p.add_subparsers())
    out = tmp_path / "enc"
    args = p.parse_args(["build", "--model", str(tiny_onnx[0]), "--backend", "tensorrt-rtx",
                         "--compute-capability", "89", "--out", str(out)])
    args.func(args)
    printed = capsys.readouterr().out
    assert "built tensorrt-rtx encoder engine" in printed and "for SM89" in printed and "not runnable here" in printed
    args = p.parse_args(["bench", "--engine", str(out), "--random-features"])
    with pytest.raises(WorkbenchError, match=r"cannot run the tensorrt-rtx engine .*\(built for SM89\) here: "
                                             r"no NVIDIA driver"):
        args.func(args)
    with pytest.raises(WorkbenchError, match="name the target GPU.*--compute-capability"):
        engines.build(tiny_onnx[0], None, tmp_path / "x", backend="tensorrt-rtx")


# ------------------------------------------------------------------ error paths that need no RTX

def test_rtx_missing_is_one_clear_error(tiny_onnx, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", None)  # import fails as if not installed
    ok, why = RTX.available()
    assert not ok and "tensorrt-rtx" in why
    with pytest.raises(WorkbenchError, match=r"tensorrt-rtx backend cannot build here.*\[tensorrt-rtx\].*onnxruntime"):
        engines.build(tiny_onnx[0], None, tmp_path / "e", backend="tensorrt-rtx", compute_capabilities=SM)
    assert not (tmp_path / "e").exists()


def test_rtx_options_checked():
    for bad in ([90], ["sm70"], [], ["x"]):
        with pytest.raises(WorkbenchError, match="compute.capabilit"):
            trt_backend._targets(bad)
    assert trt_backend._targets(["8.9", 80, "SM89"]) == [80, 89]
    with pytest.raises(WorkbenchError, match="unknown tensorrt-rtx build options.*timing_cache"):
        RTX.normalize_options({"timing_cache": "x"})


def test_rtx_check_needs_a_run(tmp_path):
    from pipeline.rtx_check import _slug, resolve_run_dir

    with pytest.raises(WorkbenchError, match="neither a run directory nor a published run"):
        resolve_run_dir(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"id": "no-such-run-here"}))
    with pytest.raises(WorkbenchError, match="has no models.json"):
        resolve_run_dir(tmp_path)
    assert _slug("INT8 all (percentile_99.99)") == "int8_all_percentile_99_99"


# ------------------------------------------------------------------ wb rtx-check on a task run

def test_rtx_check_builds_every_graph_of_a_task_run(rtx, tmp_path, capsys):
    """A task run (the generic `onnx` task on tests/test_task_search.py's classifier): graph names from
    models.json, shapes from run.json task.shapes, the user's FP32 graph outside the run (an absolute path), the
    INT8 and selected plans placed again by the tensorrt recipe (the run used onnxruntime's); all of them build."""
    from test_task_search import Classifier, write_config, write_feeds
    import torch
    from workbench.cli import main

    torch.manual_seed(0)
    user = tmp_path / "user"
    user.mkdir()
    torch.onnx.export(Classifier().eval(), (torch.randn(2, 12, 16),), str(user / "classifier.onnx"),
                      input_names=["features"], output_names=["logits"], opset_version=17, dynamo=False,
                      dynamic_axes={"features": {0: "B", 1: "T"}, "logits": {0: "B"}})
    write_feeds(user / "calib", 4, 0)
    write_feeds(user / "eval", 3, 1)
    cfg = write_config(user, "generic.toml")
    run_dir = tmp_path / "runs" / "r1"
    assert main(["search", "--quick", "--config", str(cfg), "--runs-root", str(tmp_path / "runs"),
                 "--run-dir", str(run_dir)]) == 0
    run = json.loads((run_dir / "run.json").read_text())
    models = json.loads((run_dir / "models.json").read_text())
    assert run["recipe"] == "onnxruntime" and run["selected"]
    assert models["FP32"] == {"classifier": str((user / "classifier.onnx").resolve())}  # outside the run
    capsys.readouterr()

    assert main(["rtx-check", "--run", str(run_dir), "--compute-capability", "89"]) == 0
    assert "TensorRT-RTX builds (SM89)" in capsys.readouterr().out
    result = json.loads((run_dir / "rtx_builds.json").read_text())
    start = run["searches"][0]["calibrator"]
    assert [(r["variant"], r["kind"]) for r in result["rows"]] == [
        ("FP32", "classifier"), ("FP16", "classifier"), (f"INT8 all ({start})", "classifier"),
        ("selected", "classifier")]
    assert result["failures"] == [] and result["compute_capability"] == 89
    shapes = run["task"]["shapes"]["classifier"]
    for r in result["rows"]:
        assert r["plan_bytes"] > 0 and "error" not in r, r
        assert r["validator_problems"] == (None if r["variant"] == "FP32" else 0)
        meta = json.loads((run_dir / r["engine"] / "engine.json").read_text())
        assert meta["shapes"] == shapes and meta["kind"] == "generic"  # the run's own shape ranges
        assert meta["options"]["compute_capabilities"] == SM
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows["FP32"]["onnx"] == str((user / "classifier.onnx").resolve())
    assert rows[f"INT8 all ({start})"]["onnx"].startswith("rtx/models/")  # re-placed by the tensorrt recipe
    # the selection (timing decides, so FP16 or FP32 may win on this tiny model): an INT8 mix is placed again by
    # the tensorrt recipe, a float baseline is built as the run wrote it
    assert rows["selected"]["onnx"] == ("rtx/models/selected.classifier.onnx" if run["selected"]["calibrator"]
                                        else "final/classifier.onnx")
    assert "| FP32 | classifier |" in (run_dir / "rtx_builds.md").read_text()
    assert "classifier" in (run_dir / "report.md").read_text()


def test_rtx_check_shapes_and_graphs_of_any_run(tiny_onnx, tmp_path):
    """Without RTX: a task run's graphs and recorded shapes; a WeNet run keeps the pipeline's ranges; a graph
    with neither is one clear error; a models.json path that is not there is named."""
    from pipeline.rtx_check import engine_shapes, graph_names, model_path
    from tasks.wenet_asr import KINDS, PIPELINE_TIME_RANGES

    rng = {"min": [1, 1], "opt": [4, 8], "max": [8, 16]}
    task_run = {"task": {"graphs": ["b", "a"], "shapes": {"a": {"x": rng}}}}
    assert graph_names(task_run, {"FP32": {"a": "x", "b": "y"}}) == ["b", "a"]
    assert graph_names({"task": {}}, {"FP32": {"a": "x"}}) == ["a"]
    assert graph_names({"model": "wenet-small"}, {"FP32": {"encoder": "e"}}) == list(KINDS)
    assert engine_shapes(task_run, "a", tiny_onnx[0]) == ({"x": rng}, "generic")
    enc, kind = engine_shapes({"model": "wenet-small"}, "encoder", tiny_onnx[0])
    assert kind == "encoder" and enc == engines.default_shapes(tiny_onnx[0], "encoder",
                                                               time_range=PIPELINE_TIME_RANGES["encoder"])
    with pytest.raises(WorkbenchError, match="records no engine shapes.*'b'"):
        engine_shapes(task_run, "b", tiny_onnx[0])
    (tmp_path / "m.onnx").write_bytes(b"x")
    models = {"FP32": {"a": str(tmp_path / "m.onnx"), "b": "models/b.onnx"}}
    assert model_path(tmp_path, models, "FP32", "a") == tmp_path / "m.onnx"  # absolute: as written
    with pytest.raises(WorkbenchError, match=r"models/b\.onnx.*does not exist here"):
        model_path(tmp_path, models, "FP32", "b")
    with pytest.raises(WorkbenchError, match="no graph 'c'"):
        model_path(tmp_path, models, "FP32", "c")
