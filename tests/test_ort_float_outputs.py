"""The onnxruntime recipe's `ort_float_outputs` (graph.placement): which int8 MatMuls keep a float output (ORT's
MatMulIntegerToFloat) instead of the quantized output ORT's quantizer gives every int8 node. Hand-built block
(tests/test_graph_rules.py) and the tiny WeNet encoder/decoder (every stage keeps working for that task), plus the
config key and the workspace's model tags."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from core.errors import WorkbenchError
from graph.analysis import analyze
from graph.calib import observe_amax
from core.host import cpu_info
from graph.placement import ORT_FLOAT_OUTPUTS, float_output_nodes, ort_mode_for, quantize, required_tensors
from graph.plan import create_plan
from graph.validate import validate
from test_graph_rules import block_model

RNG = np.random.default_rng(1)
# the mode the workbench picks for this CPU: full 8-bit U8S8 saturates in int16 on an AVX2-only one (no VNNI)
MODE = ort_mode_for(cpu_info())


def _quantized_tensors(m):
    return {n.input[0] for n in m.graph.node if n.op_type == "QuantizeLinear"}


def _sess(m, opt_path=None, fused=True):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if not fused:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if opt_path:
        so.optimized_model_filepath = str(opt_path)
    data = m.SerializeToString() if isinstance(m, onnx.ModelProto) else str(m)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def block():
    m = block_model()
    # batch and time axes dynamic, as in a transformer export: with a fully static input ORT 1.32 first fuses
    # MatMul + bias Add into a float Gemm (MatMulAddFusion), and a float-output MatMul loses its integer kernel
    for d, name in zip(m.graph.input[0].type.tensor_type.shape.dim, ("B", "T")):
        d.dim_param = name
    feeds = [{"x": RNG.normal(size=(2, 8, 16)).astype(np.float32)} for _ in range(3)]
    return m, observe_amax(m, feeds), feeds


def test_which_outputs_stay_float(block, tmp_path):
    m, table, feeds = block
    a = analyze(m)
    plan = create_plan(a, "int8")
    assert float_output_nodes(a, plan, "none") == set()
    assert float_output_nodes(a, plan, "residual") == {"ff/w_2/MatMul"}  # its output feeds the residual Add
    assert float_output_nodes(a, plan, "matmul") == {"ff/w_1/MatMul", "ff/w_2/MatMul"}  # the Gemm is no MatMul
    # a float output needs no range of its own
    assert "o" in required_tensors(a, plan, "onnxruntime") and "o" not in required_tensors(a, plan, "onnxruntime",
                                                                                            "residual")
    ref = _sess(m).run(None, feeds[0])
    got = {}
    for which in ORT_FLOAT_OUTPUTS:
        res = quantize(m, table, plan, recipe="onnxruntime", ort_mode=MODE, ort_float_outputs=which)
        q = _quantized_tensors(res.model)
        assert ("o" in q) == (which == "none") and ("h" in q) == (which != "matmul")
        assert any(t.startswith("gm") for t in q)  # Gemm/Conv outputs keep their Q/DQ: ORT has no integer Gemm with a float output
        assert res.report.get("float_output_nodes", 0) == {"none": 0, "residual": 1, "matmul": 2}[which]
        onnx.checker.check_model(res.model, full_check=True)
        assert validate(res.model, res.plan, recipe="onnxruntime", original=m) == []
        # every int8 MatMul is still an integer kernel once ORT fuses the graph
        opt = tmp_path / f"{which}.onnx"
        _sess(res.model, opt)
        ops = [n.op_type for n in onnx.load(str(opt)).graph.node]
        assert ops.count("QLinearMatMul") + ops.count("MatMulIntegerToFloat") >= 2, (which, ops)
        if which != "none":
            assert ops.count("MatMulIntegerToFloat") >= len(float_output_nodes(a, plan, which))
        out = _sess(res.model, fused=False).run(None, feeds[0])  # the graph's own Q/DQ arithmetic
        got[which] = [np.abs(o - r).max() / np.abs(r).max() for o, r in zip(out, ref)]
        assert max(got[which]) < 0.1, (which, got[which])
    assert float_output_nodes(a, create_plan(a, "fp32"), "matmul") == set()  # only int8 nodes


def _unfold(m):
    """The graph with each folded bias taken out of its MatMulIntegerToFloat into an Add after it (the form ORT's
    own fusion leaves): the reference the fold must compute exactly."""
    m = onnx.ModelProto.FromString(m.SerializeToString())
    for n in [n for n in m.graph.node if n.op_type == "MatMulIntegerToFloat" and len(n.input) == 7]:
        bias, out = n.input[6], n.output[0]
        del n.input[6]
        n.output[0] = f"{out}_unbiased"
        m.graph.node.insert(list(m.graph.node).index(n) + 1,
                            onnx.helper.make_node("Add", [n.output[0], bias], [out], name=f"{n.name}_bias"))
    return m


def test_bias_add_folds_into_the_integer_gemm(block):
    """graph.matmul_bias: a float-output int8 MatMul and its bias Add become one MatMulIntegerToFloat with the bias
    (named as the plan's node, a calibrated a_scale), computing what MatMulIntegerToFloat + Add computes; outputs
    that stay quantized keep their Add; the tensorrt recipe's validator names the foreign op."""
    m, table, feeds = block
    a = analyze(m)
    plan = create_plan(a, "int8")
    for which, folded in (("none", set()), ("residual", {"ff/w_2/MatMul"}),
                          ("matmul", {"ff/w_1/MatMul", "ff/w_2/MatMul"})):
        res = quantize(m, table, plan, recipe="onnxruntime", ort_mode=MODE, ort_float_outputs=which)
        fused = {n.name: n for n in res.model.graph.node if n.op_type == "MatMulIntegerToFloat"}
        assert set(fused) == folded and res.report.get("bias_folded_nodes", 0) == len(folded), (which, fused)
        assert all(len(n.input) == 7 and n.input[6] in ("b1", "b2") for n in fused.values())
        adds = {n.name for n in res.model.graph.node if n.op_type == "Add"}
        assert {"ff/w_1/Add", "ff/w_2/Add"} & adds == {"ff/w_1/Add", "ff/w_2/Add"} - {
            f.replace("MatMul", "Add") for f in folded}
        assert validate(res.model, res.plan, recipe="onnxruntime", original=m) == []
        if folded:
            ref = _sess(_unfold(res.model), fused=False).run(None, feeds[0])
            got = _sess(res.model, fused=False).run(None, feeds[0])
            assert all(np.allclose(g, r, rtol=1e-6, atol=1e-6) for g, r in zip(got, ref)), which
            problems = validate(res.model, res.plan, recipe="tensorrt", original=m)
            assert sum("MatMulIntegerToFloat" in p for p in problems) == len(folded), problems


def test_fp32_nodes_and_bad_values(block):
    m, table, _ = block
    a = analyze(m)
    plan = create_plan(a, "int8", exclude=["ff/w_2"])
    res = quantize(m, table, plan, recipe="onnxruntime", ort_float_outputs="residual")
    assert res.report["float_output_nodes"] == 0 and "o" not in _quantized_tensors(res.model)
    with pytest.raises(WorkbenchError, match="ort_float_outputs 'some'"):
        quantize(m, table, plan, recipe="onnxruntime", ort_float_outputs="some")
    # the tensorrt recipe ignores it (its int8 nodes never quantize their outputs)
    t1 = quantize(m, table, plan, recipe="tensorrt").model
    t2 = quantize(m, table, plan, recipe="tensorrt", ort_float_outputs="matmul").model
    assert t1.SerializeToString() == t2.SerializeToString()


def test_wenet_graphs_with_float_outputs(tiny_onnx, tiny_model):
    """The WeNet-style encoder and decoder place, validate and stay accurate with each setting."""
    from models.export import DECODER_INPUTS, dummy_decoder_inputs, dummy_encoder_inputs

    x, lens = dummy_encoder_inputs(2, 120, seed=0)
    cases = [(tiny_onnx[0], [{"speech": x.numpy(), "speech_lengths": lens.numpy()}]),
             (tiny_onnx[1], [dict(zip(DECODER_INPUTS, [t.numpy() for t in dummy_decoder_inputs(tiny_model, seed=0)]))])]
    for path, feeds in cases:
        table = observe_amax(path, feeds)
        a = analyze(path)
        plan = create_plan(a, "int8")
        ref = _sess(path).run(None, feeds[0])[0]
        for which in ("residual", "matmul"):
            res = quantize(path, table, plan, recipe="onnxruntime", ort_float_outputs=which)
            assert res.report["float_output_nodes"] == len(float_output_nodes(a, plan, which)) > 0
            assert validate(res.model, res.plan, recipe="onnxruntime", original=path) == []
            out = _sess(res.model, fused=False).run(None, feeds[0])[0]
            assert np.abs(out - ref).max() / np.abs(ref).max() < 0.06, (path, which)


def test_config_key_and_model_tags(tmp_path):
    from pipeline.config import load_config

    assert load_config()["quantize"]["ort_float_outputs"] == "none"
    bad = tmp_path / "bad.toml"
    bad.write_text('[quantize]\nort_float_outputs = "outputs"\n')
    with pytest.raises(WorkbenchError, match="ort_float_outputs"):
        load_config(bad)
    ok = tmp_path / "ok.toml"
    ok.write_text('[quantize]\nort_float_outputs = "residual"\n')
    assert load_config(ok)["quantize"]["ort_float_outputs"] == "residual"
