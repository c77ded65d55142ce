"""One streaming pass of the FP32 model over the calibration data, keeping only per-tensor statistics.

The model is run by ONNX Runtime with the tensors to calibrate exposed as its graph outputs. Each batch's
activations update a `TensorStats` per tensor (min, max, count, exact-growing |x| histogram) and are dropped at
once, so peak memory is one batch's activations plus O(tensors x bins): it does not grow with the number of
samples. With `tensors_per_pass`, the tensors are split into chunks collected in separate passes over the data
(each pass builds its own session), for models where exposing every tensor at once costs too much memory.

Padding. With a `Padding` spec (the WeNet encoder's is `Padding.wenet_encoder()`, used automatically by
`calibrate` when the model has `speech`/`speech_lengths`), statistics ignore padded positions: for every exposed
tensor whose leading axis is the batch, each sample contributes only its valid region. The valid extent of an axis
is found from its size. Time axes are found once per pass by a probe: the first batch's first sample is run alone
at its length L and at L - 8 frames; an axis is a time axis iff its size changed (samples shorter than 24 frames,
or a model that fails the probe: no time axes, padding counted). A time axis's valid extent is:
  - size == padded input length T_in: the sample's input length (`speech_lengths`);
  - size == padded output length T_out (the largest of `encoder_out_lens` in the batch): the sample's output length;
  - T_out < size < T_in (inside the subsampling front end): floor(length * size / T_in), an approximation that
    can differ from the exact conv arithmetic by one frame at the edge (WeNet: only the second subsampling
    Conv's input);
  - any other size: the whole axis.
A tensor whose leading axis is 1 while the batch is larger (the positional encoding) is broadcast over the batch:
it is counted once per sample with that sample's valid region, exactly as batch size 1 would count it. Tensors
whose leading axis is neither B nor 1 are counted whole, padding included. Without a `Padding` spec everything is
counted, padding included. With padding handled, the statistics equal those of batch size 1 whenever the model's
valid outputs do not depend on padding. NOTE: WeNet's conformer does leak padding into valid frames (its
ConvolutionModule masks before pointwise_conv1, whose bias makes padded frames non-zero before the depthwise conv),
so on WeNet the FP32 activations themselves, and hence every statistic, change slightly with batch composition.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from evaluation import asr
from graph.analysis import load_model
from core.errors import WorkbenchError

from .histogram import DEFAULT_BINS, NonFiniteError, TensorStats

_ORT_DTYPES = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.BOOL: np.bool_,
}


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Padding:
    """How to find each sample's valid region: the length input, the padded time input and axis, and optionally
    the graph output holding per-sample lengths after subsampling."""

    length_input: str = "speech_lengths"
    time_input: str = "speech"
    time_axis: int = 1
    out_lengths: str | None = "encoder_out_lens"

    @classmethod
    def wenet_encoder(cls) -> "Padding":
        return cls()


class EncoderFeeds:
    """Re-iterable batches of WeNet encoder feeds from a corpus split (or any object with `len()` and
    `.features(i)` -> float32 [T, 80]): utterances in index order, `batch_size` per batch, zero-padded to the
    longest in the batch, with `speech_lengths` int32. Only one batch is in memory at a time."""

    def __init__(self, split, batch_size: int = 16, limit: int | None = None, indices: list[int] | None = None):
        if batch_size < 1:
            raise WorkbenchError(f"batch size must be >= 1, got {batch_size}")
        self.split = split
        self.batch_size = batch_size
        idx = list(range(len(split))) if indices is None else list(indices)
        if limit:
            idx = idx[:limit]
        self.indices = idx

    @property
    def n_samples(self) -> int:
        return len(self.indices)

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for lo in range(0, len(self.indices), self.batch_size):
            feats = [self.split.features(i) for i in self.indices[lo:lo + self.batch_size]]
            yield encoder_feed(feats)


def encoder_feeds(split, batch_size: int = 16, limit: int | None = None, indices: list[int] | None = None) -> EncoderFeeds:
    return EncoderFeeds(split, batch_size, limit, indices)


def encoder_feed(feats: list[np.ndarray]) -> dict[str, np.ndarray]:
    """[T_i, F] arrays -> {"speech": float32 [B, max T, F] zero-padded, "speech_lengths": int32 [B]}."""
    speech, lengths = asr.pad_batch(feats)
    return {"speech": speech, "speech_lengths": lengths}


# --------------------------------------------------------------------------- model
def _value_infos(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # shape inference is only a hint here
        inferred = model
    g = inferred.graph
    return {v.name: v for v in list(g.value_info) + list(g.output) + list(g.input)}


def _check_tensors(model: onnx.ModelProto, tensors: list[str]) -> None:
    produced = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    inits = {i.name for i in model.graph.initializer}
    for t in tensors:
        if t in inits and t not in produced:
            raise WorkbenchError(f"tensor {t!r} is a constant initializer of the model, not an activation: "
                                 "weights are calibrated from the initializers (quant.weights)")
        if t not in produced:
            raise WorkbenchError(f"tensor {t!r} does not exist in the model (no node produces it and no graph "
                                 "input has that name)")


def observer_session(model: onnx.ModelProto, outputs: list[str], threads: int | None = None,
                     vinfo: dict | None = None, optimize: bool = True):
    """An ONNX Runtime session of `model` whose outputs are the intermediate tensors `outputs` (calibration's
    observer; quant.smooth's channel ranges, with `optimize` off: the FP32 tensors exactly as the file
    computes them)."""
    # A raw ONNX Runtime session on purpose, the one kept outside engines/ in this layer: calibration observes
    # intermediate tensors (exposed as graph outputs of an in-memory copy, arena off, chunked passes), which is
    # not an engine's job (an engine runs a model's own interface), and quant is below engines in the layer
    # order (tests/test_layers.py), so it cannot use engines.open_onnx. Feeds are checked by `_check_feed`.
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    vinfo = _value_infos(model) if vinfo is None else vinfo
    for name in outputs:
        vi = vinfo.get(name)
        if vi is not None and vi.type.HasField("tensor_type"):
            out = onnx.ValueInfoProto()
            out.CopyFrom(vi)
            out.name = name
        else:
            out = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        m.graph.output.append(out)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # Without the arena, buffers of a long batch go back to the allocator instead of staying reserved for the
    # rest of the pass: peak memory then follows the longest batch, not the number of samples.
    so.enable_cpu_mem_arena = False
    if threads:
        so.intra_op_num_threads = threads
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise WorkbenchError(f"ONNX Runtime cannot load the model with the calibration outputs: {exc}") from exc


def _check_feed(feed: Mapping, inputs: dict, batch: int, first: int) -> int:
    """Validate one feed dict against the model's inputs; return its batch size."""
    where = f"calibration batch {batch} (samples from {first})"
    if not isinstance(feed, Mapping):
        raise WorkbenchError(f"{where}: expected a dict of input name -> array, got {type(feed).__name__}")
    for name in feed:
        if name not in inputs:
            raise WorkbenchError(f"{where}: input {name!r} does not exist in the model "
                                 f"(its inputs: {', '.join(inputs)})")
    bsz = None
    for name, vi in inputs.items():
        if name not in feed:
            raise WorkbenchError(f"{where}: model input {name!r} is missing from the data")
        x = feed[name]
        if not isinstance(x, np.ndarray):
            raise WorkbenchError(f"{where}: input {name!r} is a {type(x).__name__}, expected a numpy array")
        tt = vi.type.tensor_type
        want = _ORT_DTYPES.get(tt.elem_type)
        if want is not None and x.dtype != want:
            raise WorkbenchError(f"{where}: input {name!r} has dtype {x.dtype}, the model expects "
                                 f"{np.dtype(want).name}")
        if tt.HasField("shape"):
            dims = tt.shape.dim
            if x.ndim != len(dims):
                raise WorkbenchError(f"{where}: input {name!r} has shape {list(x.shape)} (rank {x.ndim}), the "
                                     f"model expects rank {len(dims)}")
            for ax, d in enumerate(dims):
                if d.HasField("dim_value") and x.shape[ax] != d.dim_value:
                    raise WorkbenchError(f"{where}: input {name!r} has shape {list(x.shape)}, the model expects "
                                         f"{d.dim_value} on axis {ax}")
        if x.ndim and bsz is None:
            bsz = x.shape[0]
        if np.issubdtype(x.dtype, np.floating) and x.size and not np.isfinite(x).all():
            bad = int(np.argwhere(~np.isfinite(x))[0][0]) if x.ndim else 0
            raise WorkbenchError(f"input {name!r} has NaN or Inf in calibration sample {first + bad} "
                                 f"(batch {batch}, row {bad})")
    return bsz or 1


