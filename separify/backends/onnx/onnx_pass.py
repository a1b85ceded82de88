"""The ONNX pass: the dense ``Conv`` nodes of an ONNX graph → separable ``Conv`` nodes, with no torch code needed.

Match → check → rewrite, as in onnxscript's rewriter rules:

* **match** (:func:`match`): every ``Conv`` node of the main graph (default domain);
* **check** (:func:`_check`): returns why a node cannot be converted — a 1-D/3-D conv, a grouped or depthwise conv,
  a 1×1 kernel, a weight (or bias) that is computed in the graph or a graph input, a weight shared with another
  node (tied layers; a shared bias is fine: exporters merge equal constants) — or ``None``;
* **rewrite** (:func:`_rewrite`): the node is replaced by ``Conv`` nodes with new initializers:

  - ``dw-pw``:    ``x → Conv(W_dw (M·K, 1, kh, kw), group=M, <spatial>) → Conv(W_pw (N, M·K, 1, 1), B) → y``
  - ``pw-dw-pw``: ``x → Conv(W_in (R, M, 1, 1)) → Conv(W_dw (R, 1, kh, kw), group=R, <spatial>) → Conv(W_out, B) → y``
  - ``dw-pw`` in the ``repeat`` layout (chosen by ``objective="latency"``): ``x → Tile([1, K, 1, 1]) → Conv(W_dw
    permuted, group=M·K, <spatial>) → Conv(W_pw permuted, B) → y`` (channel ``j·M + m`` = input channel m)
  - ``dw-pw`` in the ``split`` layout: K nodes ``Conv(W_dw[j::K], group=M, <spatial>)`` → ``Concat`` →
    ``Conv(W_pw permuted, B)``; in the ``branches`` layout: K chains ``Conv(W_dw[j::K], group=M, <spatial>) →
    Conv(W_pw[:, j::K])`` (the bias on the last) summed by ``Add`` nodes (:func:`_split_depthwise`)

  ``<spatial>`` is the original node's ``kernel_shape``, ``strides``, ``dilations``, ``pads`` and ``auto_pad``,
  copied verbatim, so asymmetric pads and ``SAME_UPPER``/``SAME_LOWER`` behave exactly as before at every input
  size; the 1×1 convs have none (ONNX pads with zeros, and a 1×1 conv without bias maps zeros to zeros, so the
  first 1×1 conv of pw-dw-pw commutes with the padding). The last node's output keeps the original output's name,
  so every consumer, graph output and per-layer comparison sees the same tensor name.

The factors come from the same code as the torch path: each Conv node becomes an equivalent ``nn.Conv2d`` (its
weights, stride and dilation; padding applied to the input shape), and ``DwPwConv2d.from_conv`` /
``PwDwPwConv2d.from_conv`` (:mod:`separify.decompose`) decompose it; ranks are chosen by the same
:func:`separify.api.choose_ranks` (a global FLOPs target, a fixed rank, an energy, or with ``objective="latency"``
candidates timed in ONNX Runtime by :mod:`separify.latency` and whole graphs checked by
:func:`separify.api.meet_latency`), and calibration uses the same
moments (:mod:`separify.calibrate`), alternating least squares of the depthwise and last 1×1 conv
(:func:`~separify.calibrate.als_fit`, statistics streamed from onnxruntime) and least-squares refit
(:class:`~separify.calibrate.PointwiseRefit`).

Why onnx-ir (``onnx_ir``, the IR that onnxscript's rewriter and ``torch.onnx`` are built on) rather than editing
protobufs with ``onnx.helper``: its values know their producer and their uses, so "replace every use of this output,
graph outputs included" and "is this initializer shared" are one call each instead of hand-kept name maps; it loads
external data lazily (models over 2 GB are never read into memory just to be rewritten) and writes it back; and it
keeps every node, name, opset import, function and metadata entry it was not asked to touch.

Shapes come from running the model once in onnxruntime on a random input (extra graph outputs on the inputs of every
Conv, Gemm and MatMul), so models with dynamic spatial dimensions are converted, and timed, at the shape the user
gives. FLOPs are those of the Conv, Gemm and MatMul nodes (counted by ``FlopCounterMode`` on equivalent torch ops on
the meta device; FLOPs = 2 × MACs); other ops (LSTM, attention kernels, element-wise ops) are not counted.

Calibration on ONNX (``calibration=``): onnxruntime runs the original model with the inputs of every candidate Conv
as extra outputs, which gives their input moments (data-aware rank allocation, optional whitening); then, layer by
layer in graph order, both models run on the calibration data — the original up to the layer's output, the
converted model (every earlier layer already refitted) up to the input of the replacement's last 1×1 conv, each cut
to the nodes it needs — and that conv is refitted by streaming least squares, exactly as the torch path does within
its single forward pass. Cost: about one forward pass of the model over the data per converted layer (half, on
average, thanks to the cut). Memory: the least-squares sums, ``(C+1)²``, and one batch of activations.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

from separify.planning import latency
from separify.core import measure
from separify.pipeline import (ConvertResult, LayerRecord, choose_ranks, from_conv_options, injected_timings, meet_latency,
                  record_latency, scarce_warning, _join, _warn)
from separify.calibration import PatchStatistics, PointwiseRefit, _accumulate, _Moments, als_fit, als_skip_reason, as_batches
from separify.config import ConvertConfig, LayerRule
from separify.core.decompose import check_weight, whiten
from separify.errors import BadWeightsError, ConfigError, SeparifyError, first_line
from separify.planning.latency import LatencyTarget
from separify.core.modules import FORMS, SeparableConv2d, why_not_convertible

__all__ = ["MIN_OPSET", "OnnxConvertResult", "OrtModule", "convert_onnx", "load_onnx", "save_onnx", "onnx_flops",
           "onnx_params", "initializer_bytes", "example_feeds", "session", "pair_layers", "import_torch", "finetune_onnx"]

MIN_OPSET = 11
_INLINE_LIMIT = 1 << 30  # models with more initializer bytes than this keep their data in external files
_COUNTED = ("Conv", "Gemm", "MatMul")
_EXTERNAL_KEY = "separify.external_data"


# --------------------------------------------------------------------------------------------------------------
# Loading and running


def _opset(model: onnx.ModelProto | ir.Model) -> int | None:
    if isinstance(model, ir.Model):
        return model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def load_onnx(source: str | os.PathLike | onnx.ModelProto | ir.Model, *, check: bool = True) -> ir.Model:
    """Load an ONNX model for conversion, refusing what cannot be converted with one clear message.

    A path is parsed without its external data (that stays on disk and is read lazily), checked with the full
    ``onnx.checker`` (with strict shape inference) *before* anything is changed — a model that fails it is reported as
    such, not as a conversion error — and must import the default opset at version :data:`MIN_OPSET` or newer.
    """
    if isinstance(source, ir.Model):
        return source
    where = "the model"
    if isinstance(source, onnx.ModelProto):
        proto = source
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise SeparifyError(f"{path}: no such file")
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
            raise SeparifyError(f"{path} is not an ONNX model: it does not parse as an ONNX protobuf "
                                f"({type(exc).__name__}: {first_line(exc)}); a truncated or damaged file gives "
                                "this too") from None
    if proto.ir_version <= 0 or not proto.HasField("graph") or not (proto.graph.node or proto.graph.output):
        raise SeparifyError(f"{where} is not an ONNX model (no IR version or no graph in the file)")
    opset = _opset(proto)
    if opset is None or opset < MIN_OPSET:
        raise SeparifyError(
            f"{where} uses ONNX opset {opset}; separify needs opset {MIN_OPSET} or newer. Upgrade it first, e.g. "
            "onnx.save(onnx.version_converter.convert_version(onnx.load(path), 17), new_path)")
    if check:
        try:
            onnx.checker.check_model(where if not isinstance(source, onnx.ModelProto) else proto, full_check=True)
        except Exception as exc:  # noqa: BLE001 - ValidationError, InferenceError
            raise SeparifyError(f"{where} fails onnx.checker before any conversion, so the model itself is invalid "
                                f"(separify has not changed it): {first_line(exc)}") from None
    if isinstance(source, onnx.ModelProto):
        return ir.serde.deserialize_model(proto)
    model = ir.load(str(path))
    model.meta[_EXTERNAL_KEY] = _external(model)  # written back the same way (see save_onnx)
    if initializer_bytes(model) <= _INLINE_LIMIT:
        ir.external_data.load_to_model(model)  # small enough: hold it in memory, sessions are built from bytes
    return model


def initializer_bytes(model: ir.Model) -> int:
    """Bytes held by the initializers (in memory or in external files)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _external(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def to_proto(model: ir.Model, extra_outputs: Sequence[str] = ()) -> onnx.ModelProto:
    """The model as a protobuf, with ``extra_outputs`` (names of intermediate values) appended as graph outputs
    (without a type: onnxruntime infers it, as its own calibration tools rely on)."""
    proto = ir.serde.serialize_model(model)
    have = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(extra_outputs) if n not in have)
    return proto


