"""Scratch: does QAT (distillation from FP32 embeddings) make all-INT8 MiniLM pass cos>=0.99, recall@10>=0.95?"""
import sys, time, json, math, hashlib
sys.path.insert(0, "/work/main")
import numpy as np, torch
from torch import nn
from models.minilm import build_module, model_dir, Tokenizer
from calibration_data.fortunes import load_texts
from tasks.sentence_embedding import split_texts, embedding_metrics
from quant.qat import FakeQuant, QuantLinear, weight_amax
from quant.smooth import smoothing_scales

torch.manual_seed(0)
torch.set_num_threads(2)
STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 300
LR = float(sys.argv[2]) if len(sys.argv) > 2 else 2e-5
ALPHA = float(sys.argv[3]) if len(sys.argv) > 3 else 0.85
ALPHA2 = float(sys.argv[5]) if len(sys.argv) > 5 else ALPHA
SMOOTH = True
NEVAL, NCORP = 500, 1000
texts = load_texts(None)
sp = split_texts(texts, {"calib": 512, "eval": 1000, "corpus": 2000, "train": 20000})
tok = Tokenizer(128)
def batches(rows, bs):
    order = sorted(rows, key=len)
    return [{k: torch.from_numpy(v) for k, v in Tokenizer.pad(order[i:i + bs]).items()} for i in range(0, len(order), bs)]
ids = {k: tok.ids(v) for k, v in sp.items()}
calib = batches(ids["calib"], 32)
evalb = batches(ids["eval"][:NEVAL], 64)
corpb = batches(ids["corpus"][:NCORP], 64)
train_rows = ids["train"]

teacher = build_module(model_dir(), 6)
student = build_module(model_dir(), 6)
for p in teacher.parameters():
    p.requires_grad_(False)

@torch.no_grad()
def embed(m, bs):
    return torch.cat([m(b["input_ids"], b["attention_mask"]) for b in bs]).numpy()

ref_q, ref_c = embed(teacher, evalb), embed(teacher, corpb)
lin = {n: m for n, m in student.named_modules() if isinstance(m, nn.Linear)}
# channel amax of each Linear input over calib (hooks)
amax = {}
hooks = []
for n, m in lin.items():
    def hk(mod, inp, n=n):
        a = inp[0].detach().abs().reshape(-1, inp[0].shape[-1]).amax(0)
        amax[n] = torch.maximum(amax[n], a) if n in amax else a
    hooks.append(m.register_forward_pre_hook(hk))
with torch.no_grad():
    for b in calib:
        student(b["input_ids"], b["attention_mask"])
for h in hooks: h.remove()
inv = {}
if SMOOTH:
    with torch.no_grad():
        for n, m in lin.items():
            a = ALPHA if any(n.endswith(k) for k in ("query", "key", "value", "intermediate.dense")) else ALPHA2
            if a <= 0:
                continue
            s = torch.from_numpy(smoothing_scales(amax[n].numpy(), m.weight.abs().amax(0).numpy(), a))
            m.weight.mul_(s[None, :])
            inv[n] = (1.0 / s)
            m.register_buffer("inv_s", inv[n].clone())
            m.register_forward_pre_hook(lambda mod, inp: (inp[0] * mod.inv_s,))
# per-tensor act amax after smoothing: max over calib (then "mse"-like: use 99.99 percentile? keep max)
act = {}
lo, hi = {}, {}
hooks = []
samples = {}
for n, m in lin.items():
    def hk2(mod, inp, n=n):
        x = inp[0].detach()  # already smoothed: the smoothing pre-hook runs first
        act[n] = max(act.get(n, 0.0), float(x.abs().max()))
        lo[n] = min(lo.get(n, 0.0), float(x.min())); hi[n] = max(hi.get(n, 0.0), float(x.max()))
    hooks.append(m.register_forward_pre_hook(hk2))
with torch.no_grad():
    for b in calib:
        student(b["input_ids"], b["attention_mask"])
for h in hooks: h.remove()
LEARN = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
class LearnedFQ(nn.Module):
    def __init__(self, amax):
        super().__init__()
        self.log_amax = nn.Parameter(torch.tensor(math.log(amax)))
    def forward(self, x):
        scale = (self.log_amax.exp() / 127).reshape(1)
        zp = torch.zeros(1)
        return torch._fake_quantize_learnable_per_tensor_affine(x, scale, zp, -128, 127, 1.0 / math.sqrt(x.numel() * 127))
