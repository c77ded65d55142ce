"""Tiny random-init encoder/decoder ONNX pairs with the structural traits of a real WeNet
`export_onnx_gpu.py` export of a U2++ conformer, rather than only our own export's conventions:

- the conv module of WeNet's U2++ confs (`cnn_module_norm: layer_norm`, `causal: true`, kernel 8): a
  decomposed LayerNorm instead of BatchNormalization, and an ONNX Pad (K-1 frames on the left) ahead of
  each depthwise Conv;
- `Identity` nodes on both an activation path (-> MatMul's activation input) and a weight path
  (initializer -> Identity -> MatMul's weight input), as torch exports of real checkpoints contain;
- a vocabulary other than our 31 units, with WeNet's `units.txt` (`<blank> 0`, `<unk> 1`, ...,
  `<sos/eos> V-1`, the middle units CJK characters as AISHELL's char dict);
- WeNet's default decoder (no `--decoder_fastertransformer`: `best_index` only, `decoder_out` axes left to
  the exporter), and with reverse_weight 0 the 5-input decoder (r_hyps_pad_sos_eos pruned).

Plain functions, not fixtures, so that any test module can call them (e.g. from a session fixture).
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import torch

from models import ASRModel, ModelConfig
from models.export import export_onnx

OPSET = 13  # export_onnx_gpu.py's opset for the offline encoder and the rescoring decoder
N_IDENTITY = 2  # Identity nodes inserted per path (activation, weight) and per graph


class WenetLikePair(NamedTuple):
    encoder: Path
    decoder: Path
    units: Path


def wenet_like_config(*, reverse_weight: float = 0.3, vocab_size: int = 57) -> ModelConfig:
    """AISHELL train_u2++_conformer.yaml's conv module (kernel 8, causal, layer_norm) at a tiny width."""
    return ModelConfig(name="wenet-like", vocab_size=vocab_size, output_size=64, attention_heads=4,
                       linear_units=128, num_blocks=2, cnn_module_kernel=8, cnn_module_norm="layer_norm",
                       causal=True, decoder_attention_heads=4, decoder_linear_units=128, decoder_num_blocks=1,
                       r_decoder_num_blocks=1, reverse_weight=reverse_weight)


def make_wenet_like_model(*, reverse_weight: float = 0.3, vocab_size: int = 57, seed: int = 0) -> ASRModel:
    """The random-init PyTorch model behind make_wenet_like_pair (same arguments give the same weights),
    with non-trivial CMVN statistics so that the graph's first nodes do something."""
    with torch.random.fork_rng():  # leave the caller's global RNG alone
        torch.manual_seed(seed)
        model = ASRModel(wenet_like_config(reverse_weight=reverse_weight, vocab_size=vocab_size))
    rng = np.random.default_rng(seed)
    n, dim = 1000, model.cfg.input_dim
    mean = rng.normal(10, 2, dim)
    model.encoder.set_cmvn({"mean_stat": (mean * n).tolist(), "var_stat": ((mean ** 2 + 4.0) * n).tolist(),
                            "frame_num": n})
    return model.eval()


def unit_names(vocab_size: int) -> list[str]:
    """WeNet's char dict layout: <blank> 0, <unk> 1, units, <sos/eos> last (the default sos = eos = V-1)."""
    return ["<blank>", "<unk>", *(chr(0x4E00 + i) for i in range(vocab_size - 3)), "<sos/eos>"]


def write_units(path: str | Path, vocab_size: int) -> Path:
    """`units.txt` in WeNet's format: one `token id` line per unit."""
    path = Path(path)
    path.write_text("".join(f"{u} {i}\n" for i, u in enumerate(unit_names(vocab_size))), encoding="utf-8")
    return path


