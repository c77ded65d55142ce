"""Training loop for the WeNet-style model: joint CTC/attention loss, Adam + WarmupLR, grad clipping,
bf16 autocast on GPU (CTC kept in fp32 inside the model), SpecAugment, checkpoint save/resume, a JSONL log."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from calibration_data.text import DEFAULT_VOCAB, CharVocab
from core.errors import WorkbenchError
from core.fsutil import atomic_path

from .asr_model import IGNORE_ID, ASRModel
from .config import ModelConfig


@dataclass
class TrainConfig:
    steps: int = 6000
    peak_lr: float = 1.5e-3
    warmup_steps: int = 800
    grad_clip: float = 5.0
    max_frames_per_batch: int = 60000
    num_t_mask: int = 2
    max_t: int = 40
    num_f_mask: int = 2
    max_f: int = 10
    eval_every: int = 500
    ckpt_every: int = 500
    seed: int = 0
    workers: int = 6
    init_weights: str = ""  # start from these weights (fresh optimizer): a continued run across device calls
    lr_step_offset: int = 0  # continue WarmupLR from this step (the steps the init weights already had)
    rewarm_steps: int = 200  # linear ramp for the fresh Adam moments of a continued run
    time_limit_s: float = 0.0  # stop (and checkpoint) after this many seconds; 0 = no limit
    kd_weight: float = 0.0  # + kd_weight * KL(teacher || student) on the CTC posteriors (needs a teacher)
    kd_temperature: float = 1.0
    freeze_bn: bool = False  # BatchNorm keeps its running statistics (QAT: the calibrated ranges assume them)


def warmup_lr(step: int, peak: float, warmup: int) -> float:
    """WeNet's WarmupLR, scaled so that the rate peaks at `peak` after `warmup` steps, then decays as step^-0.5."""
    step = max(step, 1)
    return peak * warmup ** 0.5 * min(step ** -0.5, step * warmup ** -1.5)


class Batches:
    """Length-sorted buckets of utterances, each holding at most `max_frames` padded frames; reshuffled per epoch."""

    def __init__(self, lengths: np.ndarray, max_frames: int, seed: int):
        self.lengths = lengths
        self.max_frames = max_frames
        self.rng = np.random.default_rng(seed)

    def epoch(self) -> list[np.ndarray]:
        # Sort by length with a random tie-break so bucket contents vary between epochs.
        order = np.lexsort((self.rng.random(len(self.lengths)), self.lengths))
        batches, cur, longest = [], [], 0
        for i in order:
            longest_if = max(longest, int(self.lengths[i]))
            if cur and longest_if * (len(cur) + 1) > self.max_frames:
                batches.append(np.array(cur))
                cur, longest_if = [], int(self.lengths[i])
            cur.append(i)
            longest = longest_if
        if cur:
            batches.append(np.array(cur))
        self.rng.shuffle(batches)
        return batches


