"""How much each layer's output error moves the model's output: weights for a loss-aware rank allocation.

A replacement leaves an error ``e_i`` in the output ``y_i`` of layer ``i`` (relative size ``ε_i = ‖e_i‖/‖y_i‖``,
which the allocation predicts). To first order it changes the model's output ``f`` by ``J_i e_i``, ``J_i = ∂f/∂y_i``.
A loss of the output that is locally quadratic, ``L(f + δ) ≈ ½ δᵀ H δ``, grows by ``½ e_iᵀ J_iᵀ H J_i e_i``; for an
error spread evenly over ``y_i``'s ``d_i`` entries its mean is ``½ ε_i² ‖y_i‖² tr(J_iᵀ H J_i) / d_i``. So
minimising the loss means minimising ``Σ_i w_i ε_i²`` with

    w_i = ‖y_i‖² tr(J_iᵀ H J_i) / d_i,

instead of ``Σ_i ε_i²`` (every layer alike). ``tr(J_iᵀ H J_i) = E_v ‖J_iᵀ v‖²`` for any random ``v`` over the output
with ``E[v vᵀ] = H``: one backward pass of ``vᵀf`` gives ``J_iᵀ v`` at every layer at once, so :func:`sensitivity`
costs a forward and ``probes`` backward passes over a few calibration samples (:data:`SAMPLES`). Two losses:

- ``"fisher"``: the KL divergence of the softmax over ``class_dim`` of the output (logits), whose ``H`` is the
  Fisher information ``E_y[g gᵀ]``, ``g = ∇_f log p(y)``, ``y`` drawn from the model's own prediction; ``v = g``.
  What moves the predicted distribution weighs, not the logits of classes the model never predicts.
- ``"mse"``: the squared change of every output, ``H = I``, ``v ~ N(0, I)`` (Hutchinson's estimator); for models
  whose outputs are not logits.

The weights are normalised to mean 1.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from separify.calibration.linalg import sq_norm
from separify.calibration.memory import reuse_freed_memory
from separify.calibration.precision import fast_layout, forward_precision, widened
from separify.config import class_axis
from separify.core.measure import frozen_mode

__all__ = ["LOSSES", "SAMPLES", "sensitivity", "unweighted_note"]

#: calibration samples the weights are measured on
SAMPLES = 16
LOSSES = ("fisher", "mse")


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _probe(outs: list[torch.Tensor], loss: str, class_dim: int | None, gen: torch.Generator) -> torch.Tensor:
    """``vᵀf`` summed over the outputs, with ``v`` drawn for ``loss`` (module docstring)."""
    total = 0.0
    for o in outs:
        if loss == "mse" or o.dim() == 0:
            total = total + (o * torch.randn(o.shape, generator=gen).to(o)).sum()
            continue
        axis = class_axis(class_dim, o.dim())
        logp = torch.log_softmax(o.double(), dim=axis).movedim(axis, -1)  # (..., classes)
        flat = logp.detach().exp().reshape(-1, logp.shape[-1])
        y = torch.multinomial(flat, 1, generator=gen).reshape(logp.shape[:-1] + (1,))
        total = total + logp.gather(-1, y).sum()  # its gradient is g = onehot(y) − p at every position
    return total


def sensitivity(model: nn.Module, targets: dict[str, str], xs: Sequence[torch.Tensor], *, loss: str = "fisher",
                class_dim: int | None = None, probes: int = 2, seed: int = 0, dtype: torch.dtype | None = None,
                channels_last: bool = False, progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """``w_i`` of the module docstring (``loss``: ``"fisher"``, softmax over ``class_dim``, by default
    :func:`~separify.config.class_axis`, or ``"mse"``) for every
    layer ``name`` of ``targets`` (name → the module whose output
    the replacement must reproduce), on the samples ``xs`` (batches, of any shapes the model takes; the sums run
    over all of them); mean 1 over the layers the output depends on, which are the keys returned. The model is run
    in eval mode and left unchanged (no gradient reaches its parameters). ``dtype``: the forward runs under autocast
    to it (:mod:`~separify.calibration.precision`); the sums are taken in float32 or wider. ``channels_last``: the
    samples run in the channels-last layout on a CPU (for models that take it,
    :func:`~separify.calibration.precision.runs_channels_last`). ``progress(done,
    total)``: passes done of ``total = len(xs) * (1 + probes)`` (a forward or a backward over one batch), called
    before the first (``done`` 0) and after each."""
    sq = dict.fromkeys(targets, 0.0)  # Σ y² over the samples
    size = dict.fromkeys(targets, 0)  # entries of y
    grads = dict.fromkeys(targets, 0.0)  # Σ over probes of ‖J_iᵀ v‖²
    reached: set[str] = set()
    seen: set[str] = set()  # layers already hooked in the current forward (a module called twice counts once)

    def hook(name):
        def fn(_mod, _args, output):
            if name in seen or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return None
            seen.add(name)
            sq[name] += sq_norm(widened(output))
            size[name] += output.numel()
            output.register_hook(lambda g: _add(name, g))
            return output.clone()  # later in-place ops (ReLU(inplace=True), out += identity) change the clone

        return fn

    def _add(name, g):
        reached.add(name)
        grads[name] += sq_norm(widened(g))

    flags = [(p, p.requires_grad) for p in model.parameters()]
    gen = torch.Generator().manual_seed(seed)
    handles = []
    passes, report = len(xs) * (1 + probes), progress or (lambda done, total: None)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for name, target in targets.items():
            handles.append(model.get_submodule(target).register_forward_hook(hook(name)))
        report(0, passes)
        with frozen_mode(model), torch.enable_grad(), reuse_freed_memory():
            for b, x in enumerate(xs):
                seen.clear()
                with forward_precision(dtype, x.device):
                    x = fast_layout(x) if channels_last else x
                    outs = _tensors(model(x.detach().clone().requires_grad_(True)))
                outs = [widened(o) for o in outs]
                report(b * (1 + probes) + 1, passes)
                for i in range(probes):
                    total = _probe(outs, loss, class_dim, gen)
                    if isinstance(total, torch.Tensor) and total.requires_grad:
                        total.backward(retain_graph=i < probes - 1)
                    report(b * (1 + probes) + 2 + i, passes)
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    w = {n: sq[n] / size[n] * grads[n] / probes for n in targets if n in reached and size[n]}
    mean = sum(w.values()) / max(len(w), 1)
    return {n: (v / mean if mean > 0 else 1.0) for n, v in w.items()}


def unweighted_note(names: Sequence[str], weights: dict[str, float], why: str | None = None) -> str | None:
    """The warning for the layers of ``names`` that have no weight (``None``: all have one)."""
    missing = [n for n in names if n not in weights]
    if not missing:
        return None
    which = f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
    why = why or "the model's output has no gradient through them on the calibration samples"
    return (f"loss-aware rank allocation: no sensitivity for {len(missing)} layer(s) ({which}): {why}; their "
            "errors weigh as the mean layer's")