def session(model: ir.Model, extra_outputs: Sequence[str] = (), *, threads: int | None = None):
    """An onnxruntime CPU session of ``model`` (plus ``extra_outputs``). Models whose data stays in external files
    are written, with their data, to a temporary folder first (onnxruntime reads external data from files)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    try:
        if not _external(model):
            return ort.InferenceSession(to_proto(model, extra_outputs).SerializeToString(), opts, providers=providers)
        with tempfile.TemporaryDirectory(prefix="separify-ort-") as tmp:
            tmp_path = Path(tmp) / "model.onnx"
            _save_external(_with_outputs(model, extra_outputs), tmp_path)
            return ort.InferenceSession(str(tmp_path), opts, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
        raise SeparifyError(f"onnxruntime cannot load the model ({type(exc).__name__}: {first_line(exc)})") from None


def _with_outputs(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A clone of ``model`` (tensors shared, so external data stays where it is) with the intermediate values
    ``names`` appended as graph outputs."""
    if not names:
        return model
    clone = model.clone()
    values = {v.name: v for v in _all_values(clone)}
    have = {v.name for v in clone.graph.outputs}
    clone.graph.outputs.extend(values[n] for n in dict.fromkeys(names) if n not in have)
    return clone


def _save_external(model: ir.Model, path: Path) -> None:
    ir.save(model, path, external_data=path.name + ".data")


def save_onnx(model: ir.Model, path: str | os.PathLike, *, check: bool = False) -> list[Path]:
    """Write ``model`` to ``path`` atomically; returns the files written.

    Models that came with external data, or have more than 1 GiB of initializers, are written with their data in
    ``<name>.data`` next to the model, as ONNX requires beyond 2 GB. Both files are written into a temporary folder
    beside the target and renamed into place (the data first), so a failure leaves no partial output. With
    ``check``, the written files must pass the full ``onnx.checker`` (from the file, so models over 2 GB too) before
    they are renamed into place.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    external = model.meta.get(_EXTERNAL_KEY) or _external(model) or initializer_bytes(model) > _INLINE_LIMIT
    with tempfile.TemporaryDirectory(prefix=f".{path.stem}.", dir=folder) as tmp:
        tmp_path = Path(tmp) / path.name
        if external:
            _save_external(model, tmp_path)
        else:
            ir.save(model, tmp_path)
        if check:
            try:
                onnx.checker.check_model(str(tmp_path), full_check=True)
            except Exception as exc:  # noqa: BLE001
                raise SeparifyError(f"the converted model fails onnx.checker ({first_line(exc)}); this is a separify "
                                    "bug, please report it with the model; nothing was written") from None
        written = sorted(Path(tmp).iterdir(), key=lambda p: p == tmp_path)  # the model file last
        umask = os.umask(0)
        os.umask(umask)
        for f in written:
            os.chmod(f, 0o666 & ~umask)
            os.replace(f, folder / f.name)
    return [folder / f.name for f in written]


def graph_inputs(model: ir.Model) -> list[ir.Value]:
    """The real inputs of the graph (values that are not initializers)."""
    return [v for v in model.graph.inputs if not v.is_initializer()]


def example_feeds(model: ir.Model, shapes: Mapping[str, Sequence[int]] | Sequence[int] | None = None, *,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Random standard-normal inputs for every graph input, at its declared shape.

    A dynamic batch dimension becomes 1; any other dynamic dimension needs ``shapes`` (a dict by input name, or one
    shape for a single-input model): the model is then converted and timed at that shape.
    """
    inputs = graph_inputs(model)
    if shapes is not None and not isinstance(shapes, Mapping):
        if len(inputs) != 1:
            raise SeparifyError(f"the model has {len(inputs)} inputs ({', '.join(v.name for v in inputs)}); give one "
                                "shape per input by name")
        shapes = {inputs[0].name: tuple(shapes)}
    shapes = dict(shapes or {})
    unknown = set(shapes) - {v.name for v in inputs}
    if unknown:
        raise SeparifyError(f"no graph input named {', '.join(sorted(unknown))}; the inputs are "
                            f"{', '.join(v.name for v in inputs)}")
    gen = np.random.default_rng(seed)
    feeds = {}
    for v in inputs:
        declared = list(v.shape) if v.shape is not None else None
        if v.name in shapes:
            shape = [int(d) for d in shapes[v.name]]
            if declared is not None and (len(shape) != len(declared) or any(
                    isinstance(d, int) and d != s for d, s in zip(declared, shape))):
                raise SeparifyError(f"input {v.name!r} is declared as {_dims(declared)}; the shape "
                                    f"{tuple(shape)} does not fit it")
        else:
            if declared is None:
                raise SeparifyError(f"input {v.name!r} has no declared shape; give one (e.g. --input-shape 1,3,224,224)")
            dyn = [i for i, d in enumerate(declared) if not isinstance(d, int)]
            if any(i != 0 for i in dyn):
                raise SeparifyError(f"input {v.name!r} has dynamic dimensions {_dims(declared)}: give the shape to "
                                    "convert and time it at (e.g. --input-shape 1,3,224,224)")
            shape = [1 if not isinstance(d, int) else d for d in declared]
        dtype = v.dtype.numpy() if v.dtype is not None else np.dtype(np.float32)
        if not np.issubdtype(dtype, np.floating):
            raise SeparifyError(f"input {v.name!r} is of type {dtype}; separify makes random inputs only for "
                                "floating-point inputs")
        feeds[v.name] = gen.standard_normal(shape).astype(dtype)
    return feeds


def _dims(shape) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else (str(d) if d is not None else "?") for d in shape) + ")"


