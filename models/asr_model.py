"""U2++ ASR model: conformer encoder + CTC head + bidirectional attention decoder, with WeNet's joint loss."""
from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .decoder import BiTransformerDecoder
from .encoder import ConformerEncoder

IGNORE_ID = -1


class CTC(nn.Module):
    def __init__(self, vocab_size: int, d: int):
        super().__init__()
        self.ctc_lo = nn.Linear(d, vocab_size)
        # reduction='sum' then / batch, as WeNet's ctc.py
        self.ctc_loss = nn.CTCLoss(blank=0, reduction="sum", zero_infinity=True)

    def log_softmax(self, hs_pad: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.ctc_lo(hs_pad), dim=2)

    def forward(self, hs_pad, hlens, ys_pad, ys_lens) -> torch.Tensor:
        # CTC in fp32 even under autocast: log-probs of long sequences underflow in bf16/fp16.
        logits = self.ctc_lo(hs_pad).float()
        ys_hat = logits.transpose(0, 1).log_softmax(2)
        targets = ys_pad.masked_fill(ys_pad == IGNORE_ID, 0)
        loss = self.ctc_loss(ys_hat, targets, hlens, ys_lens)
        return loss / ys_hat.size(1)


class LabelSmoothingLoss(nn.Module):
    """KL to a smoothed target, summed and divided by the batch size (normalize_length=False)."""

    def __init__(self, size: int, smoothing: float):
        super().__init__()
        self.size = size
        self.confidence = 1.0 - smoothing
        self.smoothing = smoothing

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        batch_size = x.size(0)
        x = x.float().view(-1, self.size)
        target = target.view(-1)
        true_dist = torch.full_like(x, self.smoothing / (self.size - 1))
        ignore = target == IGNORE_ID
        target = target.masked_fill(ignore, 0)
        true_dist.scatter_(1, target.unsqueeze(1), self.confidence)
        kl = nn.functional.kl_div(torch.log_softmax(x, dim=1), true_dist, reduction="none")
        return kl.masked_fill(ignore.unsqueeze(1), 0).sum() / batch_size


def add_sos_eos(ys_pad: torch.Tensor, ys_lens: torch.Tensor, sos: int, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[sos]+ys padded with eos (decoder input) and ys+[eos] padded with IGNORE_ID (target).
    Vectorised (no per-row loop): per-row boolean indexing would sync the GPU once per utterance."""
    B = ys_pad.size(0)
    col = ys_pad.new_full((B, 1), sos)
    ys_in = torch.cat([col, ys_pad.masked_fill(ys_pad == IGNORE_ID, eos)], dim=1)
    ys_out = torch.cat([ys_pad, col.fill_(IGNORE_ID)], dim=1).scatter(1, ys_lens.long().unsqueeze(1), eos)
    return ys_in, ys_out


def reverse_pad_list(ys_pad: torch.Tensor, ys_lens: torch.Tensor) -> torch.Tensor:
    """Reverse each row's first ys_lens[i] tokens; padding stays IGNORE_ID."""
    pos = torch.arange(ys_pad.size(1), device=ys_pad.device).unsqueeze(0)
    lens = ys_lens.long().unsqueeze(1)
    src = (lens - 1 - pos).clamp(min=0)
    return torch.gather(ys_pad, 1, src).masked_fill(pos >= lens, IGNORE_ID)


class ASRModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.sos = self.eos = cfg.vocab_size - 1
        self.encoder = ConformerEncoder(cfg)
        self.ctc = CTC(cfg.vocab_size, cfg.output_size)
        self.decoder = BiTransformerDecoder(cfg)
        self.criterion_att = LabelSmoothingLoss(cfg.vocab_size, cfg.lsm_weight)

    def forward(self, speech, speech_lengths, text, text_lengths) -> dict[str, torch.Tensor]:
        """Joint loss: ctc_weight*CTC + (1-ctc_weight)*((1-rw)*L2R + rw*R2L). `text` is IGNORE_ID-padded."""
        cfg = self.cfg
        encoder_out, encoder_mask = self.encoder(speech, speech_lengths)
        encoder_out_lens = encoder_mask.squeeze(1).sum(1)
        loss_ctc = self.ctc(encoder_out, encoder_out_lens, text, text_lengths)

        ys_in, ys_out = add_sos_eos(text, text_lengths, self.sos, self.eos)
        r_ys_in, r_ys_out = add_sos_eos(reverse_pad_list(text, text_lengths), text_lengths, self.sos, self.eos)
        dec_out, r_dec_out = self.decoder(encoder_out, encoder_mask, ys_in, text_lengths + 1, r_ys_in,
                                          cfg.reverse_weight)
        loss_att = self.criterion_att(dec_out, ys_out)
        if cfg.reverse_weight > 0:
            loss_att = loss_att * (1 - cfg.reverse_weight) + self.criterion_att(r_dec_out, r_ys_out) * cfg.reverse_weight
        loss = cfg.ctc_weight * loss_ctc + (1 - cfg.ctc_weight) * loss_att
        mask = ys_out != IGNORE_ID
        acc = ((dec_out.argmax(-1) == ys_out) & mask).sum().float() / mask.sum().clamp(min=1)
        return {"loss": loss, "loss_ctc": loss_ctc.detach(), "loss_att": loss_att.detach(), "acc_att": acc.detach()}
