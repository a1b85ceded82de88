"""Calibration-aware initialisation: refit each replacement's last 1×1 conv to the original layer's *outputs*.

Weight-space decomposition minimises ‖W − Ŵ‖, which treats every input direction as equally likely. On real data
the inputs of a layer are strongly correlated, and what matters is the error of the layer's output. For a converted
layer let ``z`` be the input of its last 1×1 conv (``C`` channels: ``M·K`` for dw-pw, ``R`` for pw-dw-pw) in the
converted model, and ``y`` the output of the original layer (after its folded BatchNorm, if any) in the original
model, on the same calibration images. The last 1×1 conv is a per-pixel affine map, so the output-optimal weights
solve a linear least-squares problem over all pixels ``i``::

    min_{P, b}  Σ_i ‖y_i − P z_i − b‖²   ⇒   [P b] = H G⁻¹,   G = Σ_i ž_i ž_iᵀ,   H = Σ_i y_i ž_iᵀ,   ž = [z; 1]

(with a tiny ridge ``λ‖[P b] − [P₀ b₀]‖²`` towards the weight-space factors, so that directions the calibration
data does not excite keep their weight-space values). Only ``G`` and ``H`` are accumulated, streaming over batches, so memory
is ``(C+1)² + N·(C+1)`` float64 numbers for one layer at a time, whatever the amount of data. Layers are refitted in
forward order, and each layer's ``z`` comes from the converted model whose upstream layers are already refitted, so
each refit also absorbs the error introduced upstream. At full rank the refit reproduces the original layer exactly
(the original 1×1 weights are a solution with zero residual).

The calibration batches are kept in memory and each is run once per converted layer (through both models, stopping
at that layer), so a few hundred images are the intended size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .errors import SeparifyError
from .measure import frozen_mode

__all__ = ["LayerFit", "as_batches", "refit_pointwise"]


@dataclass(frozen=True)
class LayerFit:
    """Relative output error ``‖y − ŷ‖ / ‖y‖`` of one layer on the calibration data, before and after the refit."""

    name: str
    error_before: float
    error_after: float
    pixels: int


class _Stop(Exception):
    pass


def as_batches(data: Any, *, limit: int | None = None) -> list[torch.Tensor]:
    """Normalise calibration data to a list of input batches.

    ``data`` may be a tensor ``(N, ...)`` (split into batches of 128), or an iterable of batches, each a tensor or a
    tuple/list whose first element is the input (as a ``DataLoader`` of ``(image, label)`` yields). At most ``limit``
    samples are kept.
    """
    if isinstance(data, torch.Tensor):
        data = list(torch.split(data, 128))
    batches: list[torch.Tensor] = []
    count = 0
    for item in data:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor):
            raise SeparifyError(f"calibration batches must be tensors (or (input, ...) tuples), got {type(x).__name__}")
        if not x.is_floating_point():
            raise SeparifyError(f"calibration inputs must be floating point (normalised as for the model), got {x.dtype}")
        if limit is not None and count + len(x) > limit:
            x = x[: limit - count]
        if len(x):
            batches.append(x)
            count += len(x)
        if limit is not None and count >= limit:
            break
    if not batches:
        raise SeparifyError("the calibration data is empty")
    return batches


def _run_until(model: nn.Module, module: nn.Module, x: torch.Tensor, *, want: str) -> torch.Tensor:
    """Run ``model(x)`` only as far as the first call of ``module``; return that call's input or output."""
    captured: list[torch.Tensor] = []

    def hook(_mod, args, output=None):
        captured.append(args[0] if want == "input" else output)
        raise _Stop

    handle = (module.register_forward_pre_hook(hook) if want == "input"
              else module.register_forward_hook(hook))
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise SeparifyError(f"the calibration data never reaches layer {module!r}")
    return captured[0]


def _pixels(t: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B·H·W, C)`` in float64."""
    return t.detach().permute(0, 2, 3, 1).reshape(-1, t.shape[1]).to(torch.float64)


def refit_pointwise(
    original: nn.Module,
    converted: nn.Module,
    layers: Iterable[tuple[str, str]],
    batches: list[torch.Tensor],
    *,
    ridge: float = 1e-6,
    progress: Callable[[str], None] | None = None,
) -> list[LayerFit]:
    """Refit the last 1×1 conv of each replacement, in order, to the original model's outputs (see module docstring).

    Args:
        original: the unconverted model (only run, never changed).
        converted: the converted model; its replacements' last 1×1 convs are overwritten.
        layers: ``(name in converted, name of the target in original)`` pairs in forward order; the target is the
            original conv, or the BatchNorm folded into it.
        batches: calibration inputs, see :func:`as_batches`.
        ridge: relative weight of the pull towards the weight-space factors (times the mean diagonal of ``G``).

    Returns:
        One :class:`LayerFit` per layer.
    """
    fits = []
    with torch.no_grad(), frozen_mode(original, converted):
        for name, target in layers:
            if progress is not None:
                progress(name)
            last = converted.get_submodule(name)._last()
            target_module = original.get_submodule(target)
            has_bias = last.bias is not None
            c = last.in_channels
            dim = c + int(has_bias)
            gram = torch.zeros(dim, dim, dtype=torch.float64)
            cross = torch.zeros(last.out_channels, dim, dtype=torch.float64)
            y2 = 0.0
            pixels = 0
            for x in batches:
                y = _pixels(_run_until(original, target_module, x, want="output"))
                z = _pixels(_run_until(converted, last, x, want="input"))
                if y.shape[0] != z.shape[0]:
                    raise SeparifyError(f"layer {name}: the original and converted outputs differ in size")
                if has_bias:
                    z = torch.cat([z, z.new_ones(z.shape[0], 1)], 1)
                gram += z.T @ z
                cross += y.T @ z
                y2 += float((y**2).sum())
                pixels += y.shape[0]
            w = last.weight.detach().reshape(last.out_channels, c).to(torch.float64)
            old = torch.cat([w, last.bias.detach().to(torch.float64)[:, None]], 1) if has_bias else w
            lam = ridge * float(gram.diagonal().mean().clamp_min(1e-30))
            # ridge towards the weight-space factors: directions the data never excites keep their old weights
            new = torch.linalg.solve(gram + lam * torch.eye(dim, dtype=torch.float64), (cross + lam * old).T).T

            def err(p: torch.Tensor) -> float:
                # ‖Y − P Ž‖² = ‖Y‖² − 2 tr(P Hᵀ) + tr(P G Pᵀ), from the accumulated statistics
                sq = y2 - 2 * float((p * cross).sum()) + float(((p @ gram) * p).sum())
                return (max(sq, 0.0) / max(y2, 1e-300)) ** 0.5

            before, after = err(old), err(new)
            if not after <= before:  # numerical trouble: keep the weight-space factors
                new, after = old, before
            last.weight.copy_(new[:, :c].reshape_as(last.weight).to(last.weight.dtype))
            if has_bias:
                last.bias.copy_(new[:, c].to(last.bias.dtype))
            fits.append(LayerFit(name, before, after, pixels))
    return fits