def kd_loss(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) over the vocabulary, averaged over valid frames (mask: (B, 1, T') True=valid),
    scaled by T^2 as in Hinton et al. so the gradient size does not depend on the temperature."""
    t = temperature
    s = torch.log_softmax(student_logp.float() / t, dim=-1)
    p = torch.log_softmax(teacher_logp.float() / t, dim=-1)
    kl = (p.exp() * (p - s)).sum(-1)
    m = mask.squeeze(1).to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp(min=1) * (t * t)


def set_train_mode(model: torch.nn.Module, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def collate(split, idx: np.ndarray, vocab: CharVocab):
    feats = [np.asarray(split.features(int(i)), dtype=np.float32) for i in idx]
    lens = np.array([f.shape[0] for f in feats], dtype=np.int32)
    x = np.zeros((len(feats), lens.max(), feats[0].shape[1]), dtype=np.float32)
    for k, f in enumerate(feats):
        x[k, : len(f)] = f
    toks = [vocab.encode(split.texts[int(i)]) for i in idx]
    tl = np.array([len(t) for t in toks], dtype=np.int64)
    y = np.full((len(toks), tl.max()), IGNORE_ID, dtype=np.int64)
    for k, t in enumerate(toks):
        y[k, : len(t)] = t
    return torch.from_numpy(x), torch.from_numpy(lens), torch.from_numpy(y), torch.from_numpy(tl)


class _BatchDataset(torch.utils.data.Dataset):
    """One item = one collated batch, so DataLoader workers do the padding and the GPU never waits on it."""

    def __init__(self, split, batches: list[np.ndarray], vocab: CharVocab):
        self.split, self.batches, self.vocab = split, batches, vocab

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int):
        return collate(self.split, self.batches[k], self.vocab)


def _loader(split, batches, vocab, workers: int, pin: bool):
    ds = _BatchDataset(split, batches, vocab)
    if workers <= 0:
        return ds
    # fork: workers inherit the memory-mapped features instead of pickling them.
    return torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin,
                                       prefetch_factor=4, multiprocessing_context="fork")


def spec_augment(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Zero random time and frequency bands (WeNet's spec_aug), drawn per utterance on the batch's device."""
    B, T, F = x.shape
    x = x.clone()
    t_idx = torch.arange(T, device=x.device)
    f_idx = torch.arange(F, device=x.device)
    for _ in range(cfg.num_t_mask):
        start = (torch.rand(B, generator=gen, device=gen.device) * max(T - 1, 1)).long().to(x.device)
        width = (torch.rand(B, generator=gen, device=gen.device) * cfg.max_t).long().to(x.device)
        m = (t_idx[None] >= start[:, None]) & (t_idx[None] < (start + width)[:, None])
        x = x.masked_fill(m[:, :, None], 0.0)
    for _ in range(cfg.num_f_mask):
        start = (torch.rand(B, generator=gen, device=gen.device) * (F - 1)).long().to(x.device)
        width = (torch.rand(B, generator=gen, device=gen.device) * cfg.max_f).long().to(x.device)
        m = (f_idx[None] >= start[:, None]) & (f_idx[None] < (start + width)[:, None])
        x = x.masked_fill(m[:, None, :], 0.0)
    return x


@torch.no_grad()
def greedy_cer(model: ASRModel, split, n: int, device: torch.device, vocab: CharVocab, batch: int = 32) -> float:
    """CTC-greedy CER on the first n utterances of `split` (a cheap validation signal during training)."""
    from evaluation.metrics import cer

    model.eval()
    n = min(n, len(split))
    hyps, refs = [], []
    for s in range(0, n, batch):
        idx = np.arange(s, min(n, s + batch))
        x, xl, _, _ = collate(split, idx, vocab)
        out, mask = model.encoder(x.to(device), xl.to(device))
        best = model.ctc.log_softmax(out).argmax(-1).cpu().numpy()
        lens = mask.squeeze(1).sum(1).cpu().numpy()
        for row, L in zip(best, lens):
            ids = [t for j, t in enumerate(row[:L]) if t != 0 and (j == 0 or t != row[j - 1])]
            hyps.append(vocab.decode(ids))
        refs.extend(split.texts[int(i)] for i in idx)
    return cer(refs, hyps)["cer"]


def save_checkpoint(path: Path, model, opt, step: int, tcfg: TrainConfig) -> None:
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                    "model_cfg": model.cfg.to_dict(), "train_cfg": asdict(tcfg)}, tmp)


