"""ONNX export with WeNet's GPU interface (wenet/bin/export_onnx_gpu.py): names, dtypes and dynamic axes."""
from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from evaluation import interface
from core.errors import WorkbenchError
from core.fsutil import atomic_path

from .asr_model import ASRModel
from .layers import make_pad_mask

BEAM = interface.BEAM
HYPS_LEN = interface.MAX_HYP_PAD  # the hackathon fixed hyps_pad_sos_eos to [B, 10, 64]

ENCODER_INPUTS = [s.name for s in interface.ENCODER_INPUTS]
ENCODER_OUTPUTS = [s.name for s in interface.ENCODER_OUTPUTS]
DECODER_INPUTS = [s.name for s in interface.DECODER_INPUTS]
DECODER_OUTPUTS = ["decoder_out", "best_index"]  # export_onnx_gpu.py's order with --decoder_fastertransformer
# How decoder_out's dims are named. export_onnx_gpu.py (export_rescoring_decoder's dynamic_axes) names no axis
# of decoder_out, so the legacy exporter's shape inference makes up a name for every dim of it, beam and V
# included ("Reshapedecoder_out_dim_0".."_3" with torch 2.13): that is "wenet". "named" (ours so far) fixes
# {0: "B", 2: "T2_OUT"}; "unknown" clears every dim (no dim_param, no dim_value), as tools that drop
# symbolic shapes leave it.
DECODER_OUT_AXES = ("named", "wenet", "unknown")


class EncoderForExport(nn.Module):
    """export_onnx_gpu.py `Encoder`: full-attention encoder, CTC log-softmax and its top-k."""

    def __init__(self, model: ASRModel, beam_size: int = BEAM):
        super().__init__()
        self.encoder = model.encoder
        self.ctc = model.ctc
        self.beam_size = beam_size

    def forward(self, speech, speech_lengths):
        encoder_out, encoder_mask = self.encoder(speech, speech_lengths)
        encoder_out_lens = encoder_mask.squeeze(1).sum(1)
        ctc_log_probs = self.ctc.log_softmax(encoder_out)
        encoder_out_lens = encoder_out_lens.int()
        beam_log_probs, beam_log_probs_idx = torch.topk(ctc_log_probs, self.beam_size, dim=2)
        return encoder_out, encoder_out_lens, ctc_log_probs, beam_log_probs, beam_log_probs_idx


