"""The ONNX backend: Conv nodes of an ONNX graph rewritten as separable Conv nodes, run in ONNX Runtime."""

from separify.backends.onnx.backend import OnnxBackend, OnnxConvertResult  # noqa: F401
from separify.backends.onnx.finetune import finetune_onnx, import_torch  # noqa: F401
from separify.backends.onnx.graph import (MIN_OPSET, OrtModule, example_feeds, initializer_bytes, load_onnx,  # noqa: F401
                                          onnx_file_bytes, onnx_flops, onnx_params, save_onnx, session)
from separify.backends.onnx.pairing import pair_layers, source_names  # noqa: F401
