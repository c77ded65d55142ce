"""TensorRT backend for TensorRT 10.x and 11.x (explicit quantization: strongly typed network from a Q/DQ,
optionally FP16-typed, ONNX model; no precision builder flags and no calibrators, which 11.x removed).

UNVERIFIED HERE: every function of this module (`available`, `check_usable`, `versions`, `normalize_options`,
`build_files`, `load`, `TrtEngineRunner` and its methods) is unverified: TensorRT and an NVIDIA GPU cannot be
had in this workplace. Only the paths that report their absence (and the engine-file checks that run before
TensorRT is imported) are exercised by the tests. The ONNX Runtime backend is the verified one.

Artifact files: `<kind>.plan` (serialized engine, e.g. encoder.plan / decoder.plan), `layers.json` (engine
inspector, `ProfilingVerbosity.DETAILED`, per-layer precisions and tactics). The timing cache lives beside the
artifact (`trt_timing.cache` in its parent, or the `timing_cache` option) so that rebuilds reuse it.
Timing uses CUDA events around `execute_async_v3` (GPU time of the enqueue, copies excluded).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np

from engines.base import EngineArtifact, check_feeds, check_in_range
from evaluation.interface import INTERFACES
from evaluation.runners import interface_mismatch
from workbench.errors import WorkbenchError
from workbench.fsutil import atomic_path

UNKEYED_OPTIONS = ("timing_cache",)  # a cache: it changes build time, not what is built
KNOWN_OPTIONS = ("opt_level", "workspace_mb", "timing_cache")
SUPPORTED_MAJORS = (10, 11)


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def _ck(result, what: str):
    """Unpack a cuda-python (err, value...) tuple, raising on error."""
    err, *rest = result
    if int(err) != 0:
        raise WorkbenchError(f"CUDA call {what} failed: {err}")
    return rest[0] if len(rest) == 1 else rest


def _trt_major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def available() -> tuple[bool, str]:
    """(usable, reason): TensorRT 10/11 importable, cuda-python importable, and at least one CUDA GPU."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or a broken install failing to load libnvinfer
        return False, f"the TensorRT Python package (tensorrt) is not installed or does not load ({e})"
    if _trt_major(trt) not in SUPPORTED_MAJORS:
        return False, f"TensorRT {trt.__version__} is installed; this backend supports TensorRT 10.x and 11.x"
    try:
        cudart = _cudart()
    except ImportError as e:
        return False, f"cuda-python (cuda.bindings / cuda.cudart) is not installed ({e})"
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        return False, f"no CUDA GPU is visible (cudaGetDeviceCount: {err}, {count} devices)"
    return True, f"TensorRT {trt.__version__}, {count} CUDA device(s)"


def check_usable() -> None:
    ok, reason = available()
    if not ok:
        raise WorkbenchError(
            f"the TensorRT backend cannot run here: {reason}. It needs TensorRT 10.x or 11.x, cuda-python and an "
            "NVIDIA GPU; the ONNX Runtime backend (--backend onnxruntime, or --backend auto) is the verified one")


def versions() -> dict:
    import tensorrt as trt

    return {"tensorrt": trt.__version__}


def normalize_options(options: Mapping) -> dict:
    unknown = set(options) - set(KNOWN_OPTIONS)
    if unknown:
        raise WorkbenchError(f"unknown tensorrt build options {sorted(unknown)}: known are {', '.join(KNOWN_OPTIONS)}")
    opt_level = options.get("opt_level", 3)
    if not isinstance(opt_level, int) or not 0 <= opt_level <= 5:
        raise WorkbenchError(f"opt_level must be an integer 0..5, got {opt_level!r}")
    workspace = options.get("workspace_mb")
    if workspace is not None and (not isinstance(workspace, int) or workspace < 1):
        raise WorkbenchError(f"workspace_mb must be a positive integer, got {workspace!r}")
    cache = options.get("timing_cache")
    return {"opt_level": opt_level, "workspace_mb": workspace, "timing_cache": str(cache) if cache else None}


def _layer_summary(layers_json: str) -> dict:
    """Layer count and how many layers touch INT8 / FP16 tensors (string scan of the inspector's JSON)."""
    try:
        layers = json.loads(layers_json).get("Layers", [])
    except (json.JSONDecodeError, AttributeError):
        return {"layers": None}
    texts = [json.dumps(layer).lower() for layer in layers]
    return {"layers": len(layers), "int8_layers": sum("int8" in t for t in texts),
            "fp16_layers": sum("half" in t or "fp16" in t for t in texts)}


