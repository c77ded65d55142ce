import sys, json, time
sys.path.insert(0, "/work/wt-minilm")
import onnx
from engines.trt_backend import RTX
from tasks.sentence_embedding import SentenceEmbeddingTask, GRAPH
from graph.analysis import analyze
from graph.plan import create_plan
from graph.placement import quantize
from graph.validate import validate
from quant.calibrate import calibrate
from quant.smooth import smooth
print(RTX.available())
task = SentenceEmbeddingTask({"layers": 2, "calib": 32, "eval": 8, "corpus": 16, "heldout": 0, "max_seq_len": 64})
feeds = task.calibration_feeds(GRAPH)
sm, rep = smooth(task.graphs[0].path, feeds, 0.85, "all")
onnx.save(sm, "/tmp/m17/rtx_sm.onnx")
tab = calibrate("/tmp/m17/rtx_sm.onnx", feeds, methods="mse", default_method="mse", progress=False); tab.save("/tmp/m17/rtx_t.json")
shapes = task.graphs[0].shapes
out = {}
for name, g, kw in (("smoothed FP32", sm, None), ("smoothed all-INT8, tensorrt recipe", sm, {"recipe": "tensorrt"})):
    p = f"/tmp/m17/rtx_{len(out)}.onnx"
    if kw:
        res = quantize(g, "/tmp/m17/rtx_t.json", create_plan(analyze(g), "int8"), **kw)
        print("validator:", validate(res.model, res.plan, recipe="tensorrt", original=g))
        onnx.save(res.model, p)
    else:
        onnx.save(g, p)
    for sm_ in (80, 89, 120):
        t = time.time()
        try:
            plan, _ = RTX.build_plan(p, shapes, {"compute_capabilities": [sm_]})
            v = f"built, plan {len(plan)/1e6:.1f} MB"
        except Exception as e:
            v = f"FAILED: {str(e)[:300]}"
        out[f"{name} SM{sm_}"] = v
        print(name, sm_, v, f"{time.time()-t:.1f}s", flush=True)
json.dump(out, open("/tmp/m17/rtx_smooth.json", "w"), indent=1)
