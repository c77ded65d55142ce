"""graph/: analysis, plans and TensorRT placement rules on small hand-built graphs."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph.analysis import analyze, assign_node_names
from graph.placement import quantize
from graph.plan import create_plan, diff_plans, edit_plan, load_plan, save_plan, validate_plan
from graph.validate import check_or_raise, validate
from core.errors import WorkbenchError

F = TensorProto.FLOAT
RNG = np.random.default_rng(0)


def _w(name, *shape):
    return numpy_helper.from_array(RNG.normal(size=shape).astype(np.float32), name)


def _model(nodes, inits, inputs, outputs, opset=13):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _vi(name, *shape):
    return helper.make_tensor_value_info(name, F, list(shape))


def block_model(opset=13):
    """x[2,8,16] -> LayerNorm (decomposed) -> MatMul W1[16,32] -> +b -> SiLU -> MatMul W2[32,16] -> +b -> + x
    (residual) -> Softmax; plus Gemm(transB) and an activation MatMul."""
    n = [
        helper.make_node("ReduceMean", ["x"], ["m"], name="ln/ReduceMean", axes=[-1]),
        helper.make_node("Sub", ["x", "m"], ["d"], name="ln/Sub"),
        helper.make_node("Pow", ["d", "two"], ["p"], name="ln/Pow"),
        helper.make_node("ReduceMean", ["p"], ["v"], name="ln/ReduceMean_1", axes=[-1]),
        helper.make_node("Add", ["v", "eps"], ["ve"], name="ln/Add"),
        helper.make_node("Sqrt", ["ve"], ["s"], name="ln/Sqrt"),
        helper.make_node("Div", ["d", "s"], ["nx"], name="ln/Div"),
        helper.make_node("Mul", ["nx", "g"], ["ng"], name="ln/Mul"),
        helper.make_node("Add", ["ng", "b"], ["ln"], name="ln/Add_1"),
        helper.make_node("MatMul", ["ln", "W1"], ["h"], name="ff/w_1/MatMul"),
        helper.make_node("Add", ["b1", "h"], ["hb"], name="ff/w_1/Add"),
        helper.make_node("Sigmoid", ["hb"], ["sg"], name="ff/act/Sigmoid"),
        helper.make_node("Mul", ["hb", "sg"], ["a"], name="ff/act/Mul"),
        helper.make_node("MatMul", ["a", "W2"], ["o"], name="ff/w_2/MatMul"),
        helper.make_node("Add", ["b2", "o"], ["ob"], name="ff/w_2/Add"),
        helper.make_node("Add", ["x", "ob"], ["r"], name="res/Add"),
        helper.make_node("Reshape", ["r", "shape2d"], ["r2"], name="flat"),
        helper.make_node("Gemm", ["r2", "WG", "bG"], ["gm"], name="gemm/Gemm", transB=1),
        helper.make_node("Transpose", ["r"], ["rt"], name="att/T", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["r", "rt"], ["qk"], name="att/MatMul"),
        helper.make_node("Softmax", ["qk"], ["y"], name="att/Softmax", axis=-1),
    ]
    inits = [_w("W1", 16, 32), _w("W2", 32, 16), _w("b1", 32), _w("b2", 16), _w("g", 16), _w("b", 16),
             _w("WG", 12, 16), _w("bG", 12),
             numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
             numpy_helper.from_array(np.array([16, 16], np.int64), "shape2d")]
    return _model(n, inits, [_vi("x", 2, 8, 16)], [_vi("y", 2, 8, 8), _vi("gm", 16, 12)], opset)


def conv_model():
    """Conv (full) -> Relu -> depthwise Conv -> Conv, where the second conv's output is added back."""
    n = [helper.make_node("Conv", ["x", "Wc", "bc"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
         helper.make_node("Conv", ["r1", "Wd"], ["c2"], name="dw", group=8, pads=[1, 1, 1, 1]),
         helper.make_node("Conv", ["c2", "Wp"], ["c3"], name="pw"),
         helper.make_node("Add", ["c3", "r1"], ["y"], name="res")]
    return _model(n, [_w("Wc", 8, 3, 3, 3), _w("bc", 8), _w("Wd", 8, 1, 3, 3), _w("Wp", 8, 8, 1, 1)],
                  [_vi("x", 1, 3, 6, 6)], [_vi("y", 1, 8, 6, 6)])


def table_for(m, feeds):
    from graph.calib import observe_amax
    return observe_amax(m, feeds)


def _x(shape):
    return np.random.default_rng(1).normal(size=shape).astype(np.float32)


def _nodes_by_out(m):
    return {o: n for n in m.graph.node for o in n.output}


def test_analysis_kinds_axes_and_patterns():
    a = analyze(block_model())
    kinds = {q.id: (q.kind, q.weight_axis) for q in a.quantizable}
    assert kinds == {"ff/w_1/MatMul": ("linear", 1), "ff/w_2/MatMul": ("linear", 1),
                     "gemm/Gemm": ("linear", 0), "att/MatMul": ("act_matmul", None)}
    pk = {p.kind for p in a.patterns}
    assert {"layernorm", "silu", "softmax", "residual_add"} <= pk
    ln = a.patterns_of("layernorm")[0]
    assert len(ln.nodes) == 9
    res = a.patterns_of("residual_add")[0]
    assert res.gemm == "ff/w_2/MatMul" and res.residual_input == "x"
    assert "ff/w_1/MatMul" in [q.id for q in a.quantizable if ln.id in q.patterns]
    c = analyze(conv_model())
    assert {q.id: (q.kind, q.weight_axis) for q in c.quantizable} == {
        "c1": ("conv", 0), "dw": ("depthwise_conv", 0), "pw": ("conv", 0)}
    assert c.patterns_of("residual_add")[0].residual_input == "r1"
    # native LayerNormalization (opset 17)
    n = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["l"], name="ln", axis=-1),
         helper.make_node("MatMul", ["l", "W"], ["y"], name="mm")]
    m17 = _model(n, [_w("g", 4), _w("b", 4), _w("W", 4, 3)], [_vi("x", 2, 4)], [_vi("y", 2, 3)], 17)
    a17 = analyze(m17)
    assert a17.patterns_of("layernorm")[0].nodes == ["ln"] and a17.quantizable[0].patterns == ["ln"]


