"""The graph pass: match every conv, check it (a reason when it cannot be converted), rewrite the eligible ones.

Two ways to find and rewrite convs, chosen by :func:`separify.convert`:

* **torch.fx** (preferred): ``symbolic_trace`` the model, match ``call_module`` nodes whose module is a conv, pair
  each conv with a ``BatchNorm2d`` that is its only user (so the BN can be folded into it), rewrite by swapping the
  submodule and erasing folded BN nodes, then ``graph.lint()`` and ``recompile()``. The result is a ``GraphModule``.
* **module tree** (fallback when tracing fails, e.g. data-dependent control flow): every conv submodule is swapped
  in place in the model's own module tree. Without a graph nothing proves a BN only follows its conv, so no BN is
  folded. The model keeps its own class.

:func:`lift_aten_convs` prepares graphs that came from ``torch.export`` (``.pt2``), whose convs are ``aten.conv2d``
calls on parameters rather than ``nn.Conv2d`` modules, by turning them back into modules.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx, nn

from separify.errors import first_line

__all__ = ["ConvSite", "TraceFailed", "trace", "match_fx", "match_modules", "bn_fold_reason", "rewrite_fx",
           "rewrite_modules", "lift_aten_convs"]


class TraceFailed(Exception):
    """``torch.fx.symbolic_trace`` could not trace the model; the message says why."""


@dataclass
class ConvSite:
    """One conv module found in the model.

    Attributes:
        name: qualified module name (as in ``named_modules``).
        module: the conv module.
        calls: number of call sites in the traced graph (module-tree path: 1).
        bn_name: name of a BatchNorm2d that is the conv's only user (fx path only), else ``None``.
        aliases: other names under which the same module object is registered (module-tree path).
        blocker: a reason the conv must not be swapped at all (e.g. its weight is read directly), else ``None``.
    """

    name: str
    module: nn.Module
    calls: int = 1
    bn_name: str | None = None
    aliases: list[str] = field(default_factory=list)
    blocker: str | None = None


class _ConvLeafTracer(fx.Tracer):
    """torch.fx's tracer with every conv module kept as one call, subclasses of ``nn.Conv2d`` from other packages
    included (the default tracer only keeps ``torch.nn``'s own modules whole). A subclass (timm's
    ``ScaledStdConv2d``, ``Conv2dSame``) is then listed with the reason it is left alone, instead of vanishing into
    functional calls, and its forward (e.g. padding computed from the input's shape) cannot break the trace."""

    def __init__(self, on_call: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.on_call = on_call

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _is_conv(m) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if self.on_call is not None:
            self.on_call()
        return super().call_module(m, forward, args, kwargs)


def trace(model: nn.Module, on_call: Callable[[], None] | None = None) -> fx.GraphModule:
    """``torch.fx.symbolic_trace(model)`` with conv modules kept whole, or :class:`TraceFailed` with the first line of
    the tracer's error. ``on_call()``: at each module call the tracer meets (for a progress bar)."""
    if isinstance(model, fx.GraphModule):
        return model
    try:
        tracer = _ConvLeafTracer(on_call)
        graph = tracer.trace(model)
        return fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    except Exception as exc:  # symbolic tracing fails in many ways (TraceError, TypeError, RuntimeError, ...)
        raise TraceFailed(f"{type(exc).__name__}: {first_line(exc)}") from exc


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd)


def match_fx(gm: fx.GraphModule) -> list[ConvSite]:
    """Every conv called from ``gm``'s graph, with the BatchNorm2d that only follows it (if any)."""
    modules = dict(gm.named_modules())
    sites: dict[str, ConvSite] = {}
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    read_directly = {n.target.rsplit(".", 1)[0] for n in gm.graph.nodes if n.op == "get_attr" and "." in n.target}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not _is_conv(modules[node.target]) or node.target in sites:
            continue
        site = ConvSite(node.target, modules[node.target], calls=calls[node.target])
        if node.target in read_directly:
            site.blocker = "its parameters are also read directly by the forward, so the module cannot be swapped"
        users = list(node.users)
        if site.calls == 1 and len(users) == 1:
            user = users[0]
            if (user.op == "call_module" and isinstance(modules[user.target], nn.BatchNorm2d)
                    and calls[user.target] == 1 and user.args and user.args[0] is node):
                site.bn_name = user.target
        sites[node.target] = site
    return list(sites.values())


def match_modules(model: nn.Module) -> list[ConvSite]:
    """Every conv in the module tree (one site per module object, with its other names as aliases)."""
    sites: dict[int, ConvSite] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not _is_conv(module):
            continue
        if id(module) in sites:
            sites[id(module)].aliases.append(name)
        else:
            sites[id(module)] = ConvSite(name, module)
    return list(sites.values())


def bn_fold_reason(bn: nn.BatchNorm2d) -> str | None:
    """``None`` if ``bn`` can be folded into the conv before it, else why not."""
    if bn.training:
        return "BatchNorm is in training mode (call model.eval() to fold it)"
    if bn.running_mean is None or bn.running_var is None:
        return "BatchNorm has no running statistics"
    return None


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


def rewrite_fx(gm: fx.GraphModule, replacements: dict[str, nn.Module], folded_bns: dict[str, str]) -> fx.GraphModule:
    """Swap each conv named in ``replacements`` and erase each folded BatchNorm node (``{conv name: bn name}``).

    The replacement modules must already include the folded BatchNorm. Ends with ``graph.lint()`` and
    ``recompile()``, as torch.fx passes do.
    """
    for name, module in replacements.items():
        _set_submodule(gm, name, module)
    bn_to_conv = {bn: conv for conv, bn in folded_bns.items()}
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target in bn_to_conv:
            conv_node = node.args[0]
            node.replace_all_uses_with(conv_node)
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm


def rewrite_modules(model: nn.Module, replacements: dict[str, nn.Module], aliases: dict[str, list[str]]) -> nn.Module:
    """Swap each conv named in ``replacements`` (and its aliases) in the model's own module tree."""
    for name, module in replacements.items():
        for target in [name, *aliases.get(name, [])]:
            _set_submodule(model, target, module)
    return model


# ------------------------------------------------------------------------------------------- graphs from torch.export

_aten = torch.ops.aten


def _holder(gm: fx.GraphModule, node: fx.Node | None, leaf: str) -> str | None:
    """If ``node`` is ``get_attr`` of ``<prefix>.<leaf>``, return ``<prefix>``."""
    if node is None or not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    prefix, _, last = node.target.rpartition(".")
    return prefix if prefix and last == leaf else None


def _only_holds(gm: fx.GraphModule, prefix: str, names: set[str]) -> bool:
    holder = gm.get_submodule(prefix)
    own = {n for n, _ in holder.named_parameters(recurse=False)} | {n for n, _ in holder.named_buffers(recurse=False)}
    return type(holder) is nn.Module and not list(holder.children()) and own <= names


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


def lift_aten_convs(gm: fx.GraphModule) -> int:
    """Turn ``aten.conv2d`` / ``aten.batch_norm`` (inference) calls on parameters back into modules, in place.

    ``torch.export`` programs call ``aten.conv2d(x, <get_attr weight>, <get_attr bias>, stride, padding, dilation,
    groups)``. Where the weight (and bias) live alone on a plain holder module (``layer1.0.conv1.weight``), the
    holder becomes an ``nn.Conv2d`` owning the same parameters and the call becomes ``call_module``, so the normal
    pass (with BatchNorm folding) applies and the layer keeps its original name. Returns the number of lifted nodes.
    """
    lifted = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in (_aten.conv2d.default, _aten.conv2d.padding):
            args = list(node.args) + [None] * (7 - len(node.args))
            x, w, b, stride, padding, dilation, groups = args
            stride = stride or [1, 1]
            padding = padding if padding is not None else [0, 0]
            dilation, groups = dilation or [1, 1], groups or 1
            prefix = _holder(gm, w, "weight")
            if prefix is None or (b is not None and _holder(gm, b, "bias") != prefix):
                continue
            if len(w.users) != 1 or (b is not None and len(b.users) != 1):
                continue
            if not _only_holds(gm, prefix, {"weight", "bias"}):
                continue
            holder = gm.get_submodule(prefix)
            weight = holder.weight
            if weight.dim() != 4:
                continue
            conv = nn.Conv2d(
                weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=_pair(stride),
                padding=padding if isinstance(padding, str) else _pair(padding), dilation=_pair(dilation),
                groups=groups, bias=b is not None, device="meta",
            )
            conv.weight = weight
            conv.bias = holder.bias if b is not None else None
            _set_submodule(gm, prefix, conv)
        elif node.target == _aten.batch_norm.default and len(node.args) >= 8 and node.args[5] is False:
            x, w, b, mean, var, _training, momentum, eps = node.args[:8]
            prefix = _holder(gm, w, "weight")
            if prefix is None or _holder(gm, b, "bias") != prefix or _holder(gm, mean, "running_mean") != prefix \
                    or _holder(gm, var, "running_var") != prefix:
                continue
            if any(len(n.users) != 1 for n in (w, b, mean, var)):
                continue
            if not _only_holds(gm, prefix, {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}):
                continue
            holder = gm.get_submodule(prefix)
            bn = nn.BatchNorm2d(holder.weight.shape[0], eps=eps, momentum=momentum, device="meta")
            bn.weight, bn.bias = holder.weight, holder.bias
            bn.running_mean, bn.running_var = holder.running_mean, holder.running_var
            if hasattr(holder, "num_batches_tracked"):
                bn.num_batches_tracked = holder.num_batches_tracked
            else:
                bn.num_batches_tracked = torch.zeros((), dtype=torch.long, device=holder.weight.device)
            bn.train(False)
            _set_submodule(gm, prefix, bn)
        else:
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(prefix, (x,))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        inputs = [a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"]
        gm.graph.erase_node(node)
        for attr in inputs:  # the parameters are now read by the module itself
            if not attr.users:
                gm.graph.erase_node(attr)
        lifted += 1
    if lifted:
        gm.graph.lint()
        gm.recompile()
    return lifted


def fingerprint(model: nn.Module) -> str:
    """A hash of a model's structure: its class, its fx code (a ``GraphModule``), each submodule's configuration
    (:func:`separify.planning.latency.module_spec` for convs and replacements, else its class, ``extra_repr`` and
    the source of its ``forward``) and the shapes and dtypes of its tensors; not their values."""
    from separify.planning.latency import module_spec

    h = hashlib.sha256(_type_name(type(model)).encode())
    if isinstance(model, fx.GraphModule):
        h.update(model.code.encode())
    for name, m in model.named_modules():
        spec = module_spec(m)
        h.update(f"{name}:{spec if spec is not None else _describe(m)}".encode())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{t.device.type}".encode())
    return h.hexdigest()


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _describe(m: nn.Module) -> str:
    return f"{_type_name(type(m))}({m.extra_repr()}){_forward_source(type(m))}"


@functools.lru_cache(maxsize=None)
def _forward_source(cls: type) -> str:
    """The source of a user-defined module's ``forward`` (a changed forward is another model); torch's own
    modules are named by their class."""
    if cls.__module__.startswith("torch.") or isinstance(cls, type) and issubclass(cls, fx.GraphModule):
        return ""
    try:
        return hashlib.sha256(inspect.getsource(cls.forward).encode()).hexdigest()[:16]
    except (OSError, TypeError):
        return ""
