"""The PyTorch model behind the evaluator's runner protocol: the FP32 reference for the hackathon output check."""
from __future__ import annotations

import numpy as np
import torch

from .asr_model import ASRModel
from .export import DECODER_INPUTS, DECODER_OUTPUTS, ENCODER_INPUTS, ENCODER_OUTPUTS, DecoderForExport, \
    EncoderForExport


class TorchRunner:
    """Runs exactly the modules that export_onnx traces, so its outputs are what the ONNX graph should give."""

    def __init__(self, model: ASRModel, kind: str, ctc_weight: float = 0.5):
        self.kind = kind
        if kind == "encoder":
            self.module = EncoderForExport(model)
            self.input_names, self.output_names = list(ENCODER_INPUTS), list(ENCODER_OUTPUTS)
        elif kind == "decoder":
            self.module = DecoderForExport(model, ctc_weight, model.cfg.reverse_weight)
            self.input_names, self.output_names = list(DECODER_INPUTS), list(DECODER_OUTPUTS)
        else:
            raise ValueError(f"kind must be 'encoder' or 'decoder', not {kind!r}")
        self.module.eval()

    @torch.no_grad()
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.module(*(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.input_names))
        return {n: o.numpy() for n, o in zip(self.output_names, outs)}
