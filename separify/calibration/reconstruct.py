"""Layer-wise reconstruction: gradient steps on all factors of one replacement against the original outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["last_input", "reconstruct"]


def reconstruct(module: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float, batch_size: int,
                seed: int) -> None:
    """``steps`` Adam steps (learning rate ``lr``) on all of ``module``'s parameters (every factor, not only the
    last 1×1 conv), minimising ``mean((module(x_B) − y_B)²) / mean(y²)`` over random minibatches ``B`` of
    ``batch_size`` of the samples ``x (n, ...)``, ``y (n, N, H, W)`` (drawn with a generator seeded by ``seed``).

    A non-finite loss restores the parameters as they were and stops. ``requires_grad`` flags are restored and the
    gradients cleared on exit."""
    params = list(module.parameters())
    saved = [p.detach().clone() for p in params]
    flags = [p.requires_grad for p in params]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    scale = y.pow(2).mean().clamp_min(1e-30)
    try:
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            for _ in range(steps):
                idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=gen)
                loss = F.mse_loss(module(x[idx]), y[idx].to(x.device)) / scale
                if not torch.isfinite(loss):
                    with torch.no_grad():
                        for p, s in zip(params, saved):
                            p.copy_(s)
                    return
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None


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