def insert_identities(model: onnx.ModelProto, n: int = N_IDENTITY) -> list[str]:
    """Route the activation input of the first `n` MatMuls with a weight initializer, and the weight input of
    the next `n`, through new Identity nodes (in place). Returns the new nodes' names."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    matmuls = [node for node in g.node if node.op_type == "MatMul" and node.input[1] in inits
               and node.input[0] not in inits]
    if len(matmuls) < 2 * n:
        raise ValueError(f"only {len(matmuls)} MatMuls with a weight initializer, {2 * n} wanted")
    names = []
    for k, node in enumerate(matmuls[:2 * n]):
        slot, path = (0, "act") if k < n else (1, "weight")
        name = f"/wenet_like/Identity_{path}_{k}"
        ident = onnx.helper.make_node("Identity", [node.input[slot]], [name + "_output_0"], name=name)
        node.input[slot] = ident.output[0]
        # Just before its consumer, so that the node list stays topologically sorted.
        g.node.insert(list(g.node).index(node), ident)
        names.append(name)
    return names


def make_wenet_like_pair(out_dir: str | Path, *, reverse_weight: float = 0.3, fastertransformer: bool = False,
                         vocab_size: int = 57, seed: int = 0) -> WenetLikePair:
    """Write encoder.onnx, decoder.onnx and units.txt into out_dir (opset 13, ctc_weight baked in from the
    config, as export_onnx_gpu.py does by default). reverse_weight 0 gives the 5-input decoder;
    fastertransformer True adds `decoder_out` (B x beam x T2 x V, exporter-named dims) before `best_index`.
    The PyTorch reference is make_wenet_like_model with the same arguments."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = make_wenet_like_model(reverse_weight=reverse_weight, vocab_size=vocab_size, seed=seed)
    enc, dec = export_onnx(model, out_dir, opset=OPSET, ctc_weight=model.cfg.ctc_weight,
                           decoder_fastertransformer=fastertransformer, decoder_out_axes="wenet")
    for path in (enc, dec):
        m = onnx.load(str(path))
        insert_identities(m)
        onnx.checker.check_model(m)
        onnx.save(m, str(path))
    return WenetLikePair(enc, dec, write_units(out_dir / "units.txt", vocab_size))


def write_npz_feeds(onnx_path: str | Path, out_dir: str | Path, n: int = 4, seed: int = 0, *,
                    batch: tuple[int, int] = (1, 3), frames: tuple[int, int] = (32, 160)) -> list[Path]:
    """`n` feed files out_dir/feed_000.npz..., each one feed dict keyed by the graph's input names, shapes
    and dtypes read from the graph. Per file, each symbolic (or unknown) dim gets one size: axis 0 from
    `batch`, others from `frames` (inclusive ranges). Float inputs are standard normal; integer inputs named
    *len* hold valid lengths for the nearest preceding input (its axis `rank`, e.g. speech_lengths [B] for
    speech's T), the first row at full length; other integer inputs hold 0 or 1. Meant for the encoder
    (speech [B, T, 80] float32, speech_lengths int32); the decoder's token ids would need a vocabulary."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    init_names = {i.name for i in graph.initializer}
    inputs = [v for v in graph.input if v.name not in init_names]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        sizes: dict[str, int] = {}
        feeds: dict[str, np.ndarray] = {}
        for k, v in enumerate(inputs):
            t = v.type.tensor_type
            shape = []
            for axis, d in enumerate(t.shape.dim):
                if d.HasField("dim_value"):
                    shape.append(d.dim_value)
                    continue
                key = d.dim_param or f"{v.name}:{axis}"  # an unnamed dim is its own symbol
                lo, hi = batch if axis == 0 else frames
                shape.append(sizes.setdefault(key, int(rng.integers(lo, hi + 1))))
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
            if np.issubdtype(dtype, np.floating):
                feeds[v.name] = rng.standard_normal(shape).astype(dtype)
            elif "len" in v.name.lower() and k > 0:
                prev = feeds[inputs[k - 1].name]
                full = prev.shape[len(shape)] if prev.ndim > len(shape) else frames[1]
                lens = rng.integers(max(1, full // 2), full + 1, size=shape)
                lens.reshape(-1)[:1] = full
                feeds[v.name] = lens.astype(dtype)
            else:
                feeds[v.name] = rng.integers(0, 2, size=shape).astype(dtype)
        path = out_dir / f"feed_{i:03d}.npz"
        np.savez(path, **feeds)
        paths.append(path)
    return paths
