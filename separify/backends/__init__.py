"""Backends: the steps of a conversion that differ by model type (base: the interface; torch; onnx)."""
