"""Pairing two ONNX models layer by layer (for the report): each Conv node of the original with the nodes the
conversion wrote for it."""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np
import onnx_ir as ir

from separify.backends.onnx.graph import _node_flops, _probe
from separify.backends.onnx.rewrite import layer_spec, match
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
