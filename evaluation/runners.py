"""Engine runners: any object with `input_names`, `output_names` and `run(feeds) -> outputs` will do.

`OrtRunner` is the ONNX Runtime one; TensorRT runners elsewhere implement the same three members.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from evaluation.interface import INTERFACES, TensorSpec
from core.errors import WorkbenchError


class Runner(Protocol):
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def interface_mismatch(kind: str, where: str, specs: Sequence[TensorSpec], names: Sequence[str]) -> str:
    """Empty if `names` fits `specs`, otherwise the missing/unexpected part of the message."""
    missing = [s.name for s in specs if not s.optional and s.name not in names]
    unexpected = [n for n in names if n not in {s.name for s in specs}]
    parts = []
    if missing:
        parts.append(f"missing {kind} {where} {', '.join(missing)}")
    if unexpected:
        parts.append(f"unexpected {kind} {where} {', '.join(unexpected)}")
    return "; ".join(parts)


GENERIC = "generic"  # any ONNX model: its own inputs (names, dtypes, ranks) are the interface
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
              "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def guess_kind(input_names: Sequence[str]) -> str:
    """"decoder" / "encoder" for WeNet's interface (by its distinctive inputs), else "generic"."""
    if "hyps_pad_sos_eos" in input_names:
        return "decoder"
    return "encoder" if "speech" in input_names else GENERIC


def graph_interface(session) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The interface of any model, read from its ONNX Runtime session (unknown element types are not checked)."""
    def specs(args):
        return tuple(TensorSpec(a.name, ORT_DTYPES.get(a.type), len(a.shape or ())) for a in args)

    return specs(session.get_inputs()), specs(session.get_outputs())


class OrtRunner:
    """An ONNX Runtime session checked against the encoder or decoder interface."""

    def __init__(
        self,
        path: str | Path,
        threads: int | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        kind: str | None = None,
    ):
        """`kind` is "encoder" or "decoder"; None tells them apart by the model's input names."""
        import onnxruntime as ort  # deferred: importing it is slow and the TensorRT path never needs it

        self.path = Path(path)
        if not self.path.is_file():
            raise WorkbenchError(f"ONNX model {self.path} does not exist")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=list(providers))
        except Exception as e:  # ORT's load errors derive from Exception only, one class per cause
            raise WorkbenchError(f"{self.path} is not a readable ONNX model: {e}") from e
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.kind = kind or guess_kind(self.input_names)
        if self.kind == GENERIC:
            inputs, outputs = graph_interface(self.session)
        elif self.kind in INTERFACES:
            inputs, outputs = INTERFACES[self.kind]
        else:
            raise WorkbenchError(f"unknown model kind {self.kind!r}: expected 'encoder', 'decoder' or '{GENERIC}'")
        problems = "; ".join(
            p
            for p in (
                interface_mismatch(self.kind, "inputs", inputs, self.input_names),
                interface_mismatch(self.kind, "outputs", outputs, self.output_names),
            )
            if p
        )
        if problems:
            raise WorkbenchError(f"{self.path} does not have WeNet's {self.kind} interface: {problems}")
        self._specs = {s.name: s for s in inputs}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_feeds(feeds)
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        # Every input this model has is required here, the interface's optional ones included.
        missing = [n for n in self.input_names if n not in feeds]
        unexpected = [n for n in feeds if n not in self.input_names]
        if missing or unexpected:
            raise WorkbenchError(
                f"feeds for {self.path}: missing inputs {missing or 'none'}, "
                f"unexpected inputs {unexpected or 'none'}"
            )
        for name, value in feeds.items():
            spec = self._specs[name]
            if not isinstance(value, np.ndarray) or (spec.dtype is not None and value.dtype != spec.dtype):
                got = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
                raise WorkbenchError(
                    f"input {name} of {self.path} must be {np.dtype(spec.dtype)}, got {got}"
                )
            if value.ndim != spec.rank:
                raise WorkbenchError(
                    f"input {name} of {self.path} must have rank {spec.rank}, got shape {value.shape}"
                )
            if spec.last_dim is not None and value.shape[-1] != spec.last_dim:
                raise WorkbenchError(
                    f"input {name} of {self.path} must have last dimension {spec.last_dim}, "
                    f"got shape {value.shape}"
                )
