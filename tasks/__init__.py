"""Tasks: what a precision search optimises for. A task names its FP32 graphs, yields their calibration feeds,
turns a set of runners into named metrics and gives latency cases and engine shapes (tasks.base.Task).

Built in: `onnx` (any ONNX graphs with .npz feeds, fidelity against FP32: tasks.onnx_task) and
`sentence_embedding` (all-MiniLM-L6-v2 on fortunes sentences: tasks.sentence_embedding). User tasks come
through a Python entry point (tasks.entry)."""
from tasks.base import GraphSpec, Metric, Task
from tasks.entry import load_task

__all__ = ["GraphSpec", "Metric", "Task", "load_task"]
