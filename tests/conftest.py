import numpy as np
import pytest
import torch

from models import ASRModel, get_config
from models.export import export_onnx


@pytest.fixture(scope="session")
def tiny_model():
    torch.manual_seed(0)
    model = ASRModel(get_config("tiny")).eval()
    # Non-trivial CMVN so the first graph node is exercised.
    rng = np.random.default_rng(0)
    n = 1000
    mean = rng.normal(10, 2, 80)
    model.encoder.set_cmvn({"mean_stat": (mean * n).tolist(), "var_stat": ((mean ** 2 + 4.0) * n).tolist(),
                            "frame_num": n})
    return model


@pytest.fixture(scope="session")
def tiny_onnx(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_onnx")
    return export_onnx(tiny_model, out)