def test_weight_behind_transpose_and_unnamed_nodes():
    n = [helper.make_node("Transpose", ["Wt"], ["W"], perm=[1, 0]),
         helper.make_node("MatMul", ["x", "W"], ["y"])]
    m = _model(n, [_w("Wt", 3, 4)], [_vi("x", 2, 4)], [_vi("y", 2, 3)])
    a = analyze(m)
    assert a.ids == ["MatMul_0"] and a.quantizable[0].weight_shape == [4, 3]
    assert assign_node_names(m) == 2 and [x.name for x in m.graph.node] == ["Transpose_0", "MatMul_0"]
    x = _x((2, 4))
    res = quantize(m, {"x": float(np.abs(x).max())}, recipe="tensorrt")
    check_or_raise(res.model, res.plan)
    dq = [k for k in res.model.graph.node if k.op_type == "DequantizeLinear" and k.input[0].endswith("_quantized")]
    assert len(dq) == 1 and dq[0].attribute[0].i == 1
    assert not any(k.op_type == "Transpose" for k in res.model.graph.node)  # folded into the int8 weight
    ref = x @ numpy_helper.to_array(m.graph.initializer[0]).T
    got = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.03


def _qdq_on(m, tensor):
    """The (Q, DQ) pair quantizing `tensor`, or None."""
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] == tensor:
            return n
    return None


