"""Named model configurations. Field names follow WeNet's YAML (encoder_conf / decoder_conf / model_conf)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from calibration_data.text import DEFAULT_VOCAB
from core.errors import WorkbenchError


CNN_MODULE_NORMS = ("batch_norm", "layer_norm")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    input_dim: int = 80
    vocab_size: int = len(DEFAULT_VOCAB)
    # encoder (conformer, AISHELL train_conformer.yaml style: BatchNorm, non-causal, rel_pos, swish)
    output_size: int = 256
    attention_heads: int = 4
    linear_units: int = 1024
    num_blocks: int = 6
    cnn_module_kernel: int = 15
    # WeNet's U2++ confs (e.g. AISHELL train_u2++_conformer.yaml) use layer_norm and causal: true.
    cnn_module_norm: str = "batch_norm"  # "batch_norm" | "layer_norm" in the conv module
    causal: bool = False  # conv module input left-padded by K-1 zero frames, depthwise padding 0 (any K)
    dropout_rate: float = 0.1
    positional_dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    # bidirectional transformer decoder
    decoder_attention_heads: int = 4
    decoder_linear_units: int = 1024
    decoder_num_blocks: int = 1
    r_decoder_num_blocks: int = 1
    # model_conf
    ctc_weight: float = 0.3
    lsm_weight: float = 0.1
    reverse_weight: float = 0.3

    def __post_init__(self):
        if self.cnn_module_norm not in CNN_MODULE_NORMS:
            raise WorkbenchError(f"cnn_module_norm must be one of {CNN_MODULE_NORMS}, not {self.cnn_module_norm!r}")
        if not self.causal and self.cnn_module_kernel % 2 == 0:
            raise WorkbenchError(f"a non-causal conv module needs an odd cnn_module_kernel, "
                                 f"not {self.cnn_module_kernel}")
        if self.vocab_size < 3:  # <blank>, at least one unit, <sos/eos> = vocab_size - 1
            raise WorkbenchError(f"vocab_size must be >= 3, not {self.vocab_size}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise WorkbenchError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)


CONFIGS = {
    # Random-init model for tests: every structural feature of the real one, a tiny width.
    "tiny": ModelConfig(name="tiny", output_size=64, attention_heads=4, linear_units=128, num_blocks=2,
                        decoder_attention_heads=4, decoder_linear_units=128),
    # The trained flagship: d=256 and 4 heads (d_k=64) as WeNet's shapes, depth cut so that the
    # fp16 weights stay under the repository's 20 MB budget.
    "small": ModelConfig(name="small", output_size=256, attention_heads=4, linear_units=1024, num_blocks=4,
                         decoder_linear_units=512, decoder_num_blocks=1, r_decoder_num_blocks=1),
}


def get_config(name: str) -> ModelConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise WorkbenchError(f"unknown model config {name!r}; choose one of {sorted(CONFIGS)}") from None
