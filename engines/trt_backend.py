"""TensorRT backends, one implementation speaking two APIs of the same shape: TensorRT 10.x/11.x (`tensorrt`,
backend "tensorrt") and TensorRT-RTX 1.x (`tensorrt_rtx_bindings`, backend "tensorrt-rtx"). Both take a
strongly typed network from a Q/DQ, optionally FP16-typed, ONNX model (no precision flags, no calibrators).

They differ where the APIs do, and only there (`Flavour.rtx` branches):
  * RTX builds ahead of time for named compute capabilities (`compute_capabilities`, e.g. [89]) with no GPU
    and no CUDA driver: the build is verified here, on CPU. TensorRT 10/11 needs a GPU to build.
  * RTX's builder timing cache is a no-op (deprecated in RTX 1.2); its cache is the runtime cache of
    JIT-compiled kernels, kept beside the artifact (`rtx_runtime.cache`) by the runner. TensorRT 10/11 keeps
    its timing cache (`trt_timing.cache`, or the `timing_cache` option) beside the artifact.
  * An RTX plan is inspected (layers.json) only where a GPU of a built compute capability can deserialize
    it; elsewhere engine.json says plainly why not (`runnable_here`, `why_not_runnable`), and loading it
    (`wb bench`) fails with that reason.

UNVERIFIED HERE: running either flavour (`TrtEngineRunner`: deserialize, execute, CUDA-event timing), and all of
the TensorRT 10/11 flavour: no GPU in this workplace's CI. Verified here: RTX's ONNX parser and builder
(tests/test_rtx.py, the CI's `wb rtx-check`).

Artifact files: `<kind>.plan` (serialized engine, e.g. encoder.plan / decoder.plan) and, where the engine
could be deserialized, `layers.json` (engine inspector, `ProfilingVerbosity.DETAILED`).
Timing uses CUDA events around `execute_async_v3` (GPU time of the enqueue, copies excluded).
"""
from __future__ import annotations

import ctypes
import functools
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from engines.base import EngineArtifact
from engines.runner import EngineRunner, check_interface, interface_specs
from evaluation.interface import INTERFACES, TensorSpec
from core.errors import WorkbenchError
from core.fsutil import atomic_path

RTX_TARGETS = (75, 80, 86, 89, 120, 121)  # RTX 1.7's ComputeCapability members (SM75 ... SM121)


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


