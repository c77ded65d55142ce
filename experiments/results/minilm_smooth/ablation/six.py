import sys
sys.argv = [sys.argv[0], sys.argv[1], "0.5", "mse"]
src = open("/tmp/m17/smooth_exp.py").read().split("res = {}")[0]
exec(src)
exec("def strip_qdq" + open("/tmp/m17/ablate.py").read().split("def strip_qdq")[1].split("def role")[0])
OUTS = {"none": [], "FFN2": ["output/dense/MatMul_output"], "O+FFN2": ["output/dense/MatMul_output"], "all": ["MatMul_output"]}
def run(tag, m, meth="mse", strips=("none", "FFN2", "all"), fused=False):
    p = f"/tmp/m17/sm_tmp.onnx"; onnx.save(m, p)
    tab = calibrate(p, calib, methods=meth, default_method=meth, progress=False); tab.save("/tmp/m17/t.json")
    for mode in (["u8s8", "u8s8-rr"] if fused else ["u8s8"]):
        q0 = quantize(m, "/tmp/m17/t.json", plan=create_plan(analyze(m), "int8"), recipe="onnxruntime", ort_mode=mode).model
        for s in strips:
            q = strip_qdq(copy.deepcopy(q0), lambda x: not any(o in x for o in OUTS[s]))
            print(f"{tag:30s} {mode} float outputs: {s:6s} exact {ev(q)}" + (f" fused {ev(q, opt=True)}" if fused else ""), flush=True)
    if not fused:
        q = quantize(m, "/tmp/m17/t.json", plan=create_plan(analyze(m), "int8"), recipe="tensorrt").model
        print(f"{tag:30s} tensorrt recipe exact {ev(q)}", flush=True)
run("no smoothing", model, fused=True, strips=("FFN2",))
run("no smoothing", model)
run("LN a=0.5", smooth(model, 0.5, lambda t: "LayerNorm" in t), strips=("FFN2",))
run("LN+GELU a=0.7", smooth(model, 0.7, lambda t: "LayerNorm" in t or "Mul_1" in t), strips=("FFN2",))
