"""ONNX Runtime backend (the verified one): CPU by default, any execution provider via `providers`.

Artifact files: `<kind>.onnx` (a byte copy of the source model, loaded at run time), `<kind>.optimized.onnx`
(ONNX Runtime's graph after ORT_ENABLE_ALL optimisation, saved through `optimized_model_filepath`, so a person
can see which kernels run, QDQ fusions into integer kernels included) and `kernels.json` (`int8_kernel_report`).

Runners: `OnnxFileRunner` (`open_onnx`) runs an ONNX file as it is, without building an artifact (the FP32
reference of evaluations, calibration feeds, CLI checks); `OrtEngineRunner` (`load`) runs a built artifact and
adds its built shape ranges. Both are `engines.runner.EngineRunner`s: feeds checked once, in the base.
"""
from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from engines.base import EngineArtifact, physical_cores
from engines.runner import EngineRunner, check_interface, interface_specs
from evaluation.interface import INTERFACES, TensorSpec
from evaluation.runners import GENERIC, guess_kind
from core.errors import WorkbenchError
from core.fsutil import write_json

UNKEYED_OPTIONS = ()
KNOWN_OPTIONS = ("threads", "providers")

# ONNX Runtime CPU/CUDA kernels that compute in integers (QDQ groups fused by the optimiser, or
# QOperator-format ops); anything else named QLinear* or *Integer* counts too.
INTEGER_KERNELS = frozenset({
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "ConvInteger", "QGemm",
    "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QAttention", "QEmbedLayerNormalization", "QOrderedMatMul",
    "QOrderedAttention", "QOrderedLayerNormalization", "QOrderedGelu", "MatMulNBits", "QMoE",
})
FLOAT_COMPUTE = frozenset({"MatMul", "Gemm", "Conv", "FusedMatMul", "FusedGemm", "FusedConv", "Attention",
                           "MultiHeadAttention"})


def is_integer_kernel(op_type: str) -> bool:
    return op_type in INTEGER_KERNELS or op_type.startswith("QLinear") or "Integer" in op_type


def versions() -> dict:
    import onnxruntime as ort

    return {"onnxruntime": ort.__version__}


def check_usable() -> None:
    """ONNX Runtime is a core dependency: always usable."""