class OrtModule(nn.Module):
    """An ONNX model run by onnxruntime, callable like a single-input ``nn.Module`` (no gradients): lets the report's
    accuracy and agreement code measure ONNX models unchanged. Splits batches when the model fixes its batch size."""

    def __init__(self, model: ir.Model, *, threads: int | None = None) -> None:
        super().__init__()
        inputs = graph_inputs(model)
        if len(inputs) != 1:
            raise SeparifyError(f"only single-input ONNX models can be evaluated on data (this one has {len(inputs)})")
        self.model = model
        self.input_name = inputs[0].name
        first = inputs[0].shape[0] if inputs[0].shape is not None and len(inputs[0].shape) else None
        self.fixed_batch = first if isinstance(first, int) else None
        self.sess = session(model, threads=threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().cpu().numpy()
        step = self.fixed_batch or len(arr) or 1
        outs = [self.sess.run(None, {self.input_name: arr[i:i + step]})[0] for i in range(0, len(arr), step)]
        return torch.from_numpy(np.concatenate(outs) if len(outs) > 1 else outs[0])


def _chunks(batches: Sequence[torch.Tensor], fixed: int | None) -> Iterator[np.ndarray]:
    for x in batches:
        arr = x.detach().cpu().numpy()
        step = fixed or len(arr)
        for i in range(0, len(arr), step):
            if len(arr[i:i + step]) == step:  # a model with a fixed batch size B uses whole batches of B only
                yield arr[i:i + step]


# --------------------------------------------------------------------------------------------------------------
# FLOPs


def _attr(node: ir.Node, name: str, default: Any) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _pads(node: ir.Node, in_shape: Sequence[int], kernel: Sequence[int]) -> list[int]:
    """Explicit pads ``[x1_begin, x2_begin, ..., x1_end, x2_end, ...]`` of a Conv at input ``(B, C, *spatial)``."""
    dims = len(kernel)
    strides = list(_attr(node, "strides", [1] * dims))
    dil = list(_attr(node, "dilations", [1] * dims))
    auto = _attr(node, "auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(in_shape[2:], kernel, strides, dil):
            total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
            small = total // 2
            begin.append(small if auto == "SAME_UPPER" else total - small)
            end.append(total - begin[-1])
        return begin + end
    if auto == "VALID":
        return [0] * (2 * dims)
    return list(_attr(node, "pads", [0] * (2 * dims)))


def _torch_conv(node: ir.Node, weight_shape: Sequence[int], bias: bool, device="meta", dtype=torch.float32) -> nn.Module:
    """An unpadded ``nn.Conv{1,2,3}d`` with the node's kernel, strides, dilations and group (padding goes on the input)."""
    dims = len(weight_shape) - 2
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    group = int(_attr(node, "group", 1))
    return cls(int(weight_shape[1]) * group, int(weight_shape[0]), tuple(int(k) for k in weight_shape[2:]),
               stride=tuple(_attr(node, "strides", [1] * dims)), dilation=tuple(_attr(node, "dilations", [1] * dims)),
               groups=group, bias=bias, device=device, dtype=dtype)


def _padded(shape: Sequence[int], pads: Sequence[int]) -> tuple[int, ...]:
    dims = len(pads) // 2
    return tuple(shape[:2]) + tuple(int(s) + pads[i] + pads[i + dims] for i, s in enumerate(shape[2:]))


def _node_flops(node: ir.Node, shapes: Mapping[str, tuple[int, ...]]) -> int:
    """FLOPs (2 × MACs) of one Conv/Gemm/MatMul node at the probed shapes, by FlopCounterMode on meta tensors."""
    ins = [shapes.get(v.name) if v is not None else None for v in node.inputs]
    if any(s is None for s in ins[:2]):
        return 0
    if node.op_type == "Conv":
        conv = _torch_conv(node, ins[1], False)
        return measure.module_flops(conv, [_padded(ins[0], _pads(node, ins[0], ins[1][2:]))])
    a, b = list(ins[0]), list(ins[1])
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0):
            a.reverse()
        if _attr(node, "transB", 0):
            b.reverse()
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        torch.matmul(torch.empty(a, device="meta"), torch.empty(b, device="meta"))
    return int(counter.get_total_flops())


def _value_shapes(model: ir.Model, feeds: Mapping[str, np.ndarray], names: Sequence[str],
                  threads: int | None = None) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of the values ``names`` when the model runs on ``feeds`` (one onnxruntime run)."""
    shapes = {k: tuple(v.shape) for k, v in feeds.items()}
    for v in model.graph.initializers.values():
        if v.const_value is not None:
            shapes[v.name] = tuple(v.const_value.shape)
    want = [n for n in dict.fromkeys(names) if n not in shapes]
    if want:
        sess = session(model, want, threads=threads)
        outs = sess.run(want, dict(feeds))
        shapes.update({n: tuple(o.shape) for n, o in zip(want, outs)})
    return shapes


def _probe(model: ir.Model, feeds: Mapping[str, np.ndarray], threads: int | None = None):
    """The Conv/Gemm/MatMul nodes of the main graph and the concrete shapes of their inputs on ``feeds``."""
    nodes = [n for n in model.graph if n.op_type in _COUNTED and n.domain in ("", "ai.onnx")]
    return nodes, _value_shapes(model, feeds, [v.name for n in nodes for v in n.inputs[:2] if v is not None], threads)


def onnx_flops(model: ir.Model, feeds: Mapping[str, np.ndarray], *, threads: int | None = None) -> int:
    """FLOPs (2 × MACs) of the Conv, Gemm and MatMul nodes of the main graph on ``feeds``."""
    nodes, shapes = _probe(model, feeds, threads)
    return sum(_node_flops(n, shapes) for n in nodes)


def onnx_params(model: ir.Model) -> int:
    """Number of elements in the initializers (the parameters, plus any constant tables the graph keeps there)."""
    return sum(math.prod(v.const_value.shape) for v in model.graph.initializers.values() if v.const_value is not None)


# --------------------------------------------------------------------------------------------------------------
# Match, check, rewrite


@dataclass
class OnnxConvSite:
    """One ``Conv`` node and what the check found."""

    name: str
    node: ir.Node
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    input_shape: tuple[int, ...] | None = None  # the probed input shape
    pads: list[int] | None = None  # explicit pads at that shape
    blocker: str | None = None


def match(model: ir.Model) -> list[OnnxConvSite]:
    """Every ``Conv`` node of the main graph, in graph order, with a unique name (the node's, or its output's)."""
    sites, seen = [], set()
    for node in model.graph:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        name = node.name or f"Conv:{node.outputs[0].name}"
        base, k = name, 1
        while name in seen:
            k += 1
            name = f"{base}#{k}"
        seen.add(name)
        sites.append(OnnxConvSite(name, node))
    return sites


def _identity_chain(value: ir.Value) -> list[ir.Value]:
    """``value`` and the values an ``Identity`` chain passes it on from, source last (TorchScript's exporter merges
    equal initializers and feeds each user through an ``Identity`` node of its own)."""
    chain = [value]
    producer = value.producer()
    while producer is not None and producer.op_type == "Identity" and producer.domain in ("", "ai.onnx"):
        chain.append(producer.inputs[0])
        producer = chain[-1].producer()
    return chain


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(_identity_chain(value)[-1])
    return None if tensor is None else np.array(tensor.numpy())  # a writable copy


def _check(site: OnnxConvSite) -> str | None:
    """Why this Conv node cannot be converted, or ``None`` (and then ``site.weight``/``site.bias`` are set)."""
    node = site.node
    w = node.inputs[1] if len(node.inputs) > 1 else None
    b = node.inputs[2] if len(node.inputs) > 2 else None
    for what, v in (("weight", w), ("bias", b)):
        if v is None:
            continue
        chain = _identity_chain(v)
        if chain[-1].is_graph_input():
            return f"{what} {v.name!r} is a graph input (it can change at run time)"
        if _const(v) is None:
            return f"{what} {v.name!r} is computed in the graph (not an initializer or Constant)"
        # a shared weight ties layers together (converting one would untie them); a shared bias is common and
        # harmless: exporters merge equal constants (e.g. the zero biases of a freshly initialised network), and
        # the rewrite writes new initializers, leaving the shared one to its other users
        others = max(len(u.uses()) for u in chain) - 1
        if what == "weight" and others > 0:
            return f"{what} {v.name!r} is shared with {others} other node input(s)"
    weight = _const(w)
    if weight is None:
        return "no weight input"
    if weight.ndim != 4:
        return f"{weight.ndim - 2}-D conv (only 2-D convs are converted)"
    if not np.issubdtype(weight.dtype, np.floating):
        return f"weight dtype {weight.dtype} is not a floating-point type"
    meta = _torch_conv(node, weight.shape, b is not None)
    reason = why_not_convertible(meta)
    if reason is not None:
        return reason
    site.weight, site.bias = weight, _const(b)
    return None


def _record(site: OnnxConvSite, shapes: Mapping[str, tuple[int, ...]]) -> LayerRecord:
    """A fresh per-layer record of a Conv node, with its shapes and FLOPs at the probed input."""
    node = site.node
    w = node.inputs[1] if len(node.inputs) > 1 else None
    wshape = shapes.get(w.name) if w is not None else None
    group = int(_attr(node, "group", 1))
    rec = LayerRecord(site.name, int(wshape[1]) * group if wshape else 0, int(wshape[0]) if wshape else 0,
                      tuple(int(k) for k in wshape[2:]) if wshape else (), tuple(_attr(node, "strides", [1, 1])),
                      group, shapes.get(node.inputs[0].name))
    rec.flops_before = rec.flops_after = _node_flops(node, shapes)
    return rec


def _kernel_conv(site: OnnxConvSite) -> nn.Conv2d:
    """The node as an unpadded ``nn.Conv2d`` holding its weights (float32 for half-precision models)."""
    weight = torch.from_numpy(site.weight)
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    conv = _torch_conv(site.node, site.weight.shape, site.bias is not None, device="cpu", dtype=dtype)
    with torch.no_grad():
        conv.weight.copy_(weight.to(dtype))
        if site.bias is not None:
            conv.bias.copy_(torch.from_numpy(site.bias).to(dtype))
    return conv


def _unique(names: set[str], want: str) -> str:
    name, k = want, 1
    while name in names:
        k += 1
        name = f"{want}_{k}"
    names.add(name)
    return name


def _factors(mod: SeparableConv2d) -> list[tuple[str, nn.Conv2d]]:
    """The replacement's convs in forward order, with short names."""
    if mod.method == "dw-pw":
        return [("dw", mod.conv_dw), ("pw", mod.conv_pw)]
    return [("pw_in", mod.conv_pw_in), ("dw", mod.conv_dw), ("pw_out", mod.conv_pw_out)]


def _rewrite(model: ir.Model, site: OnnxConvSite, mod: SeparableConv2d, dtype: np.dtype,
             value_names: set[str]) -> dict[str, ir.Value]:
    """Replace ``site.node`` by the replacement's Conv nodes; returns its weight/bias initializers by role
    (``"dw.weight"``, ``"pw.bias"``, ...) and, as ``"output"``, the replacement's output value."""
    graph, node = model.graph, site.node
    x, old_w = node.inputs[0], node.inputs[1]
    old_b = node.inputs[2] if len(node.inputs) > 2 else None
    old_out = node.outputs[0]
    spatial = {k: node.attributes[k] for k in ("kernel_shape", "strides", "dilations", "pads", "auto_pad")
               if k in node.attributes}
    inits: dict[str, ir.Value] = {}
    new_nodes: list[ir.Node] = []
    h = x
    parts = _factors(mod)
    for i, (role, conv) in enumerate(parts):
        last = i == len(parts) - 1
        w = _initializer(graph, value_names, f"{site.name}.{role}.weight", conv.weight.detach().numpy().astype(dtype))
        inits[f"{role}.weight"] = w
        ins = [h, w]
        if last and conv.bias is not None:
            bias = _initializer(graph, value_names, f"{site.name}.{role}.bias",
                                conv.bias.detach().numpy().astype(dtype))
            inits[f"{role}.bias"] = bias
            ins.append(bias)
        if role == "dw":
            attrs = {**{k: a.value for k, a in spatial.items()}, "group": conv.in_channels}
        else:
            attrs = {"kernel_shape": [1, 1]}
        out = ir.Value(name=_unique(value_names, f"{site.name}.{role}.out"))
        new_nodes.append(ir.node("Conv", ins, attrs, outputs=[out], name=_unique(value_names, f"{site.name}/{role}"),
                                 doc_string=f"separify: {mod.method} rank {mod.rank} replacement of {site.name}"))
        h = out
    graph.insert_before(node, new_nodes)
    _take_over_output(old_out, h, value_names)  # the last node's output: the original's name, type, shape, uses
    graph.remove(node, safe=True)
    for v in (old_w, old_b):
        _drop_if_unused(graph, v)
    inits["output"] = h  # not an initializer: the replacement's output, which keeps the original's name
    return inits


def _initializer(graph: ir.Graph, value_names: set[str], name: str, array: np.ndarray) -> ir.Value:
    """A new initializer holding ``array``, under a name not yet taken (from ``name``)."""
    value = ir.Value(name=_unique(value_names, name), const_value=ir.tensor(array))
    graph.register_initializer(value)
    return value


def _take_over_output(old: ir.Value, new: ir.Value, value_names: set[str]) -> None:
    """``new`` takes over ``old``'s name, type, shape and every use (graph outputs too); ``old`` is renamed."""
    name = old.name
    old.name = _unique(value_names, f"{name}.replaced")
    new.name = name
    new.type, new.shape = old.type, old.shape
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)


