"""Fine-tuning an ONNX conversion: both graphs into PyTorch with onnx2torch, the same ``finetune``, the factors
written back into the graph."""

from __future__ import annotations

from typing import Any

import onnx
import onnx_ir as ir
from torch import nn

from separify.backends.onnx.graph import _external, _fixed_batch, _opset
from separify.errors import SeparifyError, first_line


def import_torch(model: ir.Model) -> nn.Module:
    """The ONNX model as a ``torch.fx.GraphModule`` (onnx2torch), for fine-tuning; its modules are named after the
    ONNX nodes. Two lossless normalisations first, because onnx2torch lacks them: ``Reshape(allowzero=1)`` with a
    constant shape that has no zero is the same as ``allowzero=0``, and opsets above 17 are converted down to 17
    (``onnx.version_converter``)."""
    try:
        from onnx2torch import convert
    except ImportError:
        raise SeparifyError("fine-tuning an ONNX model, and its output reconstruction, import it into PyTorch with "
                            "onnx2torch, which is not installed: pip install onnx2torch") from None
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


def module_name(node: str) -> str:
    """The name of the module onnx2torch makes of the ONNX node named ``node`` (its ``generate_node_name``: dots
    become slashes, a leading slash is dropped, as in ``/body/body.2/Conv`` → ``body/body/2/Conv``)."""
    try:
        from onnx2torch.onnx_graph import OnnxGraph

        return OnnxGraph.generate_node_name(onnx.helper.make_node("Conv", [], [], name=node))
    except (ImportError, AttributeError):  # an onnx2torch without it keeps the node's name
        return node


def imported_convs(module: nn.Module, nodes: list[str]) -> tuple[dict[str, nn.Module | None], list[str]]:
    """The onnx2torch modules of the Conv nodes named ``nodes`` in ``module`` (:func:`import_torch`), by node name,
    and the names of those that did not come through as an ``nn.Conv2d``."""
    named = dict(module.named_modules())
    modules = {n: named.get(module_name(n)) for n in nodes}
    return modules, [n for n in nodes if not isinstance(modules[n], nn.Conv2d)]


def finetune_onnx(original: ir.Model, result: "OnnxConvertResult", data: Any, **options: Any):
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
    names = [n for nodes in result.factor_nodes.values() for n in nodes]
    modules, missing = imported_convs(student, names)  # ONNX node name → its onnx2torch module
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