def test_tensorrt_rules_transformer_block():
    m = block_model()
    x = _x((2, 8, 16))
    table = table_for(m, [{"x": x}])
    plan = create_plan(analyze(m), "int8", act_matmul="int8")
    res = quantize(m, table, plan, recipe="tensorrt")
    q = res.model
    onnx.checker.check_model(q, full_check=True)
    onnx.shape_inference.infer_shapes(q, strict_mode=True)
    assert validate(q, res.plan, original=m) == []
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    prod = _nodes_by_out(q)
    byname = {n.name: n for n in q.graph.node}
    for n in q.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            s, z = inits[n.input[1]], inits[n.input[2]]
            assert z.dtype == np.int8 and not z.any() and (s > 0).all() and np.isfinite(s).all()
    # per-channel weights: MatMul [K,N] axis 1, Gemm transB axis 0; 1-D scale with the axis length
    for nid, axis, length in [("ff/w_1/MatMul", 1, 32), ("ff/w_2/MatMul", 1, 16), ("gemm/Gemm", 0, 12)]:
        dq = prod[byname[nid].input[1]]
        assert dq.op_type == "DequantizeLinear" and helper.get_attribute_value(dq.attribute[0]) == axis
        assert inits[dq.input[0]].dtype == np.int8 and inits[dq.input[1]].shape == (length,)
        assert prod[byname[nid].input[0]].op_type == "DequantizeLinear"  # activation per-tensor
        assert inits[prod[byname[nid].input[0]].input[1]].shape == ()
    # residual Add: the residual input x is quantized, the GEMM branch is not (fusion), no output Q/DQ
    add = byname["res/Add"]
    assert prod[add.input[0]].op_type == "DequantizeLinear" and prod[add.input[1]].op_type == "Add"
    assert _qdq_on(q, "ob") is None and _qdq_on(q, "y") is None and _qdq_on(q, "gm") is None
    # LayerNorm and Softmax inputs untouched; x still feeds the LayerNorm directly
    assert byname["ln/ReduceMean"].input[0] == "x" and byname["ln/Sub"].input[0] == "x"
    assert byname["att/Softmax"].input[0] == "qk"
    # activation MatMul: both inputs through DQ
    assert all(prod[i].op_type == "DequantizeLinear" for i in byname["att/MatMul"].input)
    # counts: 3 weighted + act matmul: weights 3 DQ; activation Q: ln, a, r2, r, rt, + residual x = 6
    assert res.report == {"recipe": "tensorrt", "plan_hash": res.plan["hash"], "activation_qdq": 6,
                          "weight_dq": 3, "residual_qdq": 1}
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    rel = np.linalg.norm(got[1] - ref[1]) / np.linalg.norm(ref[1])
    assert rel < 0.05, rel


def test_tensorrt_rules_conv_and_partial_plan():
    m = conv_model()
    x = _x((1, 3, 6, 6))
    table = table_for(m, [{"x": x}])
    a = analyze(m)
    plan = edit_plan(create_plan(a, "int8"), {"dw": "fp32"})
    res = quantize(m, table, plan)
    assert validate(res.model, res.plan, original=m) == []
    q = res.model
    prod, byname = _nodes_by_out(q), {n.name: n for n in q.graph.node}
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    for nid in ("c1", "pw"):
        dq = prod[byname[nid].input[1]]
        assert helper.get_attribute_value(dq.attribute[0]) == 0 and inits[dq.input[1]].shape == (8,)
    assert byname["dw"].input[0] == "r1" and byname["dw"].input[1] == "Wd"  # fp32 node left alone
    assert byname["c1"].input[2] == "bc"  # bias stays FP32
    # residual: the Add's r1 input quantized; r1 also feeds fp32 dw unquantized (shared tensor)
    assert prod[byname["res"].input[1]].op_type == "DequantizeLinear"


