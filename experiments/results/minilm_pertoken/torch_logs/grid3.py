"""Scratch: smoothing alpha per group x per-tensor/per-token per group (fake quant, step 0)."""
import sys, time, json
sys.path.insert(0, "/work/main")
import numpy as np, torch
from torch import nn
from models.minilm import build_module, model_dir, Tokenizer
from calibration_data.fortunes import load_texts
from tasks.sentence_embedding import split_texts, embedding_metrics
from quant.qat import FakeQuant, QuantLinear, weight_amax
from quant.smooth import smoothing_scales
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
groups = {"qkv": ("query", "key", "value"), "attn_out": ("attention.output.dense",), "ffn_in": ("intermediate.dense",), "ffn_out": ("output.dense",)}
def group(n):
    for g, keys in groups.items():
        if any(n.endswith(k) for k in keys) and not (g == "ffn_out" and "attention" in n): return g
class PerToken(nn.Module):
    enabled = True
    def forward(self, x):
        s = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
        return (x / s).round().clamp(-128, 127) * s
tlin = {n: m for n, m in teacher.named_modules() if isinstance(m, nn.Linear)}
chan = {}
hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: chan.__setitem__(n, torch.maximum(chan[n], inp[0].abs().reshape(-1, inp[0].shape[-1]).amax(0)) if n in chan else inp[0].abs().reshape(-1, inp[0].shape[-1]).amax(0))) for n, m in tlin.items()]
with torch.no_grad():
    for b in calib: teacher(b["input_ids"], b["attention_mask"])
for h in hooks: h.remove()
def run(tag, alpha, mode, floatg=()):
    st = build_module(model_dir(), 6)
    lin = {n: m for n, m in st.named_modules() if isinstance(m, nn.Linear)}
    with torch.no_grad():
        for n, m in lin.items():
            a = alpha.get(group(n), 0)
            if a > 0:
                s = torch.from_numpy(smoothing_scales(chan[n].numpy(), m.weight.abs().amax(0).numpy(), a))
                m.weight.mul_(s[None, :]); m.register_buffer("inv_s", 1.0 / s)
                m.register_forward_pre_hook(lambda mod, inp: (inp[0] * mod.inv_s,))
    act = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: act.__setitem__(n, max(act.get(n, 0.0), float(inp[0].abs().max())))) for n, m in lin.items()]
    with torch.no_grad():
        for b in calib: st(b["input_ids"], b["attention_mask"])
    for h in hooks: h.remove()
    for n, m in lin.items():
        g = group(n)
        m.__class__ = QuantLinear
        m.weight_quantizer = FakeQuant(weight_amax(m.weight.t(), 1), axis=1, dynamic=True)
        m.input_quantizer = PerToken() if mode.get(g) == "tok" else FakeQuant(act[n])
        m.input_quantizer.enabled = g not in floatg
    r = embedding_metrics(ref_q, ref_c, embed(st, evalb), embed(st, corpb), 10)
    print(tag, json.dumps({k: round(v, 5) for k, v in r.items()}), flush=True)
def tok(*gs): return {g: "tok" for g in gs}
run("tok ffn_out; smooth all 0.85", {g: .85 for g in groups}, tok("ffn_out"))
run("tok ffn_out; smooth qkv/ffn_in/attn_out 0.85", {"qkv": .85, "ffn_in": .85, "attn_out": .85}, tok("ffn_out"))
run("tok ffn_out+attn_out; smooth all 0.85", {g: .85 for g in groups}, tok("ffn_out", "attn_out"))
run("tok ffn_out+attn_out; smooth qkv/ffn_in 0.85", {"qkv": .85, "ffn_in": .85}, tok("ffn_out", "attn_out"))
run("tok ffn_out+attn_out; smooth qkv/ffn_in 0.5", {"qkv": .5, "ffn_in": .5}, tok("ffn_out", "attn_out"))
run("tok ffn_out+ffn_in; smooth qkv/ffn_in 0.85", {"qkv": .85, "ffn_in": .85}, tok("ffn_out", "ffn_in"))
run("tok ffn_out+qkv; smooth qkv/ffn_in 0.85", {"qkv": .85, "ffn_in": .85}, tok("ffn_out", "qkv"))
