"""The ONNX rewrite: the dense ``Conv`` nodes of an ONNX graph → separable ``Conv`` nodes, with no torch code needed.

Match → check → rewrite, as in onnxscript's rewriter rules:

* **match** (:func:`match`): every ``Conv`` node of the main graph (default domain);
* **check** (:func:`check`): returns why a node cannot be converted — a 1-D/3-D conv, a grouped or depthwise conv,
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

Everything else is the pipeline's (:mod:`separify.pipeline`), as for PyTorch models: each Conv node becomes an
equivalent unpadded ``nn.Conv2d`` (:func:`kernel_conv`; its pads are applied to the input shape), planned and
decomposed by the same code; :mod:`.calibrate` streams the calibration statistics from onnxruntime.

Why onnx-ir (``onnx_ir``, the IR that onnxscript's rewriter and ``torch.onnx`` are built on) rather than editing
protobufs with ``onnx.helper``: its values know their producer and their uses, so "replace every use of this output,
graph outputs included" and "is this initializer shared" are one call each instead of hand-kept name maps; it loads
external data lazily (models over 2 GB are never read into memory just to be rewritten) and writes it back; and it
keeps every node, name, opset import, function and metadata entry it was not asked to touch.

"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from separify.backends.onnx.graph import _attr, _torch_conv
from separify.core.modules import SeparableConv2d, why_not_convertible
from separify.records import LayerSpec, Reason, Skip


@dataclass
class OnnxConvSite:
    """One ``Conv`` node and what the check found."""

    name: str
    node: ir.Node
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    input_shape: tuple[int, ...] | None = None  # the probed input shape
    pads: list[int] | None = None  # explicit pads at that shape, [top, left, bottom, right]

    @property
    def symmetric(self) -> bool:
        """Pads an ``nn.Conv2d`` can carry itself (zeros, the same on both sides)."""
        top, left, bottom, right = self.pads
        return top == bottom and left == right

    @property
    def input_pads(self) -> list[int]:
        """The pads applied to the input before :func:`kernel_conv` (those it does not carry)."""
        return [0, 0, 0, 0] if self.symmetric else list(self.pads)
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


def check(site: OnnxConvSite) -> Skip | None:
    """Why this Conv node cannot be converted, or ``None`` (and then ``site.weight``/``site.bias`` are set)."""
    node = site.node
    w = node.inputs[1] if len(node.inputs) > 1 else None
    b = node.inputs[2] if len(node.inputs) > 2 else None
    for what, v in (("weight", w), ("bias", b)):
        if v is None:
            continue
        chain = _identity_chain(v)
        if chain[-1].is_graph_input():
            return Skip(Reason.BLOCKED, f"{what} {v.name!r} is a graph input (it can change at run time)")
        if _const(v) is None:
            return Skip(Reason.BLOCKED, f"{what} {v.name!r} is computed in the graph (not an initializer or Constant)")
        # a shared weight ties layers together (converting one would untie them); a shared bias is common and
        # harmless: exporters merge equal constants (e.g. the zero biases of a freshly initialised network), and
        # the rewrite writes new initializers, leaving the shared one to its other users
        others = max(len(u.uses()) for u in chain) - 1
        if what == "weight" and others > 0:
            return Skip(Reason.BLOCKED, f"{what} {v.name!r} is shared with {others} other node input(s)")
    weight = _const(w)
    if weight is None:
        return Skip(Reason.BLOCKED, "no weight input")
    if weight.ndim != 4:
        return Skip(Reason.UNSUPPORTED, f"{weight.ndim - 2}-D conv (only 2-D convs are converted)")
    if not np.issubdtype(weight.dtype, np.floating):
        return Skip(Reason.UNSUPPORTED, f"weight dtype {weight.dtype} is not a floating-point type")
    reason = why_not_convertible(_torch_conv(node, weight.shape, b is not None))
    if reason is not None:
        return Skip(Reason.UNSUPPORTED, reason)
    site.weight, site.bias = weight, _const(b)
    return None


def layer_spec(site: OnnxConvSite, shapes: Mapping[str, tuple[int, ...]]) -> LayerSpec:
    """The description of a Conv node at the probed shapes."""
    node = site.node
    w = node.inputs[1] if len(node.inputs) > 1 else None
    wshape = shapes.get(w.name) if w is not None else None
    group = int(_attr(node, "group", 1))
    return LayerSpec(site.name, int(wshape[1]) * group if wshape else 0, int(wshape[0]) if wshape else 0,
                     tuple(int(k) for k in wshape[2:]) if wshape else (), tuple(_attr(node, "strides", [1, 1])),
                     group, shapes.get(node.inputs[0].name))


def kernel_conv(site: OnnxConvSite) -> nn.Conv2d:
    """The node as an ``nn.Conv2d`` holding its weights (float32 for half-precision models), with the node's pads
    where they are symmetric (then FLOPs and times are those of the real layer), else unpadded: its input is then
    padded first (:attr:`OnnxConvSite.input_pads`)."""
    weight = torch.from_numpy(site.weight)
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    padding = (site.pads[0], site.pads[1]) if site.symmetric else 0
    conv = _torch_conv(site.node, site.weight.shape, site.bias is not None, device="cpu", dtype=dtype,
                       padding=padding)
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


def _last_node(inits: Mapping[str, ir.Value]) -> ir.Node:
    role = "pw_out.weight" if "pw_out.weight" in inits else "pw.weight"
    return inits[role].uses()[0].node


def _output_name(inits: Mapping[str, ir.Value]) -> str:
    """The replacement's output (it carries the original conv output's name)."""
    return inits["output"].name


def _last_input_name(inits: Mapping[str, ir.Value]) -> str:
    """The input of the replacement's last 1×1 conv."""
    return _last_node(inits).inputs[0].name
