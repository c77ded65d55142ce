"""WeNet-style U2++ conformer (encoder, CTC, bidirectional attention decoder) and its ONNX export."""
from .config import CONFIGS, ModelConfig, get_config
from .asr_model import ASRModel

__all__ = ["ASRModel", "CONFIGS", "ModelConfig", "get_config"]
