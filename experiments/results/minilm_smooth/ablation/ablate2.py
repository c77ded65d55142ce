import sys, json
exec(open("/tmp/m17/ablate.py").read().split("out = {}")[0])
ROLES = {"Q": "self/query/MatMul_output", "K": "self/key/MatMul_output", "V": "self/value/MatMul_output",
         "O": "attention/output/dense/MatMul_output", "FFN1": "intermediate/dense/MatMul_output",
         "FFN2": "output/dense/MatMul_output"}
mode = sys.argv[2] if len(sys.argv) > 2 else "u8s8"
base = onnx.load(f"/tmp/m17/onnxruntime_{mode}.onnx")
outs = [v for v in ROLES.values()]
res = {}
def go(name, keep):
    m = strip_qdq(copy.deepcopy(base), keep)
    p = f"/tmp/m17/abl.onnx"; onnx.save(m, p)
    res[name] = ev(p, opt=False); print(f"{name:50s} {res[name]}", flush=True)
go("ORT recipe, no MatMul-output Q/DQ", lambda t: not any(r in t for r in outs))
for k, r in ROLES.items():
    go(f"ORT recipe, output Q/DQ only on {k}", lambda t, r=r: not any(x in t for x in outs) or r in t)
for k, r in ROLES.items():
    go(f"ORT recipe, all but {k} output Q/DQ", lambda t, r=r: r not in t)
json.dump(res, open(f"/tmp/m17/ablate2_L{L}_{mode}.json", "w"), indent=1)