def _drop_if_unused(graph: ir.Graph, v: ir.Value | None) -> None:
    if v is None or v.uses() or v.is_graph_output():
        return
    producer = v.producer()
    if producer is not None and producer.op_type == "Identity" and producer.graph is graph:
        source = producer.inputs[0]
        graph.remove(producer, safe=True)  # an Identity that only fed the replaced conv, then what it passed on
        _drop_if_unused(graph, source)
        return
    if v.is_initializer():
        graph.initializers.pop(v.name, None)
        if v in graph.inputs:  # IR < 4 lists initializers as inputs too
            graph.inputs.remove(v)
    producer = v.producer()
    if producer is not None and producer.op_type == "Constant" and producer.graph is graph:
        graph.remove(producer, safe=True)


def _repeat_layout(mod: SeparableConv2d) -> bool:
    return mod.method == "dw-pw" and mod.layout == "repeat" and mod.rank > 1


def _update(inits: Mapping[str, ir.Value], mod: SeparableConv2d, dtype: np.dtype) -> None:
    """Write the (refitted, fine-tuned or widened) factors of ``mod`` into its initializers; the depthwise node's
    group follows its width (a ``padN`` layout adds zero terms). In the dw-pw ``repeat`` layout (after
    :func:`_tile_input`) the factors are written in its channel order and the depthwise conv has M·K groups."""
    weights = {role: conv.weight for role, conv in _factors(mod)}
    group = mod.conv_dw.in_channels
    if _repeat_layout(mod):
        weights["dw"], weights["pw"] = mod.repeat_factors()
        group *= mod.rank
    for role, conv in _factors(mod):
        _set_const(inits[f"{role}.weight"], weights[role].detach().cpu().numpy().astype(dtype))
        if f"{role}.bias" in inits:
            _set_const(inits[f"{role}.bias"], conv.bias.detach().cpu().numpy().astype(dtype))
    dw_node = inits["dw.weight"].uses()[0].node
    dw_node.attributes["group"] = ir.AttrInt64("group", group)


def _set_const(value: ir.Value, array: np.ndarray) -> None:
    """New contents for an initializer; a declared shape keeps in step (with its type)."""
    value.const_value = ir.tensor(array)
    if value.shape is not None:
        value.shape = ir.Shape(array.shape)


def _tile_input(model: ir.Model, inits: Mapping[str, ir.Value], mod: SeparableConv2d, value_names: set[str]) -> None:
    """The dw-pw ``repeat`` layout: a ``Tile`` node repeats the depthwise conv's input K times along the channels,
    ``(B, M, H, W) → (B, K·M, H, W)``; :func:`_update` then writes the factors in that channel order."""
    dw_node = inits["dw.weight"].uses()[0].node
    repeats = _initializer(model.graph, value_names, f"{dw_node.name}.repeats",
                           np.array([1, mod.rank, 1, 1], dtype=np.int64))
    tiled = ir.Value(name=_unique(value_names, f"{dw_node.name}.tiled"))
    tile = ir.node("Tile", [dw_node.inputs[0], repeats], outputs=[tiled], name=_unique(value_names, f"{dw_node.name}/tile"),
                   doc_string=dw_node.doc_string)
    model.graph.insert_before(dw_node, [tile])
    dw_node.replace_input_with(0, tiled)


def _write_layout(model: ir.Model, inits: dict[str, ir.Value], mod: SeparableConv2d, dtype: np.dtype,
                  value_names: set[str]) -> None:
    """Bring the nodes :func:`_rewrite` wrote for ``mod`` (one grouped depthwise conv) to ``mod``'s layout and
    current factors: a ``Tile`` for ``repeat``, K depthwise nodes for ``split``/``branches``, wider factors for
    ``padN``."""
    if _repeat_layout(mod):
        _tile_input(model, inits, mod, value_names)
    if _branched_layout(mod):
        _split_depthwise(model, inits, mod, dtype, value_names)
    else:
        _update(inits, mod, dtype)


def _branched_layout(mod: SeparableConv2d) -> bool:
    return mod.method == "dw-pw" and mod.layout in ("split", "branches") and mod.rank > 1