def cuda_devices() -> tuple[list[int], str]:
    """Compute capabilities (major*10 + minor, e.g. 89) of the visible CUDA GPUs, read through the driver API
    (libcuda) so that it needs no Python package; ([], why) when there are none."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return [], f"no NVIDIA driver here (libcuda.so.1 does not load: {e})"
    err = cuda.cuInit(0)
    if err != 0:
        return [], f"the CUDA driver does not initialise (cuInit error {err})"
    count = ctypes.c_int(0)
    cuda.cuDeviceGetCount(ctypes.byref(count))
    ccs = []
    for i in range(count.value):
        dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        cuda.cuDeviceGet(ctypes.byref(dev), i)
        cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
        cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # ..._MINOR
        ccs.append(major.value * 10 + minor.value)
    return ccs, "" if ccs else "no CUDA GPU is visible"


def _layer_summary(layers_json: str) -> dict:
    """Layer count and how many layers touch INT8 / FP16 tensors (string scan of the inspector's JSON)."""
    try:
        layers = json.loads(layers_json).get("Layers", [])
    except (json.JSONDecodeError, AttributeError):
        return {"layers": None}
    texts = [json.dumps(layer).lower() for layer in layers]
    return {"layers": len(layers), "int8_layers": sum("int8" in t for t in texts),
            "fp16_layers": sum("half" in t or "fp16" in t for t in texts)}


@dataclass(frozen=True)
class Flavour:
    """One TensorRT API: the engines.base backend protocol (check_usable, versions, normalize_options,
    build_files, load, UNKEYED_OPTIONS) over the Python module `module`."""

    backend: str  # the engine.json backend name, also the key of its version in `versions()`
    module: str
    label: str
    majors: tuple[int, ...]
    rtx: bool
    install: str  # how to get it, for error messages

    @property
    def UNKEYED_OPTIONS(self) -> tuple[str, ...]:  # noqa: N802 - the backend protocol's name
        return () if self.rtx else ("timing_cache",)  # a cache changes build time, not what is built

    @property
    def known_options(self) -> tuple[str, ...]:
        return ("compute_capabilities", "opt_level", "workspace_mb") if self.rtx else \
            ("opt_level", "workspace_mb", "timing_cache")

    def api(self):
        """The imported API module; WorkbenchError when it is missing or of an unsupported version."""
        try:
            trt = importlib.import_module(self.module)
        except Exception as e:  # ImportError, or a broken install failing to load its libraries
            raise WorkbenchError(f"the {self.backend} backend needs {self.label} ({self.install}); "
                                 f"{self.module} does not import here ({str(e).splitlines()[0][:200]})") from None
        if int(trt.__version__.split(".")[0]) not in self.majors:
            raise WorkbenchError(f"{self.module} {trt.__version__} is installed; the {self.backend} backend "
                                 f"supports {self.label}")
        return trt

    def runnable(self, compute_capabilities=None) -> tuple[bool, str]:
        """(can run engines here, reason): the API, cuda-python, and a GPU (RTX: of a built compute capability)."""
        try:
            trt = self.api()
        except WorkbenchError as e:
            return False, str(e)
        ccs, why = cuda_devices()
        if not ccs:
            return False, why
        try:
            _cudart()
        except ImportError as e:
            return False, f"cuda-python (cuda.bindings / cuda.cudart) is not installed ({e})"
        if self.rtx:
            targets = compute_capabilities or RTX_TARGETS
            if not set(ccs) & set(targets):
                return False, (f"the GPU(s) here have compute capability {', '.join(f'SM{c}' for c in ccs)}, "
                               f"not one of {', '.join(f'SM{c}' for c in targets)}")
        return True, f"{self.module} {trt.__version__}, CUDA GPU(s) {', '.join(f'SM{c}' for c in ccs)}"

    def available(self) -> tuple[bool, str]:
        """(usable, reason): `runnable` for TensorRT 10/11 (it builds on the GPU); importable for RTX."""
        if not self.rtx:
            return self.runnable()
        try:
            return True, f"{self.module} {self.api().__version__}"
        except WorkbenchError as e:
            return False, str(e)

    def check_usable(self) -> None:
        ok, reason = self.available()
        if not ok:
            needs = ("TensorRT-RTX 1.x (it builds on CPU, no GPU needed)" if self.rtx else
                     "TensorRT 10.x or 11.x, cuda-python and an NVIDIA GPU")
            raise WorkbenchError(f"the {self.backend} backend cannot build here: {reason}. It needs {needs}; the "
                                 "ONNX Runtime backend (--backend onnxruntime, or --backend auto) is the verified one")

    def versions(self) -> dict:
        return {self.backend: self.api().__version__}

    def normalize_options(self, options: Mapping) -> dict:
        unknown = set(options) - set(self.known_options)
        if unknown:
            raise WorkbenchError(f"unknown {self.backend} build options {sorted(unknown)}: known are "
                                 f"{', '.join(self.known_options)}")
        opt_level = options.get("opt_level", 3)
        if not isinstance(opt_level, int) or not 0 <= opt_level <= 5:
            raise WorkbenchError(f"opt_level must be an integer 0..5, got {opt_level!r}")
        workspace = options.get("workspace_mb")
        if workspace is not None and (not isinstance(workspace, int) or workspace < 1):
            raise WorkbenchError(f"workspace_mb must be a positive integer, got {workspace!r}")
        out = {"opt_level": opt_level, "workspace_mb": workspace}
        if self.rtx:
            out["compute_capabilities"] = _targets(options.get("compute_capabilities"))
        else:
            cache = options.get("timing_cache")
            out["timing_cache"] = str(cache) if cache else None
        return out

    @functools.cache  # noqa: B019 - two flavours, one logger each: TensorRT keeps the first logger it was given
    def logger(self):
        return self.api().Logger(self.api().Logger.WARNING)

    def parse(self, onnx_path: Path):
        """(builder, network, logger) of a parsed ONNX model; WorkbenchError with the parser's errors."""
        trt, logger = self.api(), self.logger()
        builder = trt.Builder(logger)
        flags = 0
        # 11.x is always strongly typed; so is RTX (its builder has no precision flags at all)
        if not self.rtx and int(trt.__version__.split(".")[0]) == 10:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise WorkbenchError(f"{self.label}'s ONNX parser rejected {onnx_path}: " + " | ".join(errors[:5]))
        return builder, network, logger

    def build_plan(self, onnx_path: Path, shapes: Mapping | None, options: Mapping, timing_cache: Path | None = None,
                   kind: str | None = None):
        """Parse and build: (serialized plan bytes, logger). `shapes`: {input: {"min","opt","max"}} for one
        optimization profile, or None for a model of static shapes; `kind`: check WeNet's interface first."""
        trt = self.api()
        builder, network, logger = self.parse(onnx_path)
        if kind in INTERFACES:  # a "generic" model has its own interface
            check_interface(kind, str(onnx_path), [network.get_input(i).name for i in range(network.num_inputs)],
                            [network.get_output(i).name for i in range(network.num_outputs)])
        config = builder.create_builder_config()
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        config.builder_optimization_level = options.get("opt_level", 3)
        if options.get("workspace_mb"):
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options["workspace_mb"] << 20)
        if self.rtx:  # ahead of time: the target GPUs are named, none needs to be present
            targets = _targets(options.get("compute_capabilities"))
            config.num_compute_capabilities = len(targets)
            for i, cc in enumerate(targets):
                if not config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{cc}"), i):
                    raise WorkbenchError(f"{self.label} refused compute capability SM{cc}")
        if shapes:
            profile = builder.create_optimization_profile()
            for i in range(network.num_inputs):
                name = network.get_input(i).name
                profile.set_shape(name, shapes[name]["min"], shapes[name]["opt"], shapes[name]["max"])
            config.add_optimization_profile(profile)
        cache = None
        if timing_cache is not None:
            cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
            config.set_timing_cache(cache, ignore_mismatch=False)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise WorkbenchError(f"{self.label} failed to build an engine for {onnx_path} (its log above says why)")
        if cache is not None:
            with atomic_path(timing_cache) as t:
                t.write_bytes(memoryview(config.get_timing_cache().serialize()))
        return bytes(memoryview(plan)), logger

    def build_files(self, onnx_path: Path, tmp: Path, kind: str, shapes: dict, options: dict) -> tuple[dict, dict]:
        trt = self.api()
        cache_path = None if self.rtx else Path(options["timing_cache"] or tmp.parent / "trt_timing.cache")
        plan, logger = self.build_plan(onnx_path, shapes, options, cache_path, kind=kind)
        plan_name = f"{kind}.plan"
        (tmp / plan_name).write_bytes(plan)
        files = {"engine": plan_name}
        extra: dict = {"plan_bytes": len(plan)}
        if cache_path is not None:
            extra["timing_cache"] = str(cache_path)
        if self.rtx:
            ok, why = self.runnable(options["compute_capabilities"])
            extra.update({"compute_capabilities": options["compute_capabilities"], "runnable_here": ok})
            if not ok:  # an ahead-of-time build: no GPU here to deserialize (and inspect) it
                extra["why_not_runnable"] = why
                return files, extra
        engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
        if engine is None:
            raise WorkbenchError(f"{self.label} could not deserialize the engine it just built for {onnx_path}")
        layers = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
        (tmp / "layers.json").write_text(layers)
        files["layers"] = "layers.json"
        return files, {**extra, "layer_summary": _layer_summary(layers)}

    def load(self, artifact: EngineArtifact, **options) -> "TrtEngineRunner":
        if artifact.backend != self.backend:
            raise WorkbenchError(f"{artifact.path} is a {artifact.backend} engine, not a {self.backend} one")
        if options:
            raise WorkbenchError(f"the {self.backend} backend takes no load options, got {sorted(options)}")
        artifact.verified_file("engine")  # a missing or corrupt plan is reported even where TensorRT is absent
        ok, why = self.runnable(artifact.meta["options"].get("compute_capabilities"))
        if not ok:
            built = artifact.meta["options"].get("compute_capabilities")
            target = f" (built for {', '.join(f'SM{c}' for c in built)})" if built else ""
            raise WorkbenchError(f"cannot run the {self.backend} engine {artifact.path}{target} here: {why}. "
                                 f"Running it needs {self.label}, cuda-python and an NVIDIA GPU"
                                 f"{' of a built compute capability' if built else ''}")
        return TrtEngineRunner(artifact, self)


