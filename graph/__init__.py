"""ONNX analysis and surgery: quantizable-node discovery, Q/DQ placement from a precision plan, FP16 conversion."""