ASYM = int(sys.argv[6]) if len(sys.argv) > 6 else 0
SPLITK = int(sys.argv[7]) if len(sys.argv) > 7 else 0
class SplitFQ(nn.Module):
    def __init__(self, chan_amax, k):
        super().__init__()
        order = torch.argsort(chan_amax, descending=True)
        self.b = order[:k]; mask = torch.ones_like(chan_amax, dtype=torch.bool); mask[self.b] = False; self.a = mask.nonzero()[:, 0]
        self.fa = FakeQuant(float(chan_amax[self.a].max())); self.fb = FakeQuant(float(chan_amax[self.b].max())); self.enabled = True
    def forward(self, x):
        if not self.enabled: return x
        y = x.clone(); y[..., self.a] = self.fa(x[..., self.a]); y[..., self.b] = self.fb(x[..., self.b]); return y
class AsymFQ(nn.Module):
    def __init__(self, lo, hi):
        super().__init__()
        self.scale = (hi - lo) / 255; self.zp = int(round(-lo / self.scale)); self.enabled = True
    def forward(self, x):
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zp, 0, 255) if self.enabled else x
for n, m in lin.items():
    m.__class__ = QuantLinear
    m.input_quantizer = LearnedFQ(act[n]) if LEARN else FakeQuant(act[n])
    m.weight_quantizer = FakeQuant(weight_amax(m.weight.t(), 1), axis=1, dynamic=True)
    if SPLITK and n.endswith("output.dense") and "attention" not in n:
        ca = amax[n] * (getattr(m, "inv_s", torch.ones_like(amax[n])))
        m.input_quantizer = SplitFQ(ca, SPLITK)
    if ASYM and (ASYM == 2 or (n.endswith("output.dense") and "attention" not in n)):
        m.input_quantizer = AsymFQ(lo[n], hi[n])

def report(step, t0):
    student.eval()
    q, c = embed(student, evalb), embed(student, corpb)
    r = embedding_metrics(ref_q, ref_c, q, c, 10)
    print(json.dumps({"step": step, "t": round(time.time() - t0), **{k: round(v, 5) for k, v in r.items()}}), flush=True)
    student.train()

t0 = time.time()
report(0, t0)
if STEPS == 0:
    groups = {"qkv": ("query", "key", "value"), "attn_out": ("attention.output.dense",), "ffn_in": ("intermediate.dense",), "ffn_out": ("output.dense",)}
    for g, keys in groups.items():
        sel = [m for n, m in lin.items() if any(n.endswith(k) for k in keys) and not (g == "ffn_out" and "attention" in n)]
        for m in sel: m.input_quantizer.enabled = False
        print(g, "inputs float:", len(sel), end=" "); report(0, t0)
        for m in sel: m.input_quantizer.enabled = True
    for m in lin.values(): m.input_quantizer.enabled = False
    print("all inputs float (weights int8):", end=" "); report(0, t0)
    for m in lin.values(): m.input_quantizer.enabled = True; m.weight_quantizer.enabled = False
    print("weights float (inputs int8):", end=" "); report(0, t0)
    sys.exit()
qp = [p for n, p in student.named_parameters() if n.endswith("log_amax")]
wp = [p for n, p in student.named_parameters() if not n.endswith("log_amax")]
opt = torch.optim.AdamW([{"params": wp, "lr": LR, "base": LR}] + ([{"params": qp, "lr": LEARN, "base": LEARN}] if qp else []), weight_decay=0.0)
rng = np.random.default_rng(0)
student.train()
for step in range(1, STEPS + 1):
    f = min(1.0, step / 30) * 0.5 * (1 + math.cos(math.pi * step / STEPS))
    for g in opt.param_groups: g["lr"] = g["base"] * f
    rows = [train_rows[i] for i in rng.choice(len(train_rows), 32, replace=False)]
    b = {k: torch.from_numpy(v) for k, v in Tokenizer.pad(rows).items()}
    with torch.no_grad():
        t = teacher(b["input_ids"], b["attention_mask"])
    s = student(b["input_ids"], b["attention_mask"])
    loss = (1 - (s * t).sum(-1)).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 20 == 0:
        print(f"step {step} loss {loss.item():.6f} {time.time()-t0:.0f}s", flush=True)
    if step % 100 == 0 or step == STEPS:
        report(step, t0)
