import sys, json, copy
import numpy as np, onnx, onnxruntime as ort
sys.path.insert(0, "/work/wt-minilm")
from tasks.sentence_embedding import SentenceEmbeddingTask, GRAPH, ALL
from graph.analysis import analyze
from graph.plan import create_plan
from graph.placement import quantize
from quant.calibrate import calibrate
from quant.smooth import smooth
L = int(sys.argv[1])
task = SentenceEmbeddingTask({"layers": L, "calib": 128, "eval": 200, "corpus": 400, "heldout": 0})
fp32 = task.graphs[0].path; calib = task.calibration_feeds(GRAPH)
class R:
    def __init__(self, m, opt=False):
        so = ort.SessionOptions(); so.intra_op_num_threads = 2
        if not opt: so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.s = ort.InferenceSession(m.SerializeToString() if isinstance(m, onnx.ModelProto) else str(m), so, providers=["CPUExecutionProvider"])
    def run(self, f): return {"sentence_embedding": self.s.run(["sentence_embedding"], dict(f))[0]}
def ev(m, opt=False):
    r = task.evaluate_sets({GRAPH: R(m, opt)}, [ALL])[ALL][0]
    return {k: round(v, 4) for k, v in r.items() if k in ("cosine", "recall_at_10")}
res = {}
for spec in sys.argv[2].split(";"):
    targets, alpha = spec.split(":"); alpha = float(alpha)
    sm, rep = smooth(fp32, calib, alpha, targets)
    p = "/tmp/m17/sw.onnx"; onnx.save(sm, p)
    fp = ev(sm, opt=True)
    tab = calibrate(p, calib, methods="mse,max", default_method="mse", progress=False)
    for meth in ("mse", "max"):
        tab.with_method(meth).save("/tmp/m17/sw.json")
        for recipe, fo in (("onnxruntime", "residual"), ("tensorrt", "none")):
            q = quantize(sm, "/tmp/m17/sw.json", plan=create_plan(analyze(sm), "int8"), recipe=recipe, ort_mode="u8s8", ort_float_outputs=fo).model
            res[f"{spec} {meth} {recipe}"] = r = ev(q)
            print(f"{spec:14s} {meth} {recipe:12s} fp32-vs-orig {fp} int8 {r}", flush=True)
json.dump(res, open(f"/tmp/m17/sweep_L{L}.json", "w"), indent=1)
