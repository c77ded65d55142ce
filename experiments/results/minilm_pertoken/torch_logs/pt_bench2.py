import time, json, numpy as np, onnx, onnxruntime as ort
from collections import defaultdict
from onnx import helper, TensorProto as TP, numpy_helper as nh
B, T, K, N = 32, 128, 1536, 384
rng = np.random.default_rng(0)
W = rng.standard_normal((K, N)).astype(np.float32) * 0.02
ws = (np.abs(W).max(0) / 127).astype(np.float32)
Wq = np.clip(np.rint(W / ws), -128, 127).astype(np.int8)
x = (rng.standard_normal((B, T, K)) * rng.uniform(0.1, 3, (B, T, 1))).astype(np.float32)
I = lambda a, n: nh.from_array(np.asarray(a), n)
def model(nodes, inits):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TP.FLOAT, ["B", "T", K])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
common = [I(np.array([-1], np.int64), "ax"), I(np.float32(1e-8), "eps"), I(np.float32(1 / 127), "inv127"),
          I(np.float32(128), "f128"), I(np.float32(0), "zero"), I(np.float32(1), "one"), I(np.uint8(128), "z"), I(Wq, "Wq"),
          I(ws, "ws"), I(np.zeros(N, np.int8), "wz"), I(np.int8(0), "wz0")]
scale_nodes = [helper.make_node("ReduceMax", ["x", "ax"], ["mx"], keepdims=1),
               helper.make_node("ReduceMin", ["x", "ax"], ["mn"], keepdims=1),
               helper.make_node("Neg", ["mn"], ["nmn"]), helper.make_node("Max", ["mx", "nmn", "eps"], ["am"]),
               helper.make_node("Mul", ["am", "inv127"], ["s"])]
u8q = [helper.make_node("Mul", ["s", "zero"], ["s0"]), helper.make_node("Add", ["s0", "f128"], ["s128"]),
       helper.make_node("Cast", ["s128"], ["zb"], to=TP.UINT8),
       helper.make_node("QuantizeLinear", ["x", "s", "zb"], ["xq"], axis=-1, block_size=K)]
s8q = [helper.make_node("QuantizeLinear", ["x", "s"], ["xq"], axis=-1, block_size=K, output_dtype=TP.INT8)]
tail_std = lambda zp: [helper.make_node("MatMulInteger", ["xq", "Wq", zp, "wz"], ["yi"]),
                       helper.make_node("Cast", ["yi"], ["yf"], to=TP.FLOAT),
                       helper.make_node("Mul", ["yf", "ws"], ["y1"]), helper.make_node("Mul", ["y1", "s"], ["y"])]
I0 = I(np.int8(0), "z8")
models = {
 "fp32": model([helper.make_node("MatMul", ["x", "W"], ["y"])], [I(W, "W")]),
 "static": model([helper.make_node("QuantizeLinear", ["x", "st", "z"], ["xq"]),
                  helper.make_node("MatMulIntegerToFloat", ["xq", "Wq", "st", "ws", "z", "wz"], ["y"], domain="com.microsoft")],
                 common + [I(np.float32(0.05), "st")]),
 "static_qdq": model([helper.make_node("QuantizeLinear", ["x", "st", "z"], ["xq"]),
                      helper.make_node("DequantizeLinear", ["xq", "st", "z"], ["xd"]),
                      helper.make_node("DequantizeLinear", ["Wq", "ws", "wz"], ["Wd"], axis=1),
                      helper.make_node("MatMul", ["xd", "Wd"], ["y"])], common + [I(np.float32(0.05), "st")]),
 "tok_u8_contrib": model(scale_nodes + u8q + [helper.make_node("MatMulIntegerToFloat", ["xq", "Wq", "one", "ws", "z", "wz"], ["y0"], domain="com.microsoft"),
                                              helper.make_node("Mul", ["y0", "s"], ["y"])], common),
 "tok_u8_std": model(scale_nodes + u8q + tail_std("z"), common),
 "tok_s8_std": model(scale_nodes + s8q + tail_std("z8"), common + [I0]),
}
so = ort.SessionOptions(); so.intra_op_num_threads = 2; so.inter_op_num_threads = 1
so.add_session_config_entry("session.intra_op.allow_spinning", "0")
sess = {k: ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]) for k, m in models.items()}
ref = sess["fp32"].run(None, {"x": x})[0]
for k, s in sess.items():
    y = s.run(None, {"x": x})[0]
    print(k, "rel err", round(float(np.linalg.norm(y - ref) / np.linalg.norm(ref)), 5))
times = {k: [] for k in sess}
for r in range(20):
    for k, s in sess.items():
        t = time.perf_counter(); s.run(None, {"x": x}); times[k].append(time.perf_counter() - t)
for k, v in times.items():
    print(k, f"wall {np.median(v)*1e3:.2f} ms")
for name, m in models.items():
    so2 = ort.SessionOptions(); so2.intra_op_num_threads = 2; so2.inter_op_num_threads = 1; so2.enable_profiling = True; so2.profile_file_prefix = "/tmp/qat17/prof_" + name
    s = ort.InferenceSession(m.SerializeToString(), so2, providers=["CPUExecutionProvider"])
    for _ in range(10): s.run(None, {"x": x})
    ev = [e for e in json.load(open(s.end_profiling())) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    d = defaultdict(list)
    for e in ev: d[e["args"]["op_name"]].append(e["dur"])
    print(name, {k: round(np.median(v) / 1000, 2) for k, v in d.items()}, "sum", round(sum(np.median(v) for v in d.values())/1000, 2))