def _split_depthwise(model: ir.Model, inits: dict[str, ir.Value], mod: SeparableConv2d, dtype: np.dtype,
                     value_names: set[str]) -> None:
    """The dw-pw ``split`` and ``branches`` layouts as ONNX nodes, in place of the grouped depthwise ``Conv``
    (``(B, M, H, W) → (B, M·K, H', W')``, channel ``m·K + j``) and the 1×1 ``Conv`` after it:

    * K depthwise ``Conv`` nodes with multiplier 1, ``<layer>/dw_j``: weights ``W_dw[j::K]`` ``(M, 1, kh, kw)``,
      ``group=M`` and the original spatial attributes, each ``(B, M, H, W) → (B, M, H', W')``;
    * ``split``: ``Concat(axis=1)`` → ``(B, K·M, H', W')`` (channel ``j·M + m``) → the 1×1 ``Conv`` ``<layer>/pw``
      with its weights permuted to that order (:meth:`DwPwConv2d.repeat_factors`);
    * ``branches``: one 1×1 ``Conv`` per branch, ``<layer>/pw_j``, weights ``W_pw[:, j::K]`` ``(N, M, 1, 1)``, the
      bias on the last, summed by a chain of ``Add`` nodes (as ``torch.onnx.export`` writes the module), the last of
      which takes over the output's name.

    ``inits`` is updated to the new initializers (``"dw_j.weight"``, ``"pw.weight"`` or ``"pw_j.weight"``, ...)."""
    graph = model.graph
    m, k = mod.in_channels, mod.rank
    dw_node, pw_node = inits["dw.weight"].uses()[0].node, inits["pw.weight"].uses()[0].node
    layer = dw_node.name.rsplit("/", 1)[0]
    x, doc = dw_node.inputs[0], dw_node.doc_string
    spatial = {key: a.value for key, a in dw_node.attributes.items() if key != "group"}
    dw, pw = mod.conv_dw.weight.detach().cpu().numpy(), mod.conv_pw.weight.detach().cpu().numpy()
    old_dw = inits.pop("dw.weight")

    def const(role: str, array: np.ndarray) -> ir.Value:
        inits[role] = _initializer(graph, value_names, f"{layer}.{role}", array.astype(dtype))
        return inits[role]

    def conv(role: str, ins: list, attrs: dict) -> tuple[ir.Node, ir.Value]:
        out = ir.Value(name=_unique(value_names, f"{layer}.{role}.out"))
        return ir.node("Conv", ins, attrs, outputs=[out], name=_unique(value_names, f"{layer}/{role}"),
                       doc_string=doc), out

    new_nodes, hs = [], []
    for j in range(k):  # branch j: filter j of every input channel
        node, h = conv(f"dw_{j}", [x, const(f"dw_{j}.weight", dw[j::k])], {**spatial, "group": m})
        new_nodes.append(node)
        hs.append(h)
    if mod.layout == "split":
        cat = ir.Value(name=_unique(value_names, f"{layer}.concat"))
        new_nodes.append(ir.node("Concat", hs, {"axis": 1}, outputs=[cat],
                                 name=_unique(value_names, f"{layer}/concat"), doc_string=doc))
        graph.insert_before(dw_node, new_nodes)
        pw_node.replace_input_with(0, cat)
        # (N, K·M, 1, 1), column j·M + m
        _set_const(inits["pw.weight"], mod.repeat_factors()[1].detach().cpu().numpy().astype(dtype))
        graph.remove(dw_node, safe=True)
    else:
        out, old_out, bias = None, pw_node.outputs[0], inits.pop("pw.bias", None)
        for j, h in enumerate(hs):
            ins = [h, const(f"pw_{j}.weight", pw[:, j::k])]
            if j == k - 1 and bias is not None:
                ins.append(bias)
                inits[f"pw_{j}.bias"] = bias
            node, y = conv(f"pw_{j}", ins, {"kernel_shape": [1, 1]})
            new_nodes.append(node)
            if out is not None:
                total = ir.Value(name=_unique(value_names, f"{layer}.sum_{j}"))
                new_nodes.append(ir.node("Add", [out, y], outputs=[total],
                                         name=_unique(value_names, f"{layer}/add_{j}"), doc_string=doc))
                y = total
            out = y
        graph.insert_before(dw_node, new_nodes)
        _take_over_output(old_out, out, value_names)  # the last Add: the output's name, type, shape and uses
        old_pw = inits.pop("pw.weight")
        graph.remove([pw_node, dw_node], safe=True)
        _drop_if_unused(graph, old_pw)
        inits["output"] = out
    _drop_if_unused(graph, old_dw)


# --------------------------------------------------------------------------------------------------------------
# convert_onnx


@dataclass
class OnnxConvertResult(ConvertResult):
    """:class:`~separify.ConvertResult` of the ONNX pass: ``model`` is an ``onnx_ir.Model`` (:meth:`save` writes
    it; ``onnx_ir.to_proto(result.model)`` gives an ``onnx.ModelProto``).

    Extra attributes:
        input_shapes: the shapes the model was converted (and FLOPs counted) at.
        output_error: largest relative error ‖y − ŷ‖/‖y‖ over the graph outputs, original vs converted, both run in
            onnxruntime on ``check_samples`` random inputs (the per-layer ``output_error`` is the same for each
            converted layer's output inside the converted model, so it includes the error of the layers before it).
        checked: the converted model passed ``onnx.checker`` (full check) and strict shape inference; ``False`` for
            models with external data until :meth:`save` has checked the written file.
    """

    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    output_error: float | None = None
    checked: bool = False
    factor_nodes: dict[str, list[str]] = field(default_factory=dict)  # layer → names of the Conv nodes written

    def save(self, path: str | os.PathLike) -> list[Path]:
        """Write the converted model atomically (see :func:`save_onnx`); returns the files written. A model too large
        to be checked in memory is checked from the written file before it is renamed into place."""
        written = save_onnx(self.model, path, check=not self.checked)
        self.checked = True
        return written

    def to_dict(self) -> dict[str, Any]:
        doc = super().to_dict()
        doc.update(input_shapes={k: list(v) for k, v in self.input_shapes.items()}, output_error=self.output_error,
                   checked=self.checked)
        return doc


