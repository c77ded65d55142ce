"""The shipped weights are a trained recogniser: a CER bound that random weights fail."""
import pytest

from calibration_data.corpus import ensure_corpus, load_split
from calibration_data.text import DEFAULT_VOCAB
from evaluation.asr import evaluate
from engines import open_onnx
from models.export import export_onnx
from models.weights import DEFAULT_WEIGHTS, default_model

N_UTTS = 16
CER_BOUND = 0.20  # the trained model gets ~8% on the full held-out-voice test split; random weights ~100%


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    cache = tmp_path_factory.mktemp("corpus")
    ensure_corpus(cache, {"test": N_UTTS}, seed=0, workers=2, progress=False)
    split = load_split(cache, "test")
    return [split.features(i) for i in range(len(split))], split.texts


def _cer(model, out_dir, held_out):
    enc, dec = export_onnx(model, out_dir)
    feats, texts = held_out
    res = evaluate(open_onnx(enc, kind="encoder"), open_onnx(dec, kind="decoder"), feats, texts, DEFAULT_VOCAB,
                   progress=False)
    return res["cer_rescore"]


def test_shipped_weights_recognise_held_out_voices(held_out, tmp_path):
    assert DEFAULT_WEIGHTS.is_file(), "models/weights/small.safetensors is missing"
    model, trained = default_model("small")
    assert trained
    assert _cer(model, tmp_path, held_out) < CER_BOUND


def test_random_weights_fail_the_same_bound(held_out, tmp_path):
    import torch
    from models import ASRModel, get_config

    torch.manual_seed(0)
    assert _cer(ASRModel(get_config("small")).eval(), tmp_path, held_out) > CER_BOUND