# --------------------------------------------------------------------------- padding
def _probe_time_axes(sess, outputs: list[str], chunk: list[str], feed: Mapping, padding: Padding) -> dict[str, set[int]]:
    """Axes whose size follows the input length: run sample 0 of `feed` alone at two lengths and compare shapes."""
    L = int(np.asarray(feed[padding.length_input]).reshape(-1)[0])
    if L < 24:
        return {}
    shapes = []
    for n in (L, L - 8):
        f = {}
        for k, v in feed.items():
            v = np.asarray(v)[:1]
            if k == padding.time_input:
                sl = [slice(None)] * v.ndim
                sl[padding.time_axis] = slice(0, n)
                v = np.ascontiguousarray(v[tuple(sl)])
            elif k == padding.length_input:
                v = np.full_like(v, n)
            f[k] = v
        outs = sess.run(chunk, f)
        shapes.append([o.shape for o in outs])
        del outs
    return {t: {ax for ax, (a, b) in enumerate(zip(s0, s1)) if a != b and ax > 0}
            for t, s0, s1 in zip(chunk, shapes[0], shapes[1]) if len(s0) == len(s1)}


def _parts(x: np.ndarray, ctx, time_axes: set[int] | None) -> list[np.ndarray] | None:
    """The per-sample valid regions of x, or None for 'use x whole'."""
    if ctx is None or x.ndim == 0:
        return None
    B, lens_in, lens_out, T_in, T_out, unpadded = ctx
    lead = x.shape[0]
    if B == 1 or lead not in (B, 1):
        return None
    axes = []
    for ax in range(1, x.ndim):
        if time_axes is None or ax not in time_axes:
            continue
        S = x.shape[ax]
        if S == T_in:
            axes.append((ax, lens_in))
        elif lens_out is not None and S == T_out:
            axes.append((ax, lens_out))
        elif lens_out is not None and T_out < S < T_in:
            axes.append((ax, (lens_in.astype(np.int64) * S) // T_in))
    if lead == B and (not axes or unpadded):
        return None
    parts = []
    for b in range(B):
        sl = [b if lead == B else 0] + [slice(None)] * (x.ndim - 1)
        for ax, lens in axes:
            sl[ax] = slice(0, int(lens[b]))
        parts.append(x[tuple(sl)])
    return parts


# --------------------------------------------------------------------------- collection
@dataclass
class CollectResult:
    stats: dict[str, TensorStats]
    n_samples: int
    n_batches: int
    passes: int
    padding: str
    batch_sizes: list[int] = field(default_factory=list)


def collect_statistics(model: str | os.PathLike | onnx.ModelProto, tensors: list[str], data: Iterable[Mapping],
                       *, bins: int = DEFAULT_BINS, padding: Padding | None = None,
                       tensors_per_pass: int | None = None, threads: int | None = None,
                       progress: bool = True) -> CollectResult:
    """Run the FP32 model over `data` (feed dicts) and return per-tensor statistics.

    Raises WorkbenchError for: tensors not in the model, an empty data set, feeds that do not match the model's
    inputs (names, dtype, rank, static dims), NaN/Inf in inputs or in a collected tensor (naming tensor and sample),
    and ONNX Runtime failures (naming the batch's samples)."""
    from tqdm import tqdm

    m = load_model(model)
    tensors = list(dict.fromkeys(tensors))
    if not tensors:
        raise WorkbenchError("no tensors to calibrate")
    _check_tensors(m, tensors)
    inits = {i.name for i in m.graph.initializer}
    inputs = {i.name: i for i in m.graph.input if i.name not in inits}
    vinfo = _value_infos(m)
    model_outputs = {o.name for o in m.graph.output}
    if padding is not None:
        for name in (padding.length_input, padding.time_input):
            if name not in inputs:
                raise WorkbenchError(f"padding spec names input {name!r}, which the model does not have")
        if padding.out_lengths is not None and padding.out_lengths not in model_outputs:
            padding = Padding(padding.length_input, padding.time_input, padding.time_axis, None)

    per_pass = tensors_per_pass or len(tensors)
    chunks = [tensors[i:i + per_pass] for i in range(0, len(tensors), per_pass)]
    if len(chunks) > 1 and iter(data) is data:
        raise WorkbenchError("collecting in several passes needs re-iterable data (a list or an EncoderFeeds), "
                             "not a one-shot iterator")
    stats = {t: TensorStats(t, bins) for t in tensors}
    n_samples = n_batches = 0
    batch_sizes: list[int] = []
    for pi, chunk in enumerate(chunks):
        extra = [padding.out_lengths] if padding is not None and padding.out_lengths else []
        outputs = chunk + [o for o in extra if o not in chunk]
        sess = observer_session(m, outputs, threads, vinfo)
        total = len(data) if hasattr(data, "__len__") else None
        desc = "calibrating" if len(chunks) == 1 else f"calibrating (pass {pi + 1}/{len(chunks)})"
        first = 0
        nb = 0
        time_axes: dict[str, set[int]] = {}
        for bi, feed in enumerate(tqdm(data, total=total, desc=desc, unit="batch", disable=not progress,
                                       leave=False)):
            B = _check_feed(feed, inputs, bi, first)
            if bi == 0 and padding is not None:
                try:
                    time_axes = _probe_time_axes(sess, outputs, chunk, feed, padding)
                except Exception:  # a model that cannot run a shortened sample: count padding (see docstring)
                    time_axes = {}
            try:
                outs = sess.run(outputs, dict(feed))
            except Exception as exc:
                raise WorkbenchError(f"ONNX Runtime failed on calibration batch {bi} (samples {first}.."
                                     f"{first + B - 1}): {exc}") from exc
            ctx = None
            if padding is not None and B > 1:
                lens_in = np.asarray(feed[padding.length_input]).reshape(-1)
                T_in = feed[padding.time_input].shape[padding.time_axis]
                lens_out = (np.asarray(outs[outputs.index(padding.out_lengths)]).reshape(-1)
                            if padding.out_lengths else None)
                T_out = int(lens_out.max()) if lens_out is not None else None
                unpadded = bool((lens_in == T_in).all())
                ctx = (B, lens_in, lens_out, T_in, T_out, unpadded)
            for ti, name in enumerate(chunk):
                x = outs[ti]
                outs[ti] = None
                parts = _parts(x, ctx, time_axes.get(name))
                try:
                    if parts is None:
                        stats[name].update(x)
                    else:
                        for p in parts:
                            stats[name].update(p)
                except NonFiniteError:
                    raise WorkbenchError(_nonfinite_message(name, x, parts, bi, first, B)) from None
                del x, parts
            del outs
            first += B
            nb += 1
            if pi == 0:
                batch_sizes.append(B)
        if pi == 0:
            n_samples, n_batches = first, nb
            if nb == 0:
                raise WorkbenchError("the calibration data set is empty: no batch was given")
        elif first != n_samples:
            raise WorkbenchError(f"the calibration data changed between passes ({n_samples} samples in the first, "
                                 f"{first} in pass {pi + 1})")
        del sess
    return CollectResult(stats, n_samples, n_batches, len(chunks),
                         "ignored (valid regions only)" if padding is not None else "included", batch_sizes)


def _nonfinite_message(name: str, x: np.ndarray, parts, batch: int, first: int, B: int) -> str:
    rows = parts if parts is not None else ([x[b] for b in range(B)] if x.ndim and x.shape[0] == B else None)
    if rows is not None:
        for b, r in enumerate(rows):
            if not np.isfinite(r).all():
                kind = "NaN" if np.isnan(r).any() else "Inf"
                return (f"tensor {name!r} has {kind} for calibration sample {first + b} (batch {batch}, row {b}): "
                        "the FP32 model produces non-finite values on it, so no range can be calibrated")
    kind = "NaN" if np.isnan(x).any() else "Inf"
    return (f"tensor {name!r} has {kind} in calibration batch {batch} (samples {first}..{first + B - 1}): "
            "the FP32 model produces non-finite values, so no range can be calibrated")
