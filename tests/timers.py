"""Timing functions for the latency tests: milliseconds from FLOPs, so that no assertion depends on this machine."""

import numpy as np
import torch

import separify
from separify.core.modules import SeparableConv2d


def flops_timer(slow_factor=1.0, favour=None, calls=None):
    """Milliseconds proportional to FLOPs; separable candidates ``slow_factor`` times slower, except the layout
    ``favour`` (made 4× faster than the others)."""

    def timer(modules, shape, target):
        if calls is not None:
            calls.append(len(modules))
        out = []
        for m in modules:
            ms = separify.core.measure.count_flops(m, torch.zeros(shape)) / 1e6
            if isinstance(m, SeparableConv2d):
                ms *= slow_factor
                if favour is not None and m.layout == favour:
                    ms /= 4
            out.append(ms)
        return out

    return timer


def onnx_timer(slow_factor=1.0, favour=None, hidden_ms=0.0):
    """:func:`flops_timer` for layer candidates; whole ONNX graphs (``OrtModule``) by their ONNX FLOPs, plus
    ``hidden_ms`` per separable replacement (its depthwise node), a cost the layers alone do not show."""
    from separify.backends.onnx import OrtModule, onnx_flops

    layers = flops_timer(slow_factor, favour)

    def timer(modules, shape, target):
        assert target.backend == "onnxruntime"
        out = []
        for m in modules:
            if isinstance(m, OrtModule):
                feeds = {m.input_name: np.zeros(shape, np.float32)}
                dw = len({n.name.rpartition("/")[0] for n in m.model.graph  # replacements, by their dw node(s)
                          if n.op_type == "Conv" and "separify" in (n.doc_string or "")
                          and n.name.rpartition("/")[2].startswith("dw")})
                out.append(onnx_flops(m.model, feeds) / 1e6 + hidden_ms * dw)
            else:
                out += layers([m], shape, target)
        return out

    return timer
