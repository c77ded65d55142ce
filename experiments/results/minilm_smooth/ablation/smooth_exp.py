import sys, json, copy, os
import numpy as np, onnx, onnxruntime as ort
from onnx import helper, numpy_helper
sys.path.insert(0, "/work/wt-minilm")
from tasks.sentence_embedding import SentenceEmbeddingTask, GRAPH, ALL
from graph.analysis import analyze, load_model, GraphIndex
from graph.plan import create_plan
from graph.placement import quantize
from quant.calibrate import calibrate

L = int(sys.argv[1]); NCAL = 128
task = SentenceEmbeddingTask({"layers": L, "calib": NCAL, "eval": 200, "corpus": 400, "heldout": 0})
fp32 = task.graphs[0].path
calib = task.calibration_feeds(GRAPH)

def sess(m, opt=False, outs=()):
    m = copy.deepcopy(m)
    for t in outs:
        m.graph.output.append(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions(); so.intra_op_num_threads = 2
    if not opt: so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])

class R:
    def __init__(self, m, opt=False): self.s = sess(m, opt)
    def run(self, f): return {"sentence_embedding": self.s.run(["sentence_embedding"], dict(f))[0]}

def ev(m, opt=False):
    r = task.evaluate_sets({GRAPH: R(m, opt)}, [ALL])[ALL][0]
    return {k: round(v, 4) for k, v in r.items() if k in ("cosine", "recall_at_10")}

model = load_model(fp32)
an = analyze(model)
w_nodes = [q for q in an.quantizable if q.weight is not None]
acts = sorted({q.act_inputs[0] for q in w_nodes})
# per-channel max |x| over calibration data (padding included, as the calibrator)
s = sess(model, outs=acts)
chmax = {t: 0 for t in acts}
for f in calib:
    for t, v in zip(acts, s.run(acts, dict(f))):
        chmax[t] = np.maximum(chmax[t], np.abs(v).reshape(-1, v.shape[-1]).max(0))
for t in acts:
    c = chmax[t]; print(f"{t:70s} tensor max {c.max():8.2f}  median ch {np.median(c):6.2f}  top3 {np.sort(c)[-3:].round(1)}")

def smooth(model, alpha, which=lambda t: True):
    m = copy.deepcopy(model); idx = GraphIndex(m)
    inits = {i.name: i for i in m.graph.initializer}
    by = {n.name: n for n in m.graph.node}
    groups = {}
    for q in w_nodes:
        if which(q.act_inputs[0]): groups.setdefault(q.act_inputs[0], []).append(q)
    new = []
    for t, qs in groups.items():
        wmax = np.max([np.abs(numpy_helper.to_array(inits[q.weight])).max(1) for q in qs], axis=0)
        sc = np.clip(chmax[t] ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha), 1e-5, None).astype(np.float32)
        inv = numpy_helper.from_array((1 / sc).astype(np.float32), t + "_smooth_inv")
        m.graph.initializer.append(inv)
        out = t + "_smoothed"
        new.append(helper.make_node("Mul", [t, inv.name], [out], name=t + "_SmoothMul"))
        for q in qs:
            n = by[q.id]; n.input[q.act_inputs and list(n.input).index(t)] = out
            w = numpy_helper.to_array(inits[q.weight]) * sc[:, None]
            inits[q.weight].CopyFrom(numpy_helper.from_array(w.astype(np.float32), q.weight))
    from graph.fp16 import toposort
    nodes = toposort(list(m.graph.node) + new, m.graph); del m.graph.node[:]; m.graph.node.extend(nodes)
    return m

res = {}
def put(k, v): res[k] = v; print(f"{k:60s} {v}", flush=True)
ffn2 = "output/dense/MatMul_output"
def strip_out(m, pat):
    exec_ns = {}
    exec(open("/tmp/m17/ablate.py").read().split("def role")[0].split("def strip_qdq")[1].join(["def strip_qdq", ""]) if False else "", exec_ns)
    return m
exec("def strip_qdq" + open("/tmp/m17/ablate.py").read().split("def strip_qdq")[1].split("def role")[0])

for alpha in [None] + [float(a) for a in sys.argv[2].split(",")]:
    m = model if alpha is None else smooth(model, alpha)
    p = f"/tmp/m17/sm_{alpha}.onnx"; onnx.save(m, p)
    if alpha is not None: put(f"smoothed a={alpha} FP32", ev(m, opt=True))
    tab = calibrate(p, calib, methods=sys.argv[3], default_method=sys.argv[3].split(",")[0], progress=False)
    tab.save(f"/tmp/m17/tab_{alpha}.json")
    for meth in sys.argv[3].split(","):
        t = tab.with_method(meth)
        t.save("/tmp/m17/t.json")
        q = quantize(m, "/tmp/m17/t.json", plan=create_plan(analyze(m), "int8"), recipe="onnxruntime", ort_mode="u8s8").model
        put(f"a={alpha} {meth} ORT recipe", ev(q))
        put(f"a={alpha} {meth} ORT recipe, no FFN2-out Q/DQ", ev(strip_qdq(q, lambda x: ffn2 not in x)))
json.dump(res, open(f"/tmp/m17/smooth_L{L}.json", "w"), indent=1)
