"""Pairing two ONNX models layer by layer (for the report): each Conv node of the original with the nodes the
conversion wrote for it; and the name of the layer each Conv node came from, where the file records it."""

from __future__ import annotations

import ast
import re
from collections import Counter
from typing import Mapping

import numpy as np
import onnx_ir as ir

from separify.backends.onnx.graph import _node_flops, _probe
from separify.backends.onnx.rewrite import _identity_chain, layer_spec, match
from separify.records import LayerRecord, Plan, new_record


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
        spec = layer_spec(site, old_shapes)
        pair = new_record(spec, _node_flops(site.node, old_shapes), 0)
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
                pair.plan = Plan("pw-dw-pw", int(dw[0][0]) if known else None)
            else:  # depthwise output channels over all dw nodes, M·K
                rank = sum(int(s[0]) for s in dw) // spec.in_channels if known and spec.in_channels else None
                pair.plan = Plan("dw-pw", rank)
        pairs.append(pair)
    return pairs


_ROLE = re.compile(r"(pw_in|dw|pw_out|pw)(?:_\d+)*")  # <layer>/<role>[_j][_k]: _k made unique by _unique


def source_names(model: ir.Model) -> dict[str, str]:
    """Layer name (the node's, as :func:`~separify.backends.onnx.rewrite.match` names it, and as records, reports
    and name patterns use it) → the name of the layer it came from, where the file records one, else the layer
    name itself. In order of preference:

    1. the weight initializer's name less its trailing ``.weight`` (``layer1.0.conv1.weight`` → ``layer1.0.conv1``:
       both of torch.onnx's exporters name unfolded parameters after the module);
    2. the module path in the node's metadata (torch.onnx's ``torch.export``-based exporter:
       ``pkg.torch.onnx.name_scopes``, else ``namespace``), unless an optimiser rewrote the node (a Conv with a
       BatchNorm fused into it names the BatchNorm there);
    3. the module path in a TorchScript-exported node name (``/layer1/layer1.0/conv1/Conv`` → ``layer1.0.conv1``).

    A name two layers would share is not used (both keep their layer names)."""
    sites = match(model)
    names = {s.name: _source_name(s.node) or s.name for s in sites}
    shared = {n for n, k in Counter(names.values()).items() if k > 1}
    names = {layer: layer if name in shared else name for layer, name in names.items()}
    if len(set(names.values())) < len(names):  # a fallback met another layer's source name
        return {s.name: s.name for s in sites}
    return names


def _source_name(node: ir.Node) -> str | None:
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is not None:
        source = _identity_chain(weight)[-1]
        if source.is_initializer() and source.name and source.name.endswith(".weight") \
                and source.name != ".weight":
            return source.name[:-len(".weight")]
    return _metadata_path(node.metadata_props) or _scope_path(node.name)


_FUSED = "pkg.onnxscript.rewriter.rule_name"  # the node was written by an onnxscript rewrite rule


def _metadata_path(props: Mapping[str, str]) -> str | None:
    """The module path torch.onnx's ``torch.export``-based exporter records, e.g. ``name_scopes`` ``['', 'layer1',
    'layer1.0', 'layer1.0.conv1', 'conv2d_3']`` or ``namespace`` ``': Net/layer1.0.conv1: Conv2d/conv2d_3:
    aten.conv2d.default'`` (the last entry is the FX node) → ``layer1.0.conv1``."""
    if _FUSED in props:
        return None
    scopes = props.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            value = ast.literal_eval(scopes)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            value = None
        if isinstance(value, (list, tuple)) and len(value) >= 2 and isinstance(value[-2], str) \
                and value[-2].strip():
            return value[-2].strip()
    entries = (props.get("namespace") or "").split("/")
    if len(entries) >= 2:
        path = entries[-2].partition(": ")[0].strip()
        return path or None
    return None


_SCOPED = re.compile(r"/(.+)/Conv(?:_\d+)?")


def _scope_path(name: str | None) -> str | None:
    """The module path in a node name of torch.onnx's TorchScript exporter, whose scopes are the module names with
    the children of containers written ``parent.index``: ``/features/features.0/features.0.0/Conv`` →
    ``features.0.0``, ``/layer1/layer1.0/downsample/downsample.0/Conv`` → ``layer1.0.downsample.0``."""
    found = _SCOPED.fullmatch(name or "")
    if found is None:
        return None
    path: list[str] = []
    for scope in found.group(1).split("/"):
        parts = scope.split(".")
        if not all(parts):
            return None
        # a dotted scope repeats the end of the path so far: only what follows it is new
        k = next((k for k in range(min(len(parts) - 1, len(path)), 0, -1) if path[-k:] == parts[:k]), 0)
        path += parts[k:]
    return ".".join(path) or None