def _targets(value) -> list[int]:
    """RTX compute capabilities as sorted ints (89, "89", "8.9", "sm89" all mean SM89); default: the GPU's."""
    if value is None:
        ccs, why = cuda_devices()
        found = [c for c in ccs if c in RTX_TARGETS]
        if not found:
            raise WorkbenchError("name the target GPU: the tensorrt-rtx backend builds ahead of time for a compute "
                                 f"capability (--compute-capability, one of {', '.join(map(str, RTX_TARGETS))}); "
                                 f"none found here ({why or 'GPU compute capability ' + ', '.join(map(str, ccs))})")
        return found[:1]
    items = value if isinstance(value, (list, tuple)) else [value]
    out = set()
    for item in items:
        text = str(item).lower().removeprefix("sm").replace(".", "").strip()
        if not text.isdigit() or int(text) not in RTX_TARGETS:
            raise WorkbenchError(f"compute capability {item!r} is not a TensorRT-RTX target: expected one of "
                                 f"{', '.join(map(str, RTX_TARGETS))}")
        out.add(int(text))
    if not out:
        raise WorkbenchError("compute_capabilities is empty: name at least one target")
    return sorted(out)




class TrtEngineRunner(EngineRunner):
    """Runs a deserialized plan on one CUDA stream; an `engines.runner.EngineRunner` (feeds checked there)."""

    def __init__(self, artifact: EngineArtifact, flavour: Flavour):
        trt = flavour.api()
        self.trt, self.cudart, self.flavour = trt, _cudart(), flavour
        self.artifact = artifact
        path = artifact.verified_file("engine")
        self.path = path  # for the messages below, before EngineRunner.__init__
        self._runtime = trt.Runtime(flavour.logger())
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise WorkbenchError(
                f"{flavour.label} {trt.__version__} cannot deserialize {self.path}: it was built by another "
                "version or for another GPU, or is not a plan of this API; rebuild the engine (its log above says why)")
        self._cache, self._cache_path = None, None
        if flavour.rtx:  # RTX compiles kernels at run time: keep them in a runtime cache beside the artifact
            config = self.engine.create_runtime_config()
            self._cache, self._cache_path = config.create_runtime_cache(), artifact.path.parent / "rtx_runtime.cache"
            if self._cache_path.is_file():
                self._cache.deserialize(self._cache_path.read_bytes())  # False (ignored) on another GPU/driver
            config.set_runtime_cache(self._cache)
            self.context = self.engine.create_execution_context(config)
        else:
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        output_names = [n for n in names if n not in input_names]
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        kind = artifact.kind
        if kind in INTERFACES:
            check_interface(kind, str(path), input_names, output_names)
            ins, outs = interface_specs(kind, input_names), interface_specs(kind, output_names, outputs=True)
        else:  # generic: the engine's own tensors, feeds checked against the ONNX model's dtypes (engine.json
            # "io", what ONNX Runtime checks too); `_bind` then casts to the engine's tensor types
            model = artifact.meta["io"]["inputs"]

            def spec(n, dtype):
                return TensorSpec(n, dtype, len(self.engine.get_tensor_shape(n)))

            ins = [spec(n, np.dtype(model[n]["dtype"]) if n in model else None) for n in input_names]
            outs = [spec(n, self._dtypes[n]) for n in output_names]
        super().__init__(path, kind, ins, outs, shapes=artifact.shapes, shapes_where=f"engine {artifact.path}")
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

    def _bind(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Set shapes and addresses, copy inputs in (feeds already checked by `run`/`time_runs`); returns
        empty host arrays for the outputs."""
        h2d = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        for name in self.input_names:
            host = np.ascontiguousarray(feeds[name], dtype=self._dtypes[name])
            if not self.context.set_input_shape(name, host.shape):
                raise WorkbenchError(f"{self.flavour.label} refused shape {host.shape} for input {name} of {self.path}")
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
            raise WorkbenchError(f"{self.flavour.label} execution of {self.path} failed (its log above says why)")

    def _run(self, feeds: Mapping[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        host_outputs = self._bind(feeds)
        self._execute()
        d2h = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in outputs:  # the engine computes every output; only those asked for are copied back
            host = host_outputs[name]
            _ck(self.cudart.cudaMemcpyAsync(host.ctypes.data, self._buffers[name][0], host.nbytes, d2h, self._stream),
                "cudaMemcpyAsync")
        _ck(self.cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return {name: host_outputs[name] for name in outputs}

    def _time_runs(self, feeds: Mapping[str, np.ndarray], warmup: int, iters: int) -> tuple[list[float], str]:
        """Seconds per execute_async_v3, measured with CUDA events on the runner's stream (feeds checked once,
        by `time_runs`)."""
        self._bind(feeds)
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
        if self._cache is not None:
            with atomic_path(self._cache_path) as t:
                t.write_bytes(memoryview(self._cache.serialize()))
            self._cache = None
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


TENSORRT = Flavour("tensorrt", "tensorrt", "TensorRT 10.x/11.x", (10, 11), rtx=False,
                   install="pip install 'trt-int8-workbench[tensorrt]' from NVIDIA's index")
RTX = Flavour("tensorrt-rtx", "tensorrt_rtx_bindings", "TensorRT-RTX 1.x", (1,), rtx=True,
              install="pip install 'trt-int8-workbench[tensorrt-rtx]'")
FLAVOURS = {f.backend: f for f in (TENSORRT, RTX)}
