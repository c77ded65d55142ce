"""Engines: build an ONNX model into a backend artifact, load it as a runner, time it.

Backends: "onnxruntime" (verified here, CPU by default), "tensorrt" (10.x/11.x, unverified here: no
TensorRT or GPU in this workplace) and "tensorrt-rtx" (RTX 1.x: builds verified here on CPU, ahead of time
for a named compute capability; running unverified); "auto" picks TensorRT when it is usable, else ONNX Runtime.
"""
from engines.base import (BACKENDS, EngineArtifact, bench, bench_interleaved, build, default_shapes,
                          format_bench_table, load, physical_cores, resolve_backend, summarize)
from engines.cases import bench_cases
from engines.ort_backend import int8_kernel_report

__all__ = ["BACKENDS", "EngineArtifact", "bench", "bench_cases", "bench_interleaved", "build", "default_shapes",
           "format_bench_table", "int8_kernel_report", "load", "physical_cores", "resolve_backend", "summarize"]
