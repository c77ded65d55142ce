"""INT8 quantization workbench for TensorRT: shared plumbing (errors, atomic files, CLI)."""
