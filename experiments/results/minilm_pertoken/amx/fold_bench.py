"""How this directory's fold_pair_bs32_seq128.json was made (run from /tmp/r17/foldbench, 2026-12-02, before
graph.matmul_bias joined the placement): two placed models of run_ffn_rel40 (all-INT8 qat, and the selected 33 of
36), each also with graph.matmul_bias.fold_bias applied, timed interleaved with FP32 by
    python experiments/bench_minilm_pair.py /tmp/r17/foldbench --threads 2 --rounds 15 --out pair.json
(copy run_ffn_rel40's run.json there; the run's models lived in /tmp/r17/run_rel40)."""
import json
import sys

import onnx

sys.path.insert(0, "/work/main")
from graph.matmul_bias import fold_bias  # noqa: E402

R = "/tmp/r17/run_rel40/"
models = json.load(open(R + "models.json"))
out = {"FP32": models["FP32"]}
for label, path in (("INT8 all (qat)", R + models["INT8 all (qat)"]["minilm"]),
                    ("INT8 all (sel 33/36)", R + "final/minilm.onnx")):
    m = onnx.load(path)
    out[label] = {"minilm": path}
    n = fold_bias(m, {x.name for x in m.graph.node if x.op_type == "MatMul"})
    onnx.checker.check_model(m)
    p = f"/tmp/r17/foldbench/m/{len(out)}.onnx"
    onnx.save(m, p)
    out[label.replace(")", ", bias folded)")] = {"minilm": p}
    print(label, "folded", n)  # 30 and 30
json.dump(out, open("models.json", "w"), indent=1)
# then: both placements' outputs compared on the bs8 x seq64 latency case: max abs difference 0.0 (bit-identical)