class DecoderForExport(nn.Module):
    """export_onnx_gpu.py `Decoder`: batched attention rescoring of the beam's hypotheses, ctc_weight and
    reverse_weight baked in. Outputs (decoder_out, best_index) with `decoder_fastertransformer` (our default),
    else best_index alone (WeNet's default). The forward always takes the 6 inputs, as WeNet's: with
    reverse_weight 0 r_hyps_pad_sos_eos feeds nothing, and the exporter drops it from the graph."""

    def __init__(self, model: ASRModel, ctc_weight: float, reverse_weight: float, beam_size: int = BEAM,
                 decoder_fastertransformer: bool = True):
        super().__init__()
        self.decoder = model.decoder
        self.ctc_weight = ctc_weight
        self.reverse_weight = reverse_weight
        self.beam_size = beam_size
        self.decoder_fastertransformer = decoder_fastertransformer

    def forward(self, encoder_out, encoder_lens, hyps_pad_sos_eos, hyps_lens_sos, r_hyps_pad_sos_eos, ctc_score):
        B, T, F = encoder_out.shape
        bz = self.beam_size
        B2 = B * bz
        encoder_out = encoder_out.repeat(1, bz, 1).view(B2, T, F)
        encoder_mask = ~make_pad_mask(encoder_lens, T).unsqueeze(1)
        encoder_mask = encoder_mask.repeat(1, bz, 1).view(B2, 1, T)
        T2 = hyps_pad_sos_eos.shape[2] - 1
        hyps_pad = hyps_pad_sos_eos.view(B2, T2 + 1)
        hyps_lens = hyps_lens_sos.view(B2,)
        hyps_pad_sos = hyps_pad[:, :-1].contiguous()
        hyps_pad_eos = hyps_pad[:, 1:].contiguous()
        r_hyps_pad = r_hyps_pad_sos_eos.view(B2, T2 + 1)
        r_hyps_pad_sos = r_hyps_pad[:, :-1].contiguous()
        r_hyps_pad_eos = r_hyps_pad[:, 1:].contiguous()
        decoder_out, r_decoder_out = self.decoder(encoder_out, encoder_mask, hyps_pad_sos, hyps_lens,
                                                  r_hyps_pad_sos, self.reverse_weight)
        decoder_out = torch.nn.functional.log_softmax(decoder_out, dim=-1)
        V = decoder_out.shape[-1]
        decoder_out = decoder_out.view(B2, T2, V)
        mask = ~make_pad_mask(hyps_lens, T2)
        index = torch.unsqueeze(hyps_pad_eos * mask, 2)
        score = decoder_out.gather(2, index).squeeze(2)
        score = score * mask
        decoder_out = decoder_out.view(B, bz, T2, V)
        if self.reverse_weight > 0:
            r_decoder_out = torch.nn.functional.log_softmax(r_decoder_out, dim=-1)
            r_decoder_out = r_decoder_out.view(B2, T2, V)
            index = torch.unsqueeze(r_hyps_pad_eos * mask, 2)
            r_score = r_decoder_out.gather(2, index).squeeze(2)
            r_score = r_score * mask
            score = score * (1 - self.reverse_weight) + self.reverse_weight * r_score
        score = torch.sum(score, axis=1)
        score = torch.reshape(score, (B, bz)) + self.ctc_weight * ctc_score
        best_index = torch.argmax(score, dim=1)
        if self.decoder_fastertransformer:
            return decoder_out, best_index
        return best_index