def convert_onnx(
    model: str | os.PathLike | onnx.ModelProto | ir.Model,
    config: ConvertConfig | None = None,
    *,
    input_shapes: Mapping[str, Sequence[int]] | Sequence[int] | None = None,
    calibration: Any = None,
    check_samples: int = 8,
    threads: int | None = None,
    progress: bool = False,
    timer: latency.Timer | None = None,
    **options: Any,
) -> OnnxConvertResult:
    """Replace the dense Conv nodes of an ONNX model with separable Conv nodes (see the module docstring).

    Args:
        model: a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model`` (never modified: the pass works on a copy).
        config, options: as for :func:`separify.convert` (method, rank/energy/flops, exclude, rules, seed, CP and
            calibration settings); name patterns match node names (or ``Conv:<output name>`` for unnamed nodes).
            ``calib_steps`` (layer-wise reconstruction) needs the torch path and is refused here.
        input_shapes: the shape to convert at, for inputs with dynamic dimensions (one shape, or a dict by name).
        calibration: input data (a tensor ``(N, ...)`` or an iterable of batches) for the calibration-aware
            initialisation, run through onnxruntime; single-input models only.
        check_samples: random inputs for the final comparison in onnxruntime (0: skip it).
        timer: with ``objective="latency"``, a timing function as for :func:`separify.convert` (layers as modules;
            whole graphs as :class:`OrtModule`), for tests; default: timed in ONNX Runtime through the cache.

    With ``objective="latency"`` (a latency budget, or ``objective="latency"`` with a FLOPs target or fixed
    ranks), every candidate is timed in ONNX Runtime at the layer's input shape, as the torch pass does with the
    ``onnxruntime`` target (``"cpu"`` is read as ONNX Runtime on the CPU): a layer stays dense unless a replacement
    is faster by the margin, pw-dw-pw may be widened to a faster ``padN`` width, and both whole graphs are timed at
    the end (``result.latency_ratio``). ``dw-pw`` replacements are written as one grouped conv or, for K > 1, in
    whichever of the ``repeat``, ``split`` and ``branches`` layouts measured fastest (module docstring).

    Returns:
        :class:`OnnxConvertResult`.
    """
    if options:
        if "rules" in options and isinstance(options["rules"], dict):
            options["rules"] = tuple(LayerRule(p, **dict(s)) for p, s in options["rules"].items())
        config = (config or ConvertConfig()).replace(**options) if config else ConvertConfig(**options)
    cfg = config or ConvertConfig()
    if cfg.calib_steps:
        raise ConfigError("calib_steps (layer-wise reconstruction) runs in PyTorch and is not available for ONNX "
                          "models; use the least-squares refit (the default) or fine-tune (--finetune)")
    target = _onnx_target(cfg) if cfg.objective == "latency" else None
    original = load_onnx(model)
    work = original.clone()  # new nodes and values, shared (never mutated) tensors: the input stays untouched
    work.meta[_EXTERNAL_KEY] = original.meta.get(_EXTERNAL_KEY, False)
    feeds = example_feeds(work, input_shapes, seed=cfg.seed)
    batches = as_batches(calibration, limit=cfg.calib_limit) if calibration is not None else None
    if batches is not None and len(feeds) != 1:
        raise SeparifyError("ONNX calibration needs a single-input model")

    # Probe: one run for the shapes of every Conv/Gemm/MatMul input, hence FLOPs and the layers' input shapes.
    counted, shapes = _probe(work, feeds, threads)
    flops_before = sum(_node_flops(n, shapes) for n in counted)
    params_before = onnx_params(work)

    sites = match(work)
    records, todo, kernels, layer_shapes = [], [], {}, {}
    for site in sites:
        node = site.node
        rec = _record(site, shapes)
        site.input_shape = rec.input_shape
        records.append(rec)
        reason = _check(site)
        rule = cfg.rule_for(site.name)
        if reason is None and rule is not None and rule.exclude:
            reason = f"excluded by pattern {rule.pattern!r}"
        if reason is None and site.input_shape is None:
            reason = "input shape unknown (not reached on the example input)"
        if reason is not None:
            rec.reason = reason
            continue
        try:
            check_weight(torch.from_numpy(site.weight))
        except BadWeightsError as exc:
            raise BadWeightsError(f"layer {site.name!r}: {exc}") from None
        site.pads = _pads(node, site.input_shape, site.weight.shape[2:])
        kernels[site.name] = _kernel_conv(site)
        rec.params_before = rec.params_after = measure.count_params(kernels[site.name])
        layer_shapes[site.name] = [_padded(site.input_shape, site.pads)]
        rec.method = (rule.method if rule and rule.method else None) or cfg.method
        todo.append((rec, rule))
    by_name = {s.name: s for s in sites}

    # Calibration, pass 1: the inputs of every candidate in the original model → input moments.
    covs = {}
    fixed_batch = _fixed_batch(work)
    if batches is not None and todo and (cfg.calib_whiten or (cfg.calib_ranks and cfg.selection == "flops")):
        covs = _moments(original, [by_name[r.name] for r, _ in todo], kernels, batches, fixed_batch, threads)
    whitened = {}
    if cfg.calib_ranks:
        for rec, _ in todo:
            if rec.name in covs:
                whitened[rec.name] = whiten(kernels[rec.name].weight, covs[rec.name], rec.method, damp=cfg.calib_damp)

    # Ranks (with objective="latency": every candidate timed in ONNX Runtime, in the layouts this pass can write).
    planner = _onnx_planner(cfg, target, original, feeds, timer, threads) if target is not None and todo else None
    try:
        budget, rank_warnings = choose_ranks(cfg, todo, kernels, layer_shapes, flops_before, whitened, planner)
        if planner is not None and cfg.selection == "latency":
            def trial_times(replacements):  # the original and the planned graph (untrained factors), timed
                trial = original.clone()
                trial_sites = {s.name: s for s in match(trial)}
                names = _taken_names(trial)
                for name, mod in replacements.items():  # in their chosen layouts, as the final graph is written
                    dtype = by_name[name].weight.dtype
                    inits = _rewrite(trial, trial_sites[name], mod.eval(), dtype, names)
                    _write_layout(trial, inits, mod, dtype, names)
                return _ort_times([original, trial], feeds, target, timer, threads)

            budget, rank_warnings = meet_latency(cfg, todo, kernels, layer_shapes, flops_before, whitened, planner,
                                                 (budget, rank_warnings), trial_times)
    finally:
        if planner is not None:
            planner.save()

    # Decompose and rewrite.
    calib_samples = sum(len(c) for c in _chunks(batches, fixed_batch)) if batches is not None else 0
    calib_pixels = _calibration_pixels(work, [by_name[r.name] for r, _ in todo if r.rank is not None], batches,
                                       fixed_batch, calib_samples, threads) if calib_samples else {}
    value_names = _taken_names(work)
    replaced: dict[str, tuple[SeparableConv2d, dict[str, ir.Value], np.dtype]] = {}
    items = [rec for rec, _ in todo if rec.rank is not None]
    iterator = items
    if progress:
        from rich.progress import track

        iterator = track(items, description="decomposing", transient=True)
    for rec in iterator:
        site = by_name[rec.name]
        cls = FORMS[rec.method]
        mod = cls.from_conv(kernels[rec.name], rec.rank,
                            **from_conv_options(cfg, rec, kernels[rec.name], batches is not None, covs,
                                                calib_pixels.get(rec.name))).eval()
        dtype = site.weight.dtype
        inits = _rewrite(work, site, mod, dtype, value_names)
        replaced[rec.name] = (mod, inits, dtype)
        rec.status = "converted"
        rec.rel_error = mod.decomposition_error
        rec.flops_after = measure.module_flops(mod, layer_shapes[rec.name])
        rec.params_after = measure.count_params(mod)

    # Calibration, then: refit every last 1×1 conv on the converted model's own inputs, layer by layer.
    if batches is not None and replaced:
        _refit(original, work, replaced, batches, fixed_batch, cfg.calib_ridge, threads, {r.name: r for r in records},
               als=cfg.calib_als, seed=cfg.seed, pads={r.name: by_name[r.name].pads for r in items},
               pixels=calib_pixels)
        scarce_warning(records, calib_samples, rank_warnings)

    # The fastest layout that the latency objective chose (after the refit, as in the torch pass): padN widens a
    # pw-dw-pw replacement by zero terms; the graph's initializers and the depthwise group follow.
    for rec in items:
        mod, inits, dtype = replaced[rec.name]
        if rec.layout is not None and rec.layout != mod.LAYOUTS[0]:
            mod.set_layout(rec.layout)
            if mod.rank != rec.rank:
                rec.note = _join(rec.note, f"rank {rec.rank} padded to {mod.rank} channels by zero terms (faster)")
            _write_layout(work, inits, mod, dtype, value_names)
            rec.flops_after = measure.module_flops(mod, layer_shapes[rec.name])
            rec.params_after = measure.count_params(mod)

    proto_checked = _check_converted(work) if replaced else True
    result = OnnxConvertResult(
        work, records, "onnx", cfg, None, flops_before, onnx_flops(work, feeds, threads=threads), params_before, onnx_params(work), budget,
        input_shapes={k: tuple(v.shape) for k, v in feeds.items()}, checked=proto_checked,
        factor_nodes={name: [u.node.name for u in (v.uses()[0] for k, v in inits.items() if k.endswith(".weight"))]
                      for name, (_m, inits, _d) in replaced.items()},
    )
    if check_samples and replaced:
        result.output_error = _compare(original, work, feeds, check_samples, cfg.seed, replaced,
                                       {r.name: r for r in records}, threads)
    if planner is not None:
        record_latency(result, planner, lambda scale: _ort_timings([original, work], feeds, target, timer, threads,
                                                                   scale=scale),
                       rank_warnings, measured=timer is None)
    _warn(result, rank_warnings)
    return result


# --------------------------------------------------------------------------------------------------------------
# objective="latency": ONNX Runtime is the target


def _onnx_target(cfg: ConvertConfig) -> LatencyTarget:
    """The latency target of an ONNX model: ONNX Runtime on the CPU (``"cpu"``, the default target, is read as
    that); the PyTorch CUDA target does not apply."""
    target = cfg.target
    if target.backend == "cuda":
        raise ConfigError("an ONNX model is timed in ONNX Runtime on the CPU (--target onnxruntime); the cuda target "
                          "times PyTorch models")
    if target.backend == "cpu":
        try:
            target = dataclasses.replace(target, backend="onnxruntime")
        except ConfigError as exc:
            raise ConfigError(f"an ONNX model is timed in ONNX Runtime: {exc}") from None
    return target


def _onnx_planner(cfg: ConvertConfig, target: LatencyTarget, original: ir.Model, feeds, timer, threads):
    """The layer timer for ONNX Runtime (through the disk cache unless a timing function is injected); with a
    latency budget, the original graph's time is measured first."""
    batch = int(next(iter(feeds.values())).shape[0])
    if target.batch_size is not None and target.batch_size != batch:
        raise ConfigError(f"the latency target's batch size {target.batch_size} differs from the ONNX model's input "
                          f"batch {batch}; give the whole shape with --input-shape (input_shapes=)")
    if target.threads is None and threads is not None:
        target = dataclasses.replace(target, threads=threads)
    if timer is None:
        target.check_available()
    path = latency.default_cache_path() if cfg.latency_cache is True else (cfg.latency_cache or None)
    layer_timer = latency.LayerTimer(target, cache=latency.LatencyCache(path), timer=timer)
    original_ms = _ort_times([original], feeds, target, timer, threads)[0] if cfg.selection == "latency" else None
    return latency.LatencyPlanner(layer_timer, cfg.margin, original_ms=original_ms, batch_size=batch)