def train(model_cfg: ModelConfig, train_split, val_split, out_dir: str | Path, tcfg: TrainConfig,
          cmvn: dict | None, device: str | None = None, resume: bool = True, progress: bool = True,
          vocab: CharVocab = DEFAULT_VOCAB, model: ASRModel | None = None,
          teacher: ASRModel | None = None) -> ASRModel:
    """Train until tcfg.steps (or the time limit); checkpoints to out_dir/checkpoint.pt, logs to out_dir/train_log.jsonl.
    `model`: train this prepared model (e.g. with QAT quantizers) instead of a new one of `model_cfg`
    (cmvn and init_weights then do not apply).  `teacher`: a frozen model to distil from (tcfg.kd_weight)."""
    if len(train_split) == 0:
        raise WorkbenchError("the training split is empty")
    if tcfg.kd_weight > 0 and teacher is None:
        raise WorkbenchError("kd_weight > 0 needs a teacher model")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(tcfg.seed)
    if model is not None:
        if tcfg.init_weights:
            raise WorkbenchError("train(): pass either a prepared model or init_weights, not both")
    else:
        model = ASRModel(model_cfg)
        model.encoder.set_cmvn(cmvn)
    if tcfg.init_weights:
        from .weights import load_weights

        init = load_weights(tcfg.init_weights)
        if init.cfg != model_cfg:
            raise WorkbenchError(f"{tcfg.init_weights} is a {init.cfg.name} model, not {model_cfg.name}")
        model.load_state_dict(init.state_dict())  # its CMVN too: the statistics it was trained with
    model.to(dev)
    set_train_mode(model, tcfg.freeze_bn)
    if teacher is not None:
        teacher.to(dev).eval().requires_grad_(False)
    captured = {}  # the student's encoder output, for distillation without a second encoder pass
    hook = model.encoder.register_forward_hook(lambda m, i, o: captured.__setitem__("enc", o)) \
        if tcfg.kd_weight > 0 else None
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=tcfg.peak_lr)
    ckpt_path = out_dir / "checkpoint.pt"
    step = 0
    if resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=dev, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
    lengths = np.array([m["frames"] for m in train_split.manifest])
    # The batch order depends on (seed, epoch) only, so a resumed run continues the same sequence.
    per_epoch = len(Batches(lengths, tcfg.max_frames_per_batch, 0).epoch())
    gen = torch.Generator(device=dev).manual_seed(tcfg.seed + step)
    use_bf16 = dev.type == "cuda"
    t0 = time.time()
    log = open(out_dir / "train_log.jsonl", "a")
    bar = tqdm(total=tcfg.steps, initial=step, disable=not progress, desc="train", unit="step")
    stop = False
    while step < tcfg.steps and not stop:
        epoch = step // per_epoch
        batches = Batches(lengths, tcfg.max_frames_per_batch, tcfg.seed * 1000 + epoch).epoch()
        t_data = time.time()
        for batch in _loader(train_split, batches[step % per_epoch:], vocab, tcfg.workers, dev.type == "cuda"):
            x, xl, y, yl = (t.to(dev, non_blocking=True) for t in batch)
            data_s = time.time() - t_data
            x = spec_augment(x, tcfg, gen)
            lr = warmup_lr(step + 1 + tcfg.lr_step_offset, tcfg.peak_lr, tcfg.warmup_steps)
            if tcfg.lr_step_offset:
                lr *= min(1.0, (step + 1) / tcfg.rewarm_steps)
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = model(x, xl, y, yl)
                if hook is not None:
                    enc, mask = captured.pop("enc")
                    with torch.no_grad():
                        t_enc, _ = teacher.encoder(x, xl)
                        t_logp = teacher.ctc.log_softmax(t_enc)
                    out["loss_kd"] = kd_loss(model.ctc.log_softmax(enc), t_logp, mask, tcfg.kd_temperature)
                    out["loss"] = out["loss"] + tcfg.kd_weight * out["loss_kd"]
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            if torch.isfinite(gnorm):
                opt.step()
            step += 1
            bar.update(1)
            rec = {"step": step, "lr": lr, "grad_norm": float(gnorm), "time_s": round(time.time() - t0, 1),
                   "data_wait_s": round(data_s, 4),
                   **{k: round(float(v.detach()), 4) for k, v in out.items()}}
            if step % tcfg.eval_every == 0 or step == tcfg.steps:
                rec["val_cer_ctc_greedy"] = round(greedy_cer(model, val_split, 200, dev, vocab), 4)
                set_train_mode(model, tcfg.freeze_bn)
                bar.set_postfix(loss=rec["loss"], cer=rec["val_cer_ctc_greedy"])
            log.write(json.dumps(rec) + "\n")
            log.flush()
            timed_out = tcfg.time_limit_s and time.time() - t0 > tcfg.time_limit_s
            if step % tcfg.ckpt_every == 0 or step >= tcfg.steps or timed_out:
                save_checkpoint(ckpt_path, model, opt, step, tcfg)
            if step >= tcfg.steps or timed_out:
                stop = True
                break
            t_data = time.time()
    bar.close()
    log.close()
    if hook is not None:
        hook.remove()
    if not math.isfinite(float(out["loss"].detach())):
        raise WorkbenchError(f"training diverged at step {step}")
    return model.eval()
