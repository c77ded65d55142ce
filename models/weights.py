"""Model weights on disk: one safetensors file holding the tensors and, in its metadata, the config."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from core.errors import WorkbenchError
from core.fsutil import atomic_path

from .asr_model import ASRModel
from .config import ModelConfig, get_config

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "small.safetensors"


def save_weights(model: ASRModel, path: str | Path, dtype: torch.dtype = torch.float16, extra: dict | None = None):
    """Floating tensors stored as `dtype` (fp16 keeps the shipped file small); buffers such as
    BatchNorm's num_batches_tracked keep their own type."""
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().cpu()
               for k, v in model.state_dict().items()}
    meta = {"config": json.dumps(model.cfg.to_dict()), **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        tmp.chmod(0o644)  # save_file recreates the file with a private mode


def read_metadata(path: str | Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    except (SafetensorError, OSError, json.JSONDecodeError) as exc:
        raise WorkbenchError(f"{path} is not a readable weights file: {exc}") from exc


def load_weights(path: str | Path) -> ASRModel:
    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"weights file not found: {path}")
    meta = read_metadata(path)
    if "config" not in meta:
        raise WorkbenchError(f"{path} has no model config in its metadata (not written by save_weights?)")
    model = ASRModel(ModelConfig.from_dict(meta["config"]))
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WorkbenchError(f"{path} does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def default_model(config: str = "small", seed: int = 0) -> tuple[ASRModel, bool]:
    """The shipped trained model when present, else a random-init `config` model. Returns (model, trained)."""
    if config == "small" and DEFAULT_WEIGHTS.is_file():
        return load_weights(DEFAULT_WEIGHTS), True
    warnings.warn(f"no trained weights for {config!r}: using a random-init model (quantization results on "
                  "random weights say little about a trained network)", stacklevel=2)
    torch.manual_seed(seed)
    return ASRModel(get_config(config)).eval(), False