def _ort_timings(models: Sequence[ir.Model], feeds, target: LatencyTarget, timer, threads, *,
                 scale: float = 1.0) -> list[measure.Timing]:
    """Whole-graph :class:`~separify.measure.Timing` of each model in ONNX Runtime (interleaved; ``scale`` × the
    usual run time), or from an injected ``timer(modules, input_shape, target)``, which gets the graphs as
    :class:`OrtModule`."""
    inputs = [torch.from_numpy(np.ascontiguousarray(feeds[v.name])) for v in graph_inputs(models[0])]
    if timer is not None:  # checked as for torch models
        return injected_timings([OrtModule(m, threads=threads) for m in models], tuple(inputs), target, timer,
                                "onnxruntime-cpu")
    try:
        with tempfile.TemporaryDirectory(prefix="separify-latency-") as tmp:
            paths = []
            for i, m in enumerate(models):
                paths.append(Path(tmp) / f"model{i}.onnx")
                save_onnx(m, paths[-1])
            timings = measure.time_onnxruntime([str(p) for p in paths], inputs, threads=target.threads or threads,
                                               min_run_time=scale * max(20 * target.min_run_time, 1.0))
    except Exception as exc:  # noqa: BLE001 - one clear message
        raise SeparifyError(f"could not time the whole model on {target.describe()}: {first_line(exc)}") from None
    return timings if isinstance(timings, list) else [timings]


def _ort_times(models, feeds, target, timer, threads) -> list[float]:
    return [t.median_ms for t in _ort_timings(models, feeds, target, timer, threads)]


def _taken_names(model: ir.Model) -> set[str]:
    """The value and node names in use in ``model`` (new ones are made unique against these by :func:`_unique`)."""
    return {v.name for v in _all_values(model)} | {n.name for n in model.graph if n.name}


def _all_values(model: ir.Model) -> Iterator[ir.Value]:
    yield from model.graph.inputs
    yield from model.graph.initializers.values()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        yield from (v for v in node.outputs if v is not None)


def _fixed_batch(model: ir.Model) -> int | None:
    inputs = graph_inputs(model)
    if len(inputs) != 1 or inputs[0].shape is None or not len(inputs[0].shape):
        return None
    first = inputs[0].shape[0]
    return first if isinstance(first, int) else None


def _moments(original: ir.Model, sites: list[OnnxConvSite], kernels: Mapping[str, nn.Conv2d],
             batches: Sequence[torch.Tensor], fixed: int | None, threads: int | None) -> dict:
    """Input moments of every candidate on the calibration data, captured as extra outputs of the original model."""
    names = {s.name: s.node.inputs[0].name for s in sites}
    sess = session(original, list(names.values()), threads=threads)
    input_name = graph_inputs(original)[0].name
    want = list(dict.fromkeys(names.values()))
    samples = sum(len(c) for c in _chunks(batches, fixed))  # as run: a fixed batch size drops a partial batch
    acc = {s.name: _Moments(samples) for s in sites}
    for chunk in _chunks(batches, fixed):
        outs = dict(zip(want, sess.run(want, {input_name: chunk})))
        for s in sites:
            x = torch.from_numpy(outs[names[s.name]])
            top, left, bottom, right = s.pads
            x = F.pad(x, (left, right, top, bottom))  # the ONNX pads (zeros), then the unpadded conv's patches
            _accumulate(kernels[s.name], x, acc[s.name])
    return {n: a.result() for n, a in acc.items() if a.channel is not None}


def _calibration_pixels(model: ir.Model, sites: Sequence[OnnxConvSite], batches: Sequence[torch.Tensor],
                        fixed: int | None, samples: int, threads: int | None) -> dict[str, int]:
    """Per site, the pixels of its output over all calibration samples, at the calibration data's own size (a model
    with dynamic height and width may be calibrated at another size than it is converted at)."""
    if not sites:
        return {}
    first = next(_chunks(batches, fixed))
    shapes = _value_shapes(model, {graph_inputs(model)[0].name: first[:1] if fixed is None else first},
                           [s.node.outputs[0].name for s in sites], threads)
    return {s.name: samples * math.prod(shapes[s.node.outputs[0].name][2:]) for s in sites}


def _prefix(model: ir.Model, outputs: Sequence[str]) -> ir.Model:
    """The part of ``model`` that computes ``outputs`` from the graph inputs (onnxruntime runs every node of a
    session, whatever outputs are asked for, so the refit runs only the prefix it needs)."""
    if model.functions:
        return _with_outputs(model, outputs)
    graph = ir.convenience.extract(model.graph, inputs=[v.name for v in graph_inputs(model)], outputs=list(outputs))
    sub = ir.Model(graph, ir_version=model.ir_version)
    sub.meta[_EXTERNAL_KEY] = model.meta.get(_EXTERNAL_KEY, False)
    return sub


def _refit(original: ir.Model, converted: ir.Model, replaced, batches, fixed, ridge, threads,
           records: Mapping[str, LayerRecord], *, pixels: Mapping[str, int], als: int = 0, seed: int = 0,
           pads=None) -> None:
    """Least-squares refit of every replacement's last 1×1 conv, layer by layer in graph order (module docstring):
    for each layer, onnxruntime runs the original model up to that layer's output and the converted model, with every
    earlier layer already refitted, up to the input of the layer's last 1×1 conv; the sums are streamed. With
    ``als > 0`` a first pass streams the patch statistics of the depthwise conv's input (padded by the layer's
    ``pads``) for :func:`~separify.calibrate.als_fit`, before the refit."""
    input_name = graph_inputs(original)[0].name
    samples = sum(len(c) for c in _chunks(batches, fixed))
    for name, (mod, inits, dtype) in replaced.items():  # graph order
        # the replacement's output carries the original conv output's name: the same name in both models
        y_name = _output_name(inits)
        z_name = _last_input_name(inits)
        orig_sess = session(_prefix(original, [y_name]), threads=threads)
        before = None
        skip = als_skip_reason(mod.conv_dw, pixels=pixels.get(name), inputs=mod._last().in_channels) if als > 0 else None
        if skip:
            records[name].note = _join(records[name].note, skip)
        elif als > 0:
            h_name = inits["dw.weight"].uses()[0].node.inputs[0].name  # the depthwise conv's (unpadded) input
            conv_sess = session(_prefix(converted, [h_name]), threads=threads)
            stats = None
            p = list(pads[name])  # ONNX [top, left, bottom, right] → F.pad (left, right, top, bottom)
            for chunk in _chunks(batches, fixed):
                y = torch.from_numpy(orig_sess.run([y_name], {input_name: chunk})[0]).float()
                h = torch.from_numpy(conv_sess.run([h_name], {input_name: chunk})[0]).float()
                if stats is None:
                    stats = PatchStatistics(mod.conv_dw, y.shape[1], samples * y[0, 0].numel(), seed=seed)
                stats.add(F.pad(h, (p[1], p[3], p[0], p[2])), y)
            before = als_fit(mod.conv_dw, mod._last(), stats, iters=als, ridge=ridge)[0]  # on the sampled pixels
            _update(inits, mod, dtype)
        conv_sess = session(_prefix(converted, [z_name]), threads=threads)  # after the update: z is the new one
        fit = PointwiseRefit(mod._last(), name, ridge=ridge)
        for chunk in _chunks(batches, fixed):
            y = orig_sess.run([y_name], {input_name: chunk})[0]
            z = conv_sess.run([z_name], {input_name: chunk})[0]
            fit.add(torch.from_numpy(z).float(), torch.from_numpy(y).float())
        res = fit.apply()
        if res.note:
            records[name].note = _join(records[name].note, res.note)
        _update(inits, mod, dtype)
        records[name].calib_error_before = res.error_before if before is None else before
        records[name].calib_error_after = res.error_after


def _last_node(inits: Mapping[str, ir.Value]) -> ir.Node:
    role = "pw_out.weight" if "pw_out.weight" in inits else "pw.weight"
    return inits[role].uses()[0].node


def _output_name(inits: Mapping[str, ir.Value]) -> str:
    """The replacement's output (it carries the original conv output's name)."""
    return inits["output"].name


def _last_input_name(inits: Mapping[str, ir.Value]) -> str:
    """The input of the replacement's last 1×1 conv."""
    return _last_node(inits).inputs[0].name