def dummy_encoder_inputs(batch: int = 2, frames: int = 100, dim: int = 80, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    speech = torch.randn(batch, frames, dim, generator=g) + 10.0
    lengths = torch.randint(frames // 2, frames + 1, (batch,), generator=g, dtype=torch.int32)
    lengths[0] = frames
    return speech, lengths


def dummy_decoder_inputs(model: ASRModel, batch: int = 2, t_out: int = 24, beam: int = BEAM,
                         hyps_len: int = HYPS_LEN, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d, V = model.cfg.output_size, model.cfg.vocab_size
    encoder_out = torch.randn(batch, t_out, d, generator=g)
    encoder_out_lens = torch.randint(t_out // 2, t_out + 1, (batch,), generator=g, dtype=torch.int32)
    encoder_out_lens[0] = t_out
    hyps_lens = torch.randint(1, hyps_len - 1, (batch, beam), generator=g, dtype=torch.int32)
    hyps = torch.full((batch, beam, hyps_len), V - 1, dtype=torch.int64)
    r_hyps = hyps.clone()
    for b in range(batch):
        for k in range(beam):
            n = int(hyps_lens[b, k]) - 1
            toks = torch.randint(2, V - 1, (n,), generator=g)
            hyps[b, k, 1:n + 1] = toks
            r_hyps[b, k, 1:n + 1] = toks.flip(0)
    ctc_score = -torch.rand(batch, beam, generator=g) * 10
    return encoder_out, encoder_out_lens, hyps, hyps_lens, r_hyps, ctc_score


def _clear_dims(model: onnx.ModelProto, output: str) -> None:
    for d in next(o for o in model.graph.output if o.name == output).type.tensor_type.shape.dim:
        d.Clear()


def _export(module: nn.Module, args, path: Path, inputs, outputs, dynamic_axes, opset: int,
            unknown_dims: str | None = None) -> None:
    # The exporter restores the wrapper's training flag recursively afterwards: a fresh wrapper is in
    # training mode and would flip the whole model to train() (dropout on, BatchNorm batch stats).
    module.eval()
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # dynamo=False: WeNet's TorchScript-traced graph with dynamic_axes (the dynamo exporter emits other ops).
        torch.onnx.export(module, args, str(tmp), dynamo=False, opset_version=opset, do_constant_folding=True,
                          input_names=inputs, output_names=outputs, dynamic_axes=dynamic_axes)
        if unknown_dims:
            m = onnx.load(str(tmp))
            _clear_dims(m, unknown_dims)
            onnx.save(m, str(tmp))
        onnx.checker.check_model(str(tmp))


def export_onnx(model: ASRModel, out_dir: str | Path, opset: int = 13, ctc_weight: float = 0.5,
                reverse_weight: float | None = None, beam: int = BEAM, *, decoder_fastertransformer: bool = True,
                decoder_out_axes: str = "named") -> tuple[Path, Path]:
    """Write encoder.onnx and decoder.onnx. Opset 13 decomposes LayerNorm as WeNet's export does;
    opset >= 17 gives native LayerNormalization. `decoder_fastertransformer` False exports WeNet's default
    decoder (best_index only); `decoder_out_axes` is one of DECODER_OUT_AXES. With reverse_weight 0 the
    decoder has WeNet's 5 inputs (no r_hyps_pad_sos_eos). Returns the two paths."""
    if opset < 13:
        raise ValueError("opset must be >= 13 (per-channel Q/DQ needs 13)")
    if decoder_out_axes not in DECODER_OUT_AXES:
        raise WorkbenchError(f"decoder_out_axes must be one of {DECODER_OUT_AXES}, not {decoder_out_axes!r}")
    out_dir = Path(out_dir)
    rw = model.cfg.reverse_weight if reverse_weight is None else reverse_weight
    model = model.eval()
    enc_path, dec_path = out_dir / "encoder.onnx", out_dir / "decoder.onnx"
    with torch.no_grad():
        _export(EncoderForExport(model, beam), dummy_encoder_inputs(), enc_path, ENCODER_INPUTS, ENCODER_OUTPUTS,
                {"speech": {0: "B", 1: "T"}, "speech_lengths": {0: "B"},
                 "encoder_out": {0: "B", 1: "T_OUT"}, "encoder_out_lens": {0: "B"},
                 "ctc_log_probs": {0: "B", 1: "T_OUT"}, "beam_log_probs": {0: "B", 1: "T_OUT"},
                 "beam_log_probs_idx": {0: "B", 1: "T_OUT"}}, opset)
        # All 6 names even when reverse_weight is 0, as WeNet: names are given to the traced inputs before the
        # exporter drops the unused r_hyps_pad_sos_eos (5 names would call that one ctc_score and leave the
        # real ctc_score unnamed, 'onnx::Mul_5').
        dec_axes = {"encoder_out": {0: "B", 1: "T"}, "encoder_out_lens": {0: "B"},
                    "hyps_pad_sos_eos": {0: "B", 2: "T2"}, "hyps_lens_sos": {0: "B"},
                    "r_hyps_pad_sos_eos": {0: "B", 2: "T2"}, "ctc_score": {0: "B"}, "best_index": {0: "B"}}
        if rw <= 0:
            dec_axes.pop("r_hyps_pad_sos_eos")  # not in the graph: the exporter would warn about the name
        dec_outputs = DECODER_OUTPUTS if decoder_fastertransformer else ["best_index"]
        if decoder_fastertransformer and decoder_out_axes == "named":
            dec_axes["decoder_out"] = {0: "B", 2: "T2_OUT"}
        unknown = "decoder_out" if decoder_fastertransformer and decoder_out_axes == "unknown" else None
        _export(DecoderForExport(model, ctc_weight, rw, beam, decoder_fastertransformer),
                dummy_decoder_inputs(model, beam=beam), dec_path, DECODER_INPUTS, dec_outputs, dec_axes, opset,
                unknown)
    return enc_path, dec_path
