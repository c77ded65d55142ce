"""Hackathon surgery: fix the decoder's hypothesis length.

The hackathon pinned `hyps_pad_sos_eos` (and `r_hyps_pad_sos_eos`) to [B, 10, 64]; a static last dimension
lets TensorRT build one shape for the rescoring decoder.  Input names and dtypes are kept."""
from __future__ import annotations

from pathlib import Path

import onnx

from core.errors import WorkbenchError
from core.fsutil import atomic_path

from .analysis import load_model

HYPS_INPUTS = ("hyps_pad_sos_eos", "r_hyps_pad_sos_eos")


def fix_hyps_length(model: str | Path | onnx.ModelProto, length: int = 64, out: str | Path | None = None
                    ) -> onnx.ModelProto:
    """Set the last dimension of `hyps_pad_sos_eos` and, when present, `r_hyps_pad_sos_eos` to `length`
    (a copy; written atomically to `out` if given).  The model must have `hyps_pad_sos_eos`."""
    m = onnx.ModelProto.FromString(load_model(model).SerializeToString())
    inputs = {i.name: i for i in m.graph.input}
    if "hyps_pad_sos_eos" not in inputs:
        raise WorkbenchError("model has no input 'hyps_pad_sos_eos': is it the attention-rescoring decoder?")
    for name in HYPS_INPUTS:
        if name not in inputs:
            continue
        dims = inputs[name].type.tensor_type.shape.dim
        if len(dims) != 3:
            raise WorkbenchError(f"input {name!r} has rank {len(dims)}, expected 3 ([B, beam, T2])")
        if dims[2].HasField("dim_value") and dims[2].dim_value not in (0, length):
            raise WorkbenchError(f"input {name!r} already has a fixed length {dims[2].dim_value}")
        dims[2].Clear()
        dims[2].dim_value = length
    del m.graph.value_info[:]  # re-inferred with the new static length
    m = onnx.shape_inference.infer_shapes(m)
    onnx.checker.check_model(m)
    if out is not None:
        with atomic_path(out) as tmp:
            onnx.save(m, str(tmp))
    return m