def build_files(onnx_path: Path, tmp: Path, kind: str, shapes: dict, options: dict) -> tuple[dict, dict]:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if _trt_major(trt) == 10:  # 11.x is always strongly typed and deprecates the flag
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise WorkbenchError(f"TensorRT's ONNX parser rejected {onnx_path}: " + " | ".join(errors[:5]))
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    ins, outs = INTERFACES[kind]
    problems = "; ".join(p for p in (interface_mismatch(kind, "inputs", ins, names),
                                     interface_mismatch(kind, "outputs", outs, outputs)) if p)
    if problems:
        raise WorkbenchError(f"{onnx_path} does not have WeNet's {kind} interface: {problems}")

    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    config.builder_optimization_level = options["opt_level"]
    if options["workspace_mb"]:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options["workspace_mb"] << 20)
    profile = builder.create_optimization_profile()
    for name in names:
        profile.set_shape(name, shapes[name]["min"], shapes[name]["opt"], shapes[name]["max"])
    config.add_optimization_profile(profile)
    cache_path = Path(options["timing_cache"] or tmp.parent / "trt_timing.cache")
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise WorkbenchError(f"TensorRT failed to build an engine for {onnx_path} (its log above says why)")
    plan_name = f"{kind}.plan"
    (tmp / plan_name).write_bytes(memoryview(plan))
    with atomic_path(cache_path) as t:
        t.write_bytes(memoryview(config.get_timing_cache().serialize()))

    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        raise WorkbenchError(f"TensorRT could not deserialize the engine it just built for {onnx_path}")
    layers = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    (tmp / "layers.json").write_text(layers)
    return {"engine": plan_name, "layers": "layers.json"}, {"timing_cache": str(cache_path),
                                                           "layer_summary": _layer_summary(layers)}


class TrtEngineRunner:
    """Runs a deserialized plan on one CUDA stream; same protocol as evaluation.runners.OrtRunner."""

    def __init__(self, artifact: EngineArtifact):
        import tensorrt as trt

        self.trt, self.cudart = trt, _cudart()
        self.artifact, self.kind = artifact, artifact.kind
        self.path = artifact.verified_file("engine")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise WorkbenchError(
                f"TensorRT {trt.__version__} cannot deserialize {self.path}: it was built by another TensorRT "
                "version or for another GPU, or is not a TensorRT plan; rebuild the engine here")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        ins, outs = INTERFACES[self.kind]
        problems = "; ".join(p for p in (interface_mismatch(self.kind, "inputs", ins, self.input_names),
                                         interface_mismatch(self.kind, "outputs", outs, self.output_names)) if p)
        if problems:
            raise WorkbenchError(f"{self.path} does not have WeNet's {self.kind} interface: {problems}")
        self._specs = {s.name: s for s in ins}
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._stream = _ck(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity in bytes)

    def _device(self, name: str, nbytes: int) -> int:
        ptr, cap = self._buffers.get(name, (0, -1))
        if cap < nbytes:
            if ptr:
                _ck(self.cudart.cudaFree(ptr), "cudaFree")
            ptr = int(_ck(self.cudart.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def _prepare(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate, set shapes and addresses, copy inputs in; returns empty host arrays for the outputs."""
        check_feeds(self, feeds)
        check_in_range(self.artifact.shapes, feeds, f"engine {self.artifact.path}")
        h2d = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        for name in self.input_names:
            host = np.ascontiguousarray(feeds[name], dtype=self._dtypes[name])
            if not self.context.set_input_shape(name, host.shape):
                raise WorkbenchError(f"TensorRT refused shape {host.shape} for input {name} of {self.path}")
            ptr = self._device(name, host.nbytes)
            _ck(self.cudart.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, h2d, self._stream), "cudaMemcpyAsync")
            _ck(self.cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")  # `host` may be a temporary
            self.context.set_tensor_address(name, ptr)
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise WorkbenchError(f"output {name} of {self.path} has a data-dependent shape {shape}; unsupported")
            outputs[name] = np.empty(shape, dtype=self._dtypes[name])
            self.context.set_tensor_address(name, self._device(name, outputs[name].nbytes))
        return outputs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(int(self._stream)):
            raise WorkbenchError(f"TensorRT execution of {self.path} failed (its log above says why)")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._prepare(feeds)
        self._execute()
        d2h = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, host in outputs.items():
            _ck(self.cudart.cudaMemcpyAsync(host.ctypes.data, self._buffers[name][0], host.nbytes, d2h, self._stream),
                "cudaMemcpyAsync")
        _ck(self.cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return outputs

    def time_runs(self, feeds: Mapping[str, np.ndarray], warmup: int, iters: int) -> tuple[list[float], str]:
        """Seconds per execute_async_v3, measured with CUDA events on the runner's stream."""
        self._prepare(feeds)
        for _ in range(warmup):
            self._execute()
        events = [(_ck(self.cudart.cudaEventCreate(), "cudaEventCreate"),
                   _ck(self.cudart.cudaEventCreate(), "cudaEventCreate")) for _ in range(iters)]
        for start, end in events:
            _ck(self.cudart.cudaEventRecord(start, self._stream), "cudaEventRecord")
            self._execute()
            _ck(self.cudart.cudaEventRecord(end, self._stream), "cudaEventRecord")
        _ck(self.cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        out = []
        for start, end in events:
            out.append(_ck(self.cudart.cudaEventElapsedTime(start, end), "cudaEventElapsedTime") / 1e3)
            self.cudart.cudaEventDestroy(start)
            self.cudart.cudaEventDestroy(end)
        return out, "cuda_event"

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self.cudart.cudaFree(ptr)
        self._buffers.clear()
        if getattr(self, "_stream", None) is not None:
            self.cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def load(artifact: EngineArtifact, **options) -> TrtEngineRunner:
    if artifact.backend != "tensorrt":
        raise WorkbenchError(f"{artifact.path} is a {artifact.backend} engine, not a tensorrt one")
    if options:
        raise WorkbenchError(f"the tensorrt backend takes no load options, got {sorted(options)}")
    artifact.verified_file("engine")  # a missing or corrupt plan is reported even where TensorRT is absent
    check_usable()
    return TrtEngineRunner(artifact)
