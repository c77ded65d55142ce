"""Per-token input scales of the onnxruntime recipe (`ort_per_token_inputs`, graph.per_token): the rewrite's
arithmetic against a numpy reference, its validation, what it needs from the table, and its refusals."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from core.errors import WorkbenchError
from graph.analysis import analyze
from graph.calib import observe_amax
from core.host import cpu_info
from graph.placement import ort_mode_for, per_token_nodes, quantize, required_tensors
from graph.plan import create_plan
from graph.validate import validate
from pipeline.config import load_config
from test_graph_rules import block_model

RNG = np.random.default_rng(3)
# the mode the workbench picks for this CPU: full 8-bit U8S8 saturates in int16 on an AVX2-only one (no VNNI),
# so the integer-exact checks below would fail there for a reason that is not the rewrite's
MODE = ort_mode_for(cpu_info())
K, N = 64, 24


def _run(m, feeds):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _matmul_model(w, opset=17):
    """x [B, T, K] (dynamic B, T) -> MatMul W -> + bias -> y."""
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc/MatMul"),
         helper.make_node("Add", ["h", "bias"], ["y"], name="fc/Add")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", N])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros(N, np.float32), "bias")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _per_token_reference(x, w, model=None):
    """Each row quantized with its own scale max|row|/127 (uint8, zero point 128), the weight per output channel
    (int8, max|column|/127, or the integers and scales `model`'s MatMulIntegerToFloat holds: 7-bit ones in
    "u8s8-rr"), products summed in integers and scaled back."""
    rows = x.reshape(-1, K).astype(np.float64)
    s = np.abs(rows).max(1, keepdims=True) / 127
    xq = np.clip(np.rint(rows / s), -127, 127)
    if model is None:
        ws = np.abs(w).max(0) / 127
        wq = np.clip(np.rint(w / ws), -128, 127)
    else:
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        mm = next(n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat")
        wq, ws = inits[mm.input[1]].astype(np.float64), inits[mm.input[3]].astype(np.float64)
    return ((xq @ wq) * ws * s).reshape(*x.shape[:-1], N)


def test_per_token_matmul_matches_the_reference_and_beats_one_scale():
    w = RNG.normal(size=(K, N)).astype(np.float32)
    x = (RNG.normal(size=(3, 10, K)) * np.geomspace(0.01, 10, 30).reshape(3, 10, 1)).astype(np.float32)
    m = _matmul_model(w)
    table = observe_amax(m, [{"x": x}])
    a = analyze(m)
    plan = create_plan(a, "int8")
    pt = quantize(m, table, plan, recipe="onnxruntime", ort_mode=MODE, ort_float_outputs="matmul",
                  ort_per_token_inputs="matmul")
    assert pt.report["per_token_nodes"] == 1 and pt.report["ort_per_token_inputs"] == "matmul"
    ops = [(n.op_type, n.domain) for n in pt.model.graph.node]
    assert ("MatMulIntegerToFloat", "com.microsoft") in ops and ("MatMul", "") not in ops
    assert validate(pt.model, pt.plan, "onnxruntime", original=m) == []
    assert any("not in the tensorrt recipe" in p for p in validate(pt.model, pt.plan, "tensorrt"))
    got = _run(pt.model, {"x": x})
    ref = _per_token_reference(x, w, pt.model)
    exact = x @ w
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()  # the same integers, float rounding only
    calibrated = _run(quantize(m, table, plan, recipe="onnxruntime", ort_mode=MODE,
                               ort_float_outputs="matmul").model, {"x": x})
    rel = lambda y: np.linalg.norm(y - exact, axis=-1) / np.linalg.norm(exact, axis=-1)  # noqa: E731
    # rows 100x smaller than the largest lose their bits under one calibrated scale, not under their own (the
    # bound is the weights' resolution: one bit less in "u8s8-rr")
    bound = 0.02 if MODE == "u8s8" else 0.04
    assert rel(got).max() < bound < rel(calibrated).max(), (rel(got).max(), rel(calibrated).max())
    # another batch and sequence length: the scales follow the rows, the shapes the input
    x2 = RNG.normal(size=(1, 4, K)).astype(np.float32)
    assert _run(pt.model, {"x": x2}).shape == (1, 4, N)


def test_per_token_on_a_block_shares_inputs_and_needs_no_range_for_them():
    m = block_model()
    for d, name in zip(m.graph.input[0].type.tensor_type.shape.dim, ("B", "T")):
        d.dim_param = name
    feeds = [{"x": RNG.normal(size=(2, 8, 16)).astype(np.float32)} for _ in range(2)]
    table = observe_amax(m, feeds)
    a = analyze(m)
    plan = create_plan(a, "int8")
    assert per_token_nodes(a, plan, "matmul", "residual") == {"ff/w_2/MatMul"}
    assert per_token_nodes(a, plan, "matmul", "none") == set()
    need = required_tensors(a, plan, "onnxruntime", "matmul", "residual")
    assert "a" not in need and "ln" in need  # w_2's input is computed per token; w_1's still calibrated
    del table["a"]  # so a table without it still places
    res = quantize(m, table, plan, recipe="onnxruntime", ort_mode=MODE, ort_float_outputs="matmul",
                   ort_per_token_inputs="residual")
    assert res.report["per_token_nodes"] == 1
    assert validate(res.model, res.plan, "onnxruntime", original=m) == []
    ref, got = _run(m, feeds[0]), _run(res.model, feeds[0])
    assert np.abs(got - ref).max() < 0.05
    with pytest.raises(WorkbenchError, match="needs those MatMuls' outputs float"):
        quantize(m, table, plan, recipe="onnxruntime", ort_float_outputs="residual", ort_per_token_inputs="matmul")
    with pytest.raises(WorkbenchError, match="nor a regex of node ids"):
        quantize(m, table, plan, recipe="onnxruntime", ort_float_outputs="matmul", ort_per_token_inputs="rows[")


def test_per_token_refuses_an_old_opset_and_a_config_without_float_outputs(tmp_path):
    m = _matmul_model(RNG.normal(size=(K, N)).astype(np.float32), opset=11)
    x = RNG.normal(size=(2, 5, K)).astype(np.float32)
    table = observe_amax(m, [{"x": x}])
    with pytest.raises(WorkbenchError, match="opset >= 13"):
        quantize(m, table, create_plan(analyze(m), "int8"), recipe="onnxruntime", ort_float_outputs="matmul",
                 ort_per_token_inputs="matmul")
    bad = tmp_path / "bad.toml"
    bad.write_text('[quantize]\nort_per_token_inputs = "residual"\n')
    with pytest.raises(WorkbenchError, match="set ort_float_outputs"):
        load_config(bad)
    ok = tmp_path / "ok.toml"
    ok.write_text('[quantize]\nort_float_outputs = "matmul"\nort_per_token_inputs = "residual"\n')
    assert load_config(ok)["quantize"]["ort_per_token_inputs"] == "residual"
    assert load_config()["quantize"]["ort_per_token_inputs"] == "none"


def test_cli_places_per_token_without_the_inputs_ranges(tmp_path, capsys):
    import json

    from cli_helpers import wb

    w = RNG.normal(size=(K, N)).astype(np.float32)
    m = _matmul_model(w)
    model, table, out = tmp_path / "m.onnx", tmp_path / "t.json", tmp_path / "q.onnx"
    onnx.save(m, model)
    table.write_text(json.dumps({"y": 10.0, "h": 10.0}))  # no range for x: the per-token input needs none
    wb("quantize", "--model", model, "--table", table, "--recipe", "onnxruntime", "--ort-mode", MODE,
       "--ort-float-outputs", "matmul", "--ort-per-token-inputs", "matmul", "--out", out)
    report = json.loads(capsys.readouterr().out)
    assert report["per_token_nodes"] == 1
    x = RNG.normal(size=(2, 3, K)).astype(np.float32)
    assert np.abs(_run(onnx.load(out), {"x": x}) - _per_token_reference(x, w, onnx.load(out))).max() < 1e-3
    wb("quantize", "--model", model, "--table", table, "--recipe", "onnxruntime", "--ort-float-outputs", "matmul",
       "--out", tmp_path / "calibrated.onnx", ok=False)  # calibrated inputs need x's range
    assert "x" in capsys.readouterr().err and not (tmp_path / "calibrated.onnx").exists()


def test_per_token_fake_quant_matches_the_placement_and_passes_the_gradient():
    import torch

    from quant.qat import FakeQuant

    w = RNG.normal(size=(K, N)).astype(np.float32)
    x = (RNG.normal(size=(2, 6, K)) * np.geomspace(0.01, 10, 12).reshape(2, 6, 1)).astype(np.float32)
    fq = FakeQuant(3.0, per_token=True)
    wq = FakeQuant(torch.from_numpy(np.abs(w).max(0)), axis=1)
    xt = torch.from_numpy(x).requires_grad_(True)
    y = fq(xt) @ wq(torch.from_numpy(w))
    assert np.abs(y.detach().numpy() - _per_token_reference(x, w)).max() <= 1e-4 * np.abs(y.detach().numpy()).max()
    y.sum().backward()
    assert torch.allclose(xt.grad, torch.from_numpy(wq(torch.from_numpy(w)).detach().numpy().sum(1)).expand_as(xt))
    assert float(fq.amax) == 3.0  # the calibrated range is kept for the table, not used
    with pytest.raises(WorkbenchError, match="only a fixed per-tensor range"):
        fq.learn_range()


def test_a_regex_picks_per_token_nodes_among_the_float_outputs():
    m = block_model()
    a = analyze(m)
    plan = create_plan(a, "int8")
    assert per_token_nodes(a, plan, "matmul", "w_1") == {"ff/w_1/MatMul"}
    assert per_token_nodes(a, plan, "residual", "w_1") == set()  # w_1's output is not float under "residual"
    assert per_token_nodes(a, plan, "matmul", r"ff/w_\d/MatMul$") == {"ff/w_1/MatMul", "ff/w_2/MatMul"}
    with pytest.raises(WorkbenchError, match="nor a regex"):
        per_token_nodes(a, plan, "matmul", "w_(")
    with pytest.raises(WorkbenchError, match="searched among the float-output"):
        per_token_nodes(a, plan, "none", "w_1")