def normalize_options(options: Mapping) -> dict:
    import onnxruntime as ort

    unknown = set(options) - set(KNOWN_OPTIONS)
    if unknown:
        raise WorkbenchError(f"unknown onnxruntime build options {sorted(unknown)}: known are {', '.join(KNOWN_OPTIONS)}")
    threads = options.get("threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise WorkbenchError(f"threads must be a positive integer, got {threads!r}")
    providers = list(options.get("providers") or ["CPUExecutionProvider"])
    missing = [p for p in providers if p not in ort.get_available_providers()]
    if missing:
        raise WorkbenchError(f"execution providers {missing} are not available in this onnxruntime "
                             f"(available: {', '.join(ort.get_available_providers())})")
    return {"threads": threads, "providers": providers}


def _session_options(threads: int | None, optimized_path: Path | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or physical_cores()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
        so.log_severity_level = 3  # its warning: the saved graph is machine-specific (it is for reading only)
    return so


def build_files(onnx_path: Path, tmp: Path, kind: str, shapes: dict, options: dict) -> tuple[dict, dict]:
    """Write the artifact's files into `tmp`; returns ({role: file name}, extra engine.json fields)."""
    import onnxruntime as ort

    from engines.base import onnx_io

    io = onnx_io(onnx_path)
    if kind in INTERFACES:  # a WeNet encoder/decoder must have WeNet's interface; a "generic" model has its own
        check_interface(kind, str(onnx_path), list(io["inputs"]), list(io["outputs"]))
    engine, optimized = f"{kind}.onnx", f"{kind}.optimized.onnx"
    shutil.copyfile(onnx_path, tmp / engine)
    try:
        ort.InferenceSession(str(tmp / engine), _session_options(options["threads"], tmp / optimized),
                             providers=options["providers"])
    except Exception as e:  # ORT's load errors derive from Exception only
        raise WorkbenchError(f"ONNX Runtime cannot build {onnx_path}: {e}") from e
    if not (tmp / optimized).is_file():
        raise WorkbenchError(f"ONNX Runtime did not write the optimised model for {onnx_path}")
    report = _kernel_report(tmp / engine, tmp / optimized)
    write_json(tmp / "kernels.json", report)
    summary = {k: report[k] for k in ("integer_kernel_total", "input_quantize_linear", "input_dequantize_linear")}
    return {"engine": engine, "optimized": optimized, "kernels": "kernels.json"}, {"int8_kernels": summary}


ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
              "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def graph_interface(session) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The interface of any model, read from its ONNX Runtime session (unknown element types are not checked)."""
    def specs(args):
        return tuple(TensorSpec(a.name, ORT_DTYPES.get(a.type), len(a.shape or ())) for a in args)

    return specs(session.get_inputs()), specs(session.get_outputs())


class OnnxFileRunner(EngineRunner):
    """An ONNX Runtime session over an ONNX file (no artifact built), checked against the encoder or decoder
    interface, or, for a "generic" model, against its own inputs."""

    def __init__(self, path: str | Path, threads: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",), kind: str | None = None,
                 shapes=None, shapes_where: str | None = None):
        """`kind` is "encoder", "decoder" or "generic"; None tells them apart by the model's input names.
        `threads`: intra-op threads (None: ONNX Runtime's default). `shapes`: built ranges (OrtEngineRunner)."""
        import onnxruntime as ort  # deferred: importing it is slow and the TensorRT path never needs it

        path = Path(path)
        if not path.is_file():
            raise WorkbenchError(f"ONNX model {path} does not exist")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        except Exception as e:  # ORT's load errors derive from Exception only, one class per cause
            raise WorkbenchError(f"{path} is not a readable ONNX model: {e}") from e
        input_names = [i.name for i in self.session.get_inputs()]
        output_names = [o.name for o in self.session.get_outputs()]
        kind = kind or guess_kind(input_names)
        if kind == GENERIC:
            inputs, outputs = graph_interface(self.session)
        elif kind in INTERFACES:
            check_interface(kind, str(path), input_names, output_names)
            inputs, outputs = interface_specs(kind, input_names), interface_specs(kind, output_names, outputs=True)
        else:
            raise WorkbenchError(f"unknown model kind {kind!r}: expected 'encoder', 'decoder' or '{GENERIC}'")
        super().__init__(path, kind, inputs, outputs, shapes=shapes, shapes_where=shapes_where)

    def _run(self, feeds: Mapping[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        return dict(zip(outputs, self.session.run(outputs, feeds)))

    def _time_runs(self, feeds: Mapping[str, np.ndarray], warmup: int, iters: int) -> tuple[list[float], str]:
        """Seconds per `session.run` (the feeds were checked once, by `time_runs`)."""
        for _ in range(warmup):
            self.session.run(self.output_names, feeds)
        out = []
        for _ in range(iters):
            t0 = time.perf_counter()
            self.session.run(self.output_names, feeds)
            out.append(time.perf_counter() - t0)
        return out, "perf_counter"


def open_onnx(path: str | os.PathLike, threads: int | None = None,
              providers: Sequence[str] = ("CPUExecutionProvider",), kind: str | None = None) -> OnnxFileRunner:
    """A runner over the ONNX file `path` as it is (e.g. an FP32 model), without building an engine artifact."""
    return OnnxFileRunner(path, threads=threads, providers=providers, kind=kind)


class OrtEngineRunner(OnnxFileRunner):
    """A runner over an ONNX Runtime engine artifact: the evaluator's interface checks plus built shape ranges."""

    def __init__(self, artifact: EngineArtifact, threads: int | None = None, providers=None):
        path = artifact.verified_file("engine")
        opts = artifact.meta["options"]
        self.threads = threads or opts.get("threads") or physical_cores()
        self.providers = list(providers or opts.get("providers") or ["CPUExecutionProvider"])
        self.artifact = artifact
        super().__init__(path, threads=self.threads, providers=self.providers, kind=artifact.kind,
                         shapes=artifact.shapes, shapes_where=f"engine {artifact.path}")


def load(artifact: EngineArtifact, threads: int | None = None, providers=None) -> OrtEngineRunner:
    if artifact.backend != "onnxruntime":
        raise WorkbenchError(f"{artifact.path} is a {artifact.backend} engine, not an onnxruntime one")
    return OrtEngineRunner(artifact, threads=threads, providers=providers)


def _op_counts(graph) -> Counter:
    counts: Counter = Counter()
    for node in graph.node:
        counts[node.op_type] += 1
        for attr in node.attribute:  # If / Loop / Scan bodies
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                counts += _op_counts(sub)
    return counts


def _kernel_report(source: Path, optimized: Path) -> dict:
    import onnx

    src = _op_counts(onnx.load(str(source), load_external_data=False).graph)
    opt = _op_counts(onnx.load(str(optimized), load_external_data=False).graph)
    integer = {op: n for op, n in sorted(opt.items()) if is_integer_kernel(op)}
    return {
        "integer_kernels": integer,
        "integer_kernel_total": sum(integer.values()),
        "float_compute_kernels": {op: n for op, n in sorted(opt.items()) if op in FLOAT_COMPUTE},
        "input_quantize_linear": src.get("QuantizeLinear", 0),
        "input_dequantize_linear": src.get("DequantizeLinear", 0),
        "optimized_quantize_linear": opt.get("QuantizeLinear", 0),
        "optimized_dequantize_linear": opt.get("DequantizeLinear", 0),
        "input_node_count": sum(src.values()),
        "optimized_node_count": sum(opt.values()),
        "optimized_op_counts": dict(sorted(opt.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


def int8_kernel_report(artifact: EngineArtifact | str | os.PathLike) -> dict:
    """Op-type counts of ONNX Runtime's optimised graph: integer kernels (QLinearMatMul, MatMulIntegerToFloat,
    ...) against the QuantizeLinear/DequantizeLinear count of the input model, and float compute left."""
    if not isinstance(artifact, EngineArtifact):
        artifact = EngineArtifact.open(artifact)
    if artifact.backend != "onnxruntime":
        raise WorkbenchError(f"int8_kernel_report reads ONNX Runtime's optimised graph, but {artifact.path} is a "
                             f"{artifact.backend} engine (its per-layer precisions are in its layers file)")
    report = _kernel_report(artifact.file("engine"), artifact.file("optimized"))
    return {"engine": str(artifact.path), "kind": artifact.kind, "providers": artifact.meta["options"]["providers"],
            **report}


def op_times(path: str | os.PathLike, feeds: Mapping[str, np.ndarray], threads: int | None = None, runs: int = 5,
             warmup: int = 2) -> dict:
    """Where a model's time goes: ONNX Runtime's own profiler over `runs` runs of `feeds` (after `warmup`), the
    kernels' milliseconds per run summed by op type of the optimised graph (median over runs), with each op
    type's node count and whether it computes in integers. {"threads", "runs", "run_ms" (median wall time of a
    run, profiled), "kernel_ms" (median sum of kernel times), "ops": {op_type: {"ms", "nodes", "integer"}},
    "nodes": {node name: {"op", "ms"}}} (names of the optimised graph: fused nodes get new ones).
    Profiling adds a little per kernel, so the milliseconds rank and apportion; timings come from bench."""
    import json
    import statistics
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="wb-profile-") as tmp:
        so = _session_options(threads)
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        try:
            session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT's load errors derive from Exception only
            raise WorkbenchError(f"{path} is not a readable ONNX model: {e}") from e
        outputs = [o.name for o in session.get_outputs()]
        for _ in range(warmup + runs):
            session.run(outputs, dict(feeds))
        events = json.loads(Path(session.end_profiling()).read_text())
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                     if e.get("cat") == "Session" and e.get("name") == "model_run")[warmup:]
    per_run: list[dict[str, float]] = [{} for _ in windows]  # node name -> ms, per run
    op_of: dict[str, str] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        name = e["name"][:-len("_kernel_time")]
        op_of[name] = e.get("args", {}).get("op_name", "?")
        for i, (t0, t1) in enumerate(windows):
            if t0 <= e["ts"] <= t1:
                per_run[i][name] = per_run[i].get(name, 0.0) + e["dur"] / 1e3
                break
    med = lambda xs: round(statistics.median(xs), 3)  # noqa: E731
    ops = {op: {"ms": med([sum(r.get(n, 0.0) for n in op_of if op_of[n] == op) for r in per_run]),
                "nodes": sum(1 for n in op_of if op_of[n] == op), "integer": is_integer_kernel(op)}
           for op in set(op_of.values())}
    return {"threads": threads or physical_cores(), "runs": len(windows),
            "run_ms": med([(t1 - t0) / 1e3 for t0, t1 in windows]),
            "kernel_ms": med([sum(r.values()) for r in per_run]),
            "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]["ms"])),
            "nodes": {n: {"op": op_of[n], "ms": med([r.get(n, 0.0) for r in per_run])} for n in op_of}}
