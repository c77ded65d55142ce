"""Ablation: which quantized tensors cost MiniLM's accuracy (issue 17)."""
import json, sys, time, copy
import numpy as np, onnx, onnxruntime as ort
sys.path.insert(0, "/work/wt-minilm")
from tasks.sentence_embedding import SentenceEmbeddingTask, GRAPH, ALL
from graph.analysis import analyze, load_model
from graph.plan import create_plan
from graph.placement import quantize
from quant.calibrate import calibrate

L = int(sys.argv[1]) if len(sys.argv) > 1 else 2
task = SentenceEmbeddingTask({"layers": L, "calib": 128, "eval": 200, "corpus": 400, "heldout": 0})
fp32 = task.graphs[0].path
import os
tabp = f"/tmp/m17/table_L{L}.json"
if not os.path.exists(tabp):
    t = calibrate(fp32, task.calibration_feeds(GRAPH), methods="max,mse", default_method="mse", progress=False)
    t.save(tabp)
tab = json.load(open(tabp))
model = load_model(fp32)
an = analyze(model)
plan = create_plan(an, "int8")

class R:
    def __init__(self, path, opt=True):
        so = ort.SessionOptions(); so.intra_op_num_threads = 2
        if not opt: so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    def run(self, f):
        return {"sentence_embedding": self.s.run(None, {k: v for k, v in f.items()})[0]}

def ev(path, opt=True):
    r = task.evaluate_sets({GRAPH: R(path, opt)}, [ALL])[ALL][0]
    return {k: round(v, 4) for k, v in r.items() if k in ("cosine", "recall_at_10")}

def strip_qdq(m, keep):
    """Remove Q->DQ pairs on activation tensors t for which keep(t) is False (the consumer reads t again)."""
    g = m.graph
    prod = {o: n for n in g.node for o in n.output}
    rm, rewire = [], {}
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in prod and prod[n.input[0]].op_type == "QuantizeLinear":
            q = prod[n.input[0]]
            src = q.input[0]
            if not keep(src):
                rewire[n.output[0]] = src; rm += [n, q]
    for n in g.node:
        for i, x in enumerate(n.input):
            if x in rewire: n.input[i] = rewire[x]
    for n in rm:
        if n in g.node: g.node.remove(n)
    return m

def role(t):
    for r in ("query", "key", "value", "attention/output", "intermediate", "output/dense"):
        pass
    return t

out = {}
def put(name, v):
    out[name] = v; print(f"{name:60s} {v}", flush=True)

for recipe, mode in (("tensorrt", None), ("onnxruntime", "u8s8"), ("onnxruntime", "u8s8-rr")):
    p = quantize(model, tab, plan=plan, recipe=recipe, ort_mode=mode or "auto").model
    path = f"/tmp/m17/{recipe}_{mode}.onnx"; onnx.save(p, path)
    put(f"{recipe} {mode or ''} exact-QDQ", ev(path, opt=False))
    put(f"{recipe} {mode or ''} ORT-fused", ev(path, opt=True))
json.dump(out, open(f"/tmp/m17/ablate_L{L}.json", "w"), indent=1)
