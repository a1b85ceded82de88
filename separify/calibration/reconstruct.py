"""Layer-wise reconstruction: gradient steps on all factors of one replacement against the original outputs."""

from __future__ import annotations

import time
from typing import Sequence

import torch
from torch import nn

from separify.calibration.linalg import sq_norm
from separify.calibration.precision import fast_layout

__all__ = ["CHECK_SAMPLES", "MINIBATCH_PIXELS", "last_input", "reconstruct"]

#: samples per shape group on which the reconstruction is checked to have lowered the layer's error
CHECK_SAMPLES = 64

#: output pixels per minibatch above which it takes fewer than ``batch_size`` samples (8 samples of 32×32)
MINIBATCH_PIXELS = 8192


def reconstruct(module: nn.Module, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], *, steps: int, lr: float,
                batch_size: int, seed: int, until: float | None = None) -> int:
    """``steps`` Adam steps (learning rate ``lr``) on all of ``module``'s parameters (every factor, not only the
    last 1×1 conv), minimising ``mean((module(x_B) − y_B)²) / mean(y²)`` over random minibatches ``B`` of
    ``batch_size`` samples (fewer for large images, :data:`MINIBATCH_PIXELS`). ``xs``, ``ys``: the inputs
    ``(n_g, ...)`` and targets ``(n_g, N, H_g, W_g)`` of each group of samples of one shape; a minibatch is drawn from
    one group, chosen with probability proportional to its size (a generator seeded by ``seed``). On a CPU the
    steps run in the channels-last layout (:func:`~separify.calibration.precision.fast_layout`), whichever layout
    the pass gave: the groups are laid out so once, at a copy each where the pass gave another layout.

    Never worse: the loss on up to :data:`CHECK_SAMPLES` samples of each group is measured before and after, and
    the parameters are restored where the steps did not lower it (Adam's steps have the size ``lr`` however small the
    gradient, so from a layer that is already exact they can only move away); so does a non-finite result. The
    steps run in full precision, also where the calibration passes run under bfloat16 autocast
    (:mod:`~separify.calibration.precision`): bfloat16 rounds the weights to 8 bits, below which Adam's small
    steps do not show (on the OCR benchmark network it cost 12 points of word accuracy). ``requires_grad`` flags
    are restored and the gradients cleared on exit.

    ``until``: a :func:`time.perf_counter` deadline (:mod:`~separify.calibration.budget`); no step starts after it
    (none where it has passed). Returns the number of steps taken."""
    if until is not None and time.perf_counter() >= until:
        return 0
    params = list(module.parameters())
    saved = [p.detach().clone() for p in params]
    # once per layer, not per step: inputs and targets channels-last on a CPU (depthwise and 1×1 convs: 20–35%
    # faster per step in it for 64–256 channels); no copy where the pass gave them so
    xs, ys = [fast_layout(x) for x in xs], [fast_layout(y) for y in ys]
    before = _check_loss(module, xs, ys)
    flags = [p.requires_grad for p in params]
    gen = torch.Generator().manual_seed(seed)
    # the fused kernel: one pass over the parameters instead of several per step (CPU and CUDA have it)
    opt = torch.optim.Adam(params, lr=lr, fused=all(p.device.type in ("cpu", "cuda") for p in params))
    sizes = torch.tensor([float(len(x)) for x in xs])
    scale = (sum(sq_norm(y) for y in ys) / sum(y.numel() for y in ys)) or 1e-30
    taken = 0
    try:
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            for taken in range(1, steps + 1):
                g = int(torch.multinomial(sizes, 1, generator=gen)) if len(xs) > 1 else 0
                x, y = xs[g], ys[g]
                idx = torch.randint(0, len(x), (_minibatch(batch_size, x, y),), generator=gen).tolist()
                out = module(_rows(x, idx))
                # the loss of the docstring, Σ (out − y)² / (numel · mean(y²)), has the gradient 2 (out − y) /
                # (numel · mean(y²)) with respect to out: handed to the backward directly, scaled in place (no loss
                # value to reduce, no second copy)
                target = _rows(y, idx).to(out.device, out.dtype)
                grad = (out.detach() - target).mul_(2.0 / (out.numel() * scale))
                opt.zero_grad(set_to_none=True)
                out.backward(grad)
                opt.step()
                if until is not None and time.perf_counter() >= until:
                    break
        after = _check_loss(module, xs, ys)
        if not after < before:  # NaN included
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None
    return taken


def _rows(t: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """``t[idx]`` for a few sample indices, in ``t``'s memory layout: one block copy per sample (each sample of a
    4-D tensor is one contiguous block in either layout), about 4× faster than advanced indexing on a CPU."""
    return torch.cat([t[i : i + 1] for i in idx])


def _minibatch(batch_size: int, x: torch.Tensor, y: torch.Tensor) -> int:
    """Samples per minibatch from the group ``x``, ``y (n, N, H, W)``: ``batch_size``, fewer where that many would
    hold more than :data:`MINIBATCH_PIXELS` output pixels (large images: their pixels already average the gradient),
    at least one."""
    return max(1, min(batch_size, len(x), -(-MINIBATCH_PIXELS // max(1, y[0, 0].numel()))))


def _check_loss(module: nn.Module, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> float:
    """``Σ ‖module(x) − y‖²`` over the first :data:`CHECK_SAMPLES` samples of each group."""
    total = 0.0
    with torch.no_grad():
        for x, y in zip(xs, ys):
            x, y = x[:CHECK_SAMPLES], y[:CHECK_SAMPLES]
            out = module(x)
            total += sq_norm(out - y.to(out.device, out.dtype))
    return total


def last_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input ``z (n, C, H, W)`` of ``module``'s last 1×1 conv (``module._last()``) when ``module`` runs on
    ``x``."""
    seen: list[torch.Tensor] = []
    handle = module._last().register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            module(x)
    finally:
        handle.remove()
    return seen[0]