def _check_converted(model: ir.Model) -> bool:
    """Full ``onnx.checker`` and strict shape inference on the converted model (in memory below 2 GB)."""
    if _external(model) or initializer_bytes(model) > _INLINE_LIMIT:
        return False  # checked from the written file by OnnxConvertResult.save; in memory it could exceed 2 GB
    proto = ir.serde.serialize_model(model)
    try:
        onnx.checker.check_model(proto, full_check=True)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except Exception as exc:  # noqa: BLE001
        raise SeparifyError(f"the converted model fails onnx.checker ({first_line(exc)}); this is a separify bug, "
                            "please report it with the model") from None
    return True


def _compare(original: ir.Model, converted: ir.Model, feeds, samples: int, seed: int, replaced, records,
             threads) -> float:
    """Run both models in onnxruntime on ``samples`` random inputs (the example's shape); set each converted layer's
    ``output_error`` and return the largest relative error over the graph outputs."""
    layer_outs = {name: _output_name(inits) for name, (_m, inits, _d) in replaced.items()}
    extra = list(layer_outs.values())
    sessions = [session(m, extra, threads=threads) for m in (original, converted)]
    final = [o.name for o in original.graph.outputs]
    fixed = _fixed_batch(original)
    num = {n: 0.0 for n in final + extra}
    den = {n: 0.0 for n in final + extra}
    gen = np.random.default_rng(seed + 1)
    done = 0
    while done < samples:
        batch = {k: gen.standard_normal((fixed or min(samples - done, 8), *v.shape[1:])).astype(v.dtype)
                 if v.ndim else v for k, v in feeds.items()}
        ref, new = (dict(zip(final + extra, s.run(final + extra, batch))) for s in sessions)
        for n in num:
            a, b = np.asarray(ref[n], np.float64), np.asarray(new[n], np.float64)
            num[n] += float(((a - b) ** 2).sum())
            den[n] += float((a**2).sum())
        done += next(iter(batch.values())).shape[0] if batch else samples
    rel = {n: math.sqrt(num[n] / den[n]) if den[n] > 0 else math.sqrt(num[n]) for n in num}
    for name, out in layer_outs.items():
        records[name].output_error = rel[out]
    return max(rel[n] for n in final)


# --------------------------------------------------------------------------------------------------------------
# Pairing two ONNX models layer by layer (for the report)


def pair_layers(original: ir.Model, converted: ir.Model, feeds: Mapping[str, np.ndarray], *,
                threads: int | None = None) -> list[LayerRecord]:
    """Pair every Conv node of ``original`` with the converted model's node(s) of the same name: the node itself
    (status ``"kept"``) or the ``<name>/pw_in``, ``<name>/dw``, ``<name>/pw[_out]`` nodes this pass writes (or, in
    the dw-pw ``split``/``branches`` layouts, ``<name>/dw_j`` and ``<name>/pw[_j]``) (``"converted"``, with method,
    rank and FLOPs after), else ``"unmatched"``."""
    _, old_shapes = _probe(original, feeds, threads)
    _, new_shapes = _probe(converted, feeds, threads)
    new_nodes = {n.name: n for n in converted.graph if n.op_type == "Conv" and n.name}
    written: dict[str, dict[str, list[ir.Node]]] = {}  # layer → role → the Conv nodes this pass wrote for it
    for node_name, node in new_nodes.items():
        layer, _, part = node_name.rpartition("/")
        role = _ROLE.fullmatch(part)
        if layer and role and (node.doc_string or "").startswith("separify:"):
            written.setdefault(layer, {}).setdefault(role.group(1), []).append(node)
    pairs = []
    for site in match(original):
        pair = _record(site, old_shapes)
        pair.status, pair.flops_after = "unmatched", None
        parts = written.get(site.name, {})
        if site.name in new_nodes:
            pair.status, pair.flops_after = "kept", _node_flops(new_nodes[site.name], new_shapes)
        elif "dw" in parts:
            pair.status = "converted"
            pair.flops_after = sum(_node_flops(n, new_shapes) for nodes in parts.values() for n in nodes)
            dw = [new_shapes.get(n.inputs[1].name) for n in parts["dw"]]
            known = all(dw)
            if "pw_in" in parts:
                pair.method, pair.rank = "pw-dw-pw", int(dw[0][0]) if known else None
            else:  # depthwise output channels over all dw nodes, M·K
                pair.method = "dw-pw"
                pair.rank = sum(int(s[0]) for s in dw) // pair.in_channels if known and pair.in_channels else None
        pairs.append(pair)
    return pairs


_ROLE = re.compile(r"(pw_in|dw|pw_out|pw)(?:_\d+)*")  # <layer>/<role>[_j][_k]: _k made unique by _unique


# --------------------------------------------------------------------------------------------------------------
# Fine-tuning an ONNX model: into PyTorch with onnx2torch, the same finetune, the factors written back


def import_torch(model: ir.Model) -> nn.Module:
    """The ONNX model as a ``torch.fx.GraphModule`` (onnx2torch), for fine-tuning; its modules are named after the
    ONNX nodes. Two lossless normalisations first, because onnx2torch lacks them: ``Reshape(allowzero=1)`` with a
    constant shape that has no zero is the same as ``allowzero=0``, and opsets above 17 are converted down to 17
    (``onnx.version_converter``)."""
    try:
        from onnx2torch import convert
    except ImportError:
        raise SeparifyError("fine-tuning an ONNX model imports it into PyTorch with onnx2torch, which is not "
                            "installed: pip install onnx2torch") from None
    if _external(model):
        raise SeparifyError("fine-tuning is not supported for ONNX models with external data (over 1 GiB)")
    proto = ir.serde.serialize_model(model)
    consts = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] in consts:
            if 0 not in onnx.numpy_helper.to_array(consts[node.input[1]]):
                for a in list(node.attribute):
                    if a.name == "allowzero":
                        node.attribute.remove(a)
    try:
        if (_opset(proto) or 0) > 17:
            proto = onnx.version_converter.convert_version(proto, 17)
        module = convert(proto)
    except Exception as exc:  # noqa: BLE001 - NotImplementedError for ops onnx2torch lacks, and others
        raise SeparifyError(f"this ONNX model cannot be imported into PyTorch for fine-tuning (onnx2torch: "
                            f"{type(exc).__name__}: {first_line(exc)}); convert it without --finetune, or fine-tune "
                            "the PyTorch model it was exported from") from None
    return module.eval()


def finetune_onnx(original: ir.Model, result: OnnxConvertResult, data: Any, **options: Any):
    """Fine-tune the separable factors of an ONNX conversion by distillation from the original, then write them
    back into ``result.model``'s initializers (every other node and initializer stays as it was).

    Both models are imported into PyTorch (:func:`import_torch`); only the parameters of the Conv nodes the pass
    wrote are trained (everything else is frozen, so that the graph can be kept as it is rather than re-exported);
    ``options`` go to :func:`separify.finetune` (``steps``/``epochs``, ``lr``, ``checkpoint``, ``seed``, ...).
    """
    from separify.tuning.finetune import finetune

    fixed = _fixed_batch(original)
    if fixed is not None:
        sizes = {len(b[0] if isinstance(b, (tuple, list)) else b) for b in data}
        if sizes - {fixed}:
            raise SeparifyError(f"the ONNX model fixes its batch size to {fixed}; fine-tune with batches of that size "
                                f"(--batch-size {fixed})")
    teacher, student = import_torch(original), import_torch(result.model)
    modules = dict(student.named_modules())
    names = [n for nodes in result.factor_nodes.values() for n in nodes]
    missing = [n for n in names if not isinstance(modules.get(n), nn.Conv2d)]
    if missing:
        raise SeparifyError(f"onnx2torch did not keep the separable convs as modules ({', '.join(missing[:3])}); "
                            "cannot fine-tune this model")
    for p in student.parameters():
        p.requires_grad_(False)
    for n in names:
        for p in modules[n].parameters():
            p.requires_grad_(True)
    tuned = finetune(student, teacher, data, **options)
    nodes = {n.name: n for n in result.model.graph if n.name in set(names)}
    for n in names:
        conv, node = modules[n], nodes[n]
        dtype = node.inputs[1].const_value.dtype.numpy()
        node.inputs[1].const_value = ir.tensor(conv.weight.detach().cpu().numpy().astype(dtype))
        if conv.bias is not None and len(node.inputs) > 2 and node.inputs[2] is not None:
            node.inputs[2].const_value = ir.tensor(conv.bias.detach().cpu().numpy().astype(dtype))
    return tuned
