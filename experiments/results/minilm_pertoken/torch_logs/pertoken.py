"""Scratch (run from /tmp/qat17 in session 9): per-token activation scales for MiniLM's Linear inputs (fake quant, step 0)."""
import sys, time, json
sys.path.insert(0, "/work/main")
import numpy as np, torch
from torch import nn
from models.minilm import build_module, model_dir, Tokenizer
from calibration_data.fortunes import load_texts
from tasks.sentence_embedding import split_texts, embedding_metrics
from quant.qat import FakeQuant, QuantLinear, weight_amax
torch.set_num_threads(2)
NEVAL, NCORP = 500, 1000
texts = load_texts(None)
sp = split_texts(texts, {"calib": 512, "eval": 1000, "corpus": 2000, "train": 20000})
tok = Tokenizer(128)
def batches(rows, bs):
    order = sorted(rows, key=len)
    return [{k: torch.from_numpy(v) for k, v in Tokenizer.pad(order[i:i + bs]).items()} for i in range(0, len(order), bs)]
ids = {k: tok.ids(v) for k, v in sp.items() if k != "train"}
calib = batches(ids["calib"], 32); evalb = batches(ids["eval"][:NEVAL], 64); corpb = batches(ids["corpus"][:NCORP], 64)
teacher = build_module(model_dir(), 6)
@torch.no_grad()
def embed(m, bs):
    return torch.cat([m(b["input_ids"], b["attention_mask"]) for b in bs]).numpy()
ref_q, ref_c = embed(teacher, evalb), embed(teacher, corpb)
student = build_module(model_dir(), 6)
lin = {n: m for n, m in student.named_modules() if isinstance(m, nn.Linear)}
act = {}
hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: act.__setitem__(n, max(act.get(n, 0.0), float(inp[0].abs().max())))) for n, m in lin.items()]
with torch.no_grad():
    for b in calib: student(b["input_ids"], b["attention_mask"])
for h in hooks: h.remove()
class PerToken(nn.Module):
    enabled = True
    def forward(self, x):
        s = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
        return (x / s).round().clamp(-128, 127) * s
groups = {"qkv": ("query", "key", "value"), "attn_out": ("attention.output.dense",), "ffn_in": ("intermediate.dense",), "ffn_out": ("output.dense",)}
def group(n):
    for g, keys in groups.items():
        if any(n.endswith(k) for k in keys) and not (g == "ffn_out" and "attention" in n): return g
for n, m in lin.items():
    m.__class__ = QuantLinear
    m.weight_quantizer = FakeQuant(weight_amax(m.weight.t(), 1), axis=1, dynamic=True)
def report(tag):
    q, c = embed(student, evalb), embed(student, corpb)
    r = embedding_metrics(ref_q, ref_c, q, c, 10)
    print(tag, json.dumps({k: round(v, 5) for k, v in r.items()}), flush=True)
def setup(per_token_groups, float_groups=()):
    for n, m in lin.items():
        g = group(n)
        m.input_quantizer = PerToken() if g in per_token_groups else FakeQuant(act[n])
        m.input_quantizer.enabled = g not in float_groups
setup(()); report("per-tensor all")
setup((), tuple(groups)); report("weights only")
setup(("ffn_out",)); report("per-token ffn_out")
setup(("ffn_out", "attn_out")); report("per-token ffn_out+attn_out")
setup(tuple(groups)); report("per-token all")
setup(("ffn_out",), ("qkv", "attn_out", "ffn_in")); report("per-token ffn_out, others float")
