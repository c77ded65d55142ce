"""Engines: build an ONNX model into a backend artifact, load it as a runner, time it.

Backends: "onnxruntime" (verified here, CPU by default), "tensorrt" (10.x/11.x, unverified here: no
TensorRT or GPU in this workplace) and "tensorrt-rtx" (RTX 1.x: builds verified here on CPU, ahead of time
for a named compute capability; running unverified); "auto" picks TensorRT when it is usable, else ONNX Runtime.
They are registered here, the one place (`register_backend` adds others; `backends()` lists them).

Every runner is an `EngineRunner` (engines.runner): feeds are checked once, in the base. `open_onnx` runs an
ONNX file as it is (no artifact), the only ONNX Runtime session runner outside a built engine.
"""
from engines import ort_backend, trt_backend
from engines.base import (EngineArtifact, bench, bench_interleaved, build, default_shapes, format_bench_table, load,
                          physical_cores, resolve_backend, summarize)
from engines.cases import bench_cases
from engines.ort_backend import OnnxFileRunner, OrtEngineRunner, int8_kernel_report, op_times, open_onnx
from engines.registry import backends, get_backend, register_backend, unregister_backend
from engines.runner import EngineRunner
from engines.trt_backend import TrtEngineRunner

BACKENDS = ("onnxruntime", "tensorrt", "tensorrt-rtx")  # the built-in backends, registered just below
for _name, _backend in zip(BACKENDS, (ort_backend, trt_backend.TENSORRT, trt_backend.RTX)):
    register_backend(_name, _backend)
del _name, _backend

__all__ = ["BACKENDS", "EngineArtifact", "EngineRunner", "OnnxFileRunner", "OrtEngineRunner", "TrtEngineRunner",
           "backends", "bench", "bench_cases", "bench_interleaved", "build", "default_shapes", "format_bench_table",
           "get_backend", "int8_kernel_report", "load", "op_times", "open_onnx", "physical_cores", "register_backend",
           "resolve_backend", "summarize", "unregister_backend"]
