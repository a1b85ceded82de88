"""ONNX models in and out: loading, saving (atomically, external data included), their size on disk (external data
included), onnxruntime sessions, example inputs, probed shapes and the FLOPs and parameters of a graph.

Shapes come from running the model once in onnxruntime on a random input (extra graph outputs on the inputs of every
Conv, Gemm and MatMul), so models with dynamic spatial dimensions are converted, and timed, at the shape the user
gives. FLOPs are those of the Conv, Gemm and MatMul nodes (counted by ``FlopCounterMode`` on equivalent torch ops on
the meta device; FLOPs = 2 × MACs); other ops (LSTM, attention kernels, element-wise ops) are not counted.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import nn

from separify.core import measure
from separify.errors import SeparifyError, first_line


MIN_OPSET = 11


_INLINE_LIMIT = 1 << 30  # models with more initializer bytes than this keep their data in external files


_COUNTED = ("Conv", "Gemm", "MatMul")


_EXTERNAL_KEY = "separify.external_data"


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


def too_large_in_memory(model: ir.Model) -> bool:
    """Checked and run from files rather than in memory: external data, or initializers over the in-memory limit."""
    return _external(model) or initializer_bytes(model) > _INLINE_LIMIT


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


def onnx_file_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of the ONNX model at ``path``: the file itself plus every distinct external-data file its
    tensors reference (initializers, sparse initializers and tensor attributes, subgraphs and functions included),
    each counted once, locations resolved relative to the model's folder as ONNX specifies. A referenced file that
    is missing counts for nothing; a file that does not parse as ONNX counts alone."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    path = Path(path)
    total = path.stat().st_size
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not an ONNX protobuf: its own size is all there is
        return total
    seen = {os.path.realpath(path)}
    for tensor in _tensors(proto):
        if not uses_external_data(tensor):
            continue
        try:
            location = ExternalDataInfo(tensor).location
        except Exception:  # noqa: BLE001 - a malformed external_data entry
            continue
        if not location:
            continue
        file = os.path.realpath(path.parent / location)
        if file not in seen:
            seen.add(file)
            if os.path.isfile(file):
                total += os.path.getsize(file)
    return total


def _tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in ``proto``: graph and subgraph initializers (sparse ones too) and tensor attributes of
    the nodes of the graph, its subgraphs and the model's functions."""
    def graph(g: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        yield from nodes(g.node)

    def nodes(items) -> Iterator[onnx.TensorProto]:
        for node in items:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                if a.HasField("sparse_tensor"):
                    yield from (a.sparse_tensor.values, a.sparse_tensor.indices)
                for sparse in a.sparse_tensors:
                    yield from (sparse.values, sparse.indices)
                if a.HasField("g"):
                    yield from graph(a.g)
                for sub in a.graphs:
                    yield from graph(sub)

    yield from graph(proto.graph)
    for f in proto.functions:
        yield from nodes(f.node)


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


def _torch_conv(node: ir.Node, weight_shape: Sequence[int], bias: bool, device="meta", dtype=torch.float32,
                padding=0) -> nn.Module:
    """An ``nn.Conv{1,2,3}d`` with the node's kernel, strides, dilations and group; unpadded unless ``padding`` is
    given (the node's pads then go on the input)."""
    dims = len(weight_shape) - 2
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    group = int(_attr(node, "group", 1))
    return cls(int(weight_shape[1]) * group, int(weight_shape[0]), tuple(int(k) for k in weight_shape[2:]),
               stride=tuple(_attr(node, "strides", [1] * dims)), dilation=tuple(_attr(node, "dilations", [1] * dims)),
               groups=group, bias=bias, padding=padding, device=device, dtype=dtype)


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
