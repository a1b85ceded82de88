"""backends/onnx."""