def test_plan_create_edit_diff_roundtrip(tmp_path):
    a = analyze(block_model())
    p = create_plan(a, "int8")
    assert p["nodes"]["att/MatMul"] == "fp32" and p["nodes"]["ff/w_1/MatMul"] == "int8"
    assert p["model"] == {"sha256": a.fingerprint, "quantizable": 4} and len(p["hash"]) == 64
    p2 = edit_plan(p, pattern=r"^ff/", precision="fp16")
    assert p2["nodes"]["ff/w_2/MatMul"] == "fp16" and p2["hash"] != p["hash"]
    d = diff_plans(p, p2)
    assert d["changed"] == {"ff/w_1/MatMul": ["int8", "fp16"], "ff/w_2/MatMul": ["int8", "fp16"]}
    save_plan(p2, tmp_path / "p.json")
    assert load_plan(tmp_path / "p.json", a) == p2
    assert create_plan(a, "int8")["hash"] == p["hash"]  # stable
    # options that change the placed graph change the hash; a stored default equals an absent one
    assert create_plan(a, "int8", residual_add=False)["hash"] != p["hash"]
    assert create_plan(a, "int8", fp16_overflow_threshold=1000.0)["hash"] != p["hash"]
    assert create_plan(a, "int8", residual_add=True)["hash"] == p["hash"]
    bare = {k: v for k, v in p.items() if k not in ("options", "hash")}
    assert validate_plan(bare, a)["hash"] == p["hash"]
    assert create_plan(conv_model and analyze(conv_model()), "fp32", exclude_first_conv=True)["nodes"]["c1"] == "fp32"
    assert create_plan(analyze(conv_model()), "int8", exclude_first_conv=True)["nodes"]["c1"] == "fp32"
    with pytest.raises(WorkbenchError, match="no node 'nope'"):
        edit_plan(p, {"nope": "int8"})
    with pytest.raises(WorkbenchError, match="matches no node"):
        edit_plan(p, pattern="zzz", precision="int8")


def test_bad_inputs_raise_one_clear_error(tmp_path):
    m = block_model()
    x = _x((2, 8, 16))
    table = table_for(m, [{"x": x}])
    a = analyze(m)
    out = tmp_path / "q.onnx"
    bad = create_plan(a, "int8")
    bad["nodes"]["ghost/MatMul"] = "int8"
    with pytest.raises(WorkbenchError, match="ghost/MatMul"):
        quantize(m, table, bad, out=out)
    bad = create_plan(a, "int8")
    bad["nodes"]["att/Softmax"] = "int8"
    with pytest.raises(WorkbenchError, match="att/Softmax.*Softmax"):
        quantize(m, table, bad, out=out)
    other = create_plan(analyze(conv_model()), "int8")
    with pytest.raises(WorkbenchError, match="another model"):
        quantize(m, table, {**other, "nodes": {}}, out=out)
    partial = {k: v for k, v in table.items() if k != "a"}
    with pytest.raises(WorkbenchError, match="'a'.*ff/w_2/MatMul"):
        quantize(m, partial, out=out)
    m12 = block_model(opset=12)
    with pytest.raises(WorkbenchError, match="opset 12"):
        quantize(m12, table, out=out)
    with pytest.raises(WorkbenchError, match="unknown recipe"):
        quantize(m, table, recipe="tflite", out=out)
    with pytest.raises(WorkbenchError, match="precision 'int4'"):
        validate_plan({**create_plan(a), "default": "int4"}, a)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_validator_catches_violations():
    m = conv_model()
    x = _x((1, 3, 6, 6))
    res = quantize(m, table_for(m, [{"x": x}]))
    q = onnx.ModelProto.FromString(res.model.SerializeToString())
    for i in q.graph.initializer:
        if i.name.endswith("_zero_point") and i.name.startswith("r1"):
            i.CopyFrom(numpy_helper.from_array(np.array(3, np.int8), i.name))
        if i.name == "Wp_weight_scale":
            i.CopyFrom(numpy_helper.from_array(np.full(4, 0.1, np.float32), i.name))
    probs = validate(q, res.plan)
    assert any("zero point" in p and "r1" in p for p in probs)
    assert any("per-channel scale length 4" in p for p in probs)
    # plan says int8 but the model is unquantized
    probs = validate(m, res.plan)
    assert any("int8 node 'c1'" in p for p in probs)
    with pytest.raises(WorkbenchError, match="c1|r1|Wp"):
        check_or_raise(q, res.plan)
