"""TensorRT plugins and kernels. None are needed yet: TensorRT >= 8.6 maps opset-17 LayerNormalization to its own
normalization layer, which is what the 2022 hackathon teams wrote LayerNorm plugins for."""
