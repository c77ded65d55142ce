import sys
exec(open("/tmp/m17/ablate.py").read().split("out = {}")[0])
from collections import Counter
for fo in ("none", "residual", "matmul"):
    for mode in ("u8s8", "u8s8-rr"):
        pl = quantize(model, tab, plan=plan, recipe="onnxruntime", ort_mode=mode, ort_float_outputs=fo)
        p = f"/tmp/m17/ort_{fo}_{mode}.onnx"; onnx.save(pl.model, p)
        so = ort.SessionOptions(); so.optimized_model_filepath = p + ".opt"
        ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
        c = Counter(n.op_type for n in onnx.load(p + ".opt").graph.node)
        print(fo, mode, pl.report, "exact", ev(p, False), "fused", ev(p, True), {k: c[k] for k in ("QLinearMatMul", "MatMulIntegerToFloat", "MatMul", "FusedMatMul", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")}, flush=True)
