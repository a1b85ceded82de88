"""The observation pass: run the original model once over the calibration data, measuring every candidate conv.

For each conv, a forward pre-hook accumulates the second moments of its input ``x (B, M, H, W)`` (:class:`_Moments`):
the channel moments ``Σ_i x_i x_iᵀ (M, M)`` over all pixels ``i``, and the patch moments
``Σ_j u_{m,j} u_{m,j}ᵀ (M, P, P)`` over the patches ``j`` the conv reads (``u_{m,j}`` the ``P = kh·kw`` values of
channel ``m``; the conv's own padding, stride and dilation). A forward hook on its target (the conv, or the
BatchNorm folded into it) keeps the target's output, copied: models such as torchvision's ResNets change a
BatchNorm's output in place (``out += identity``, ``ReLU(inplace=True)``) after the hook has seen it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from separify.calibration.memory import reuse_freed_memory
from separify.calibration.patches import gather_patches, out_size, pixel_coords
from separify.core.decompose import InputCovariance
from separify.core.measure import frozen_mode
from separify.errors import SeparifyError

__all__ = ["Observation", "observe"]

_UNFOLD_BYTES = 1 << 28  # bound on one buffer of patches (256 MiB)
_OBSERVE_BYTES = 1 << 21  # input bytes per forward of the observation pass on a CPU (3 images of 3×224²)
_MOMENT_PATCHES = 1 << 16  # patches per layer (over the whole calibration set) for the spatial moments, about


@dataclass
class Observation:
    """What :func:`observe` measured: per conv name, its input moments and its target's outputs ``(n, N, H, W)``
    over all ``samples`` calibration samples, in the order of the batches."""

    covariances: dict[str, InputCovariance]
    outputs: dict[str, torch.Tensor]
    samples: int


@dataclass
class _Moments:
    """Running sums of one conv's input moments: ``channel (M, M)`` over ``pixels`` pixels, ``spatial (M, P, P)``
    over ``patches`` patches, both float64.

    ``samples``: how many samples the calibration set holds in all; the spatial moments then use a seeded uniform
    sample (generator ``gen``) of about ``_MOMENT_PATCHES`` of its patches per call of the conv in a forward pass,
    rounded up per batch (``None``: all patches)."""

    samples: int | None = None
    channel: torch.Tensor | None = None
    spatial: torch.Tensor | None = None
    pixels: int = 0
    patches: int = 0
    gen: torch.Generator | None = None

    def result(self) -> InputCovariance:
        """The means ``channel / pixels`` and ``spatial / patches``, on the CPU (where the decomposition runs)."""
        return InputCovariance((self.channel / max(self.pixels, 1)).cpu(), (self.spatial / max(self.patches, 1)).cpu(),
                               self.patches)


def _sampled_patch_moments(conv: nn.Conv2d, x: torch.Tensor, acc: _Moments, keep: int, total: int, wo: int,
                           ho: int) -> torch.Tensor:
    """``Σ_j u_j u_jᵀ (M, P, P)`` over a seeded uniform sample of ``keep`` of the ``total`` patches of the padded
    ``x (B, M, H, W)``, scaled by ``total / keep``."""
    m = x.shape[1]
    p = conv.kernel_size[0] * conv.kernel_size[1]
    if acc.gen is None:
        acc.gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(total, generator=acc.gen)[:keep].to(x.device)
    spatial = torch.zeros(m, p, p, dtype=torch.float64, device=x.device)
    for part in idx.split(max(1, _UNFOLD_BYTES // (m * p * x.element_size()))):
        u = gather_patches(x, *pixel_coords(part, wo, ho * wo), conv.kernel_size, conv.stride,
                           conv.dilation)  # (n, M·P)
        u = u.view(len(part), m, p).permute(1, 2, 0)  # (M, P, n)
        spatial += torch.bmm(u, u.transpose(1, 2)).double()
    spatial *= total / keep
    return spatial


def _all_patch_moments(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``Σ_j u_j u_jᵀ (M, P, P)`` over every patch of the padded ``x (B, M, H, W)``, unfolded in bounded chunks."""
    m = x.shape[1]
    kh, kw = conv.kernel_size
    p = kh * kw
    spatial = torch.zeros(m, p, p, dtype=torch.float64, device=x.device)
    per_sample = max(1, x[0].numel() * p * x.element_size())
    for chunk in x.split(max(1, _UNFOLD_BYTES // per_sample)):
        u = F.unfold(chunk, (kh, kw), dilation=conv.dilation, stride=conv.stride)  # (b, M·P, L)
        u = u.view(len(chunk), m, p, -1).permute(1, 2, 0, 3).reshape(m, p, -1)  # (M, P, b·L)
        spatial += torch.bmm(u, u.transpose(1, 2)).double()  # (M, P, P)
    return spatial


def _accumulate(conv: nn.Conv2d, x: torch.Tensor, acc: _Moments) -> None:
    """Add the channel and patch second moments of ``x (B, M, H, W)``, the input of ``conv``, to ``acc``.

    The channel moments use every pixel. The patch moments use every patch, or, when the calibration set has more
    than ``_MOMENT_PATCHES`` patches in all (``acc.samples`` given), a seeded uniform sample of that many, scaled to
    the full count (an ``M×P×P`` statistic needs no more)."""
    x = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    b, m = x.shape[:2]
    kh, kw = conv.kernel_size
    xb = x.reshape(b, m, -1)  # (B, M, H·W)
    channel = torch.bmm(xb, xb.transpose(1, 2)).sum(0).double()  # Σ over pixels of x xᵀ, no transposed copy
    # the patches exactly as the conv reads them: its own padding (any mode, 'same' included), stride, dilation
    pad = tuple(conv._reversed_padding_repeated_twice)
    if any(pad):
        x = F.pad(x, pad, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
    ho = out_size(x.shape[2], kh, conv.stride[0], conv.dilation[0])
    wo = out_size(x.shape[3], kw, conv.stride[1], conv.dilation[1])
    total = b * ho * wo
    keep = total if acc.samples is None else min(total, -(-_MOMENT_PATCHES * total // max(acc.samples * ho * wo, 1)))
    if keep < total:  # (M, P, P) from a sample of the patches, scaled to all of them
        spatial = _sampled_patch_moments(conv, x, acc, keep, total, wo, ho)
    else:
        spatial = _all_patch_moments(conv, x)
    if acc.channel is None:
        acc.channel, acc.spatial = channel, spatial
    else:
        acc.channel += channel
        acc.spatial += spatial
    acc.pixels += b * xb.shape[2]
    acc.patches += total


def observe(
    model: nn.Module, layers: dict[str, str], batches: list[torch.Tensor], *, memory_gb: float = 4.0,
    moments: bool = True,
) -> Observation:
    """Run ``model`` (the original) over ``batches`` once, measuring every conv in ``layers``.

    Args:
        model: the unconverted model (run in eval mode, never changed).
        layers: conv name → name of the module whose output the replacement must reproduce (the conv itself, or the
            BatchNorm folded into it).
        batches: calibration inputs, see :func:`~separify.calibration.as_batches`.
        memory_gb: bound on the kept outputs; exceeded → :class:`SeparifyError` saying how many samples fit.
        moments: measure the input moments (``False``: only keep the outputs; ``covariances`` is then empty).

    Returns:
        :class:`Observation` with one :class:`~separify.core.decompose.InputCovariance` and one output tensor per
        layer.
    """
    samples = sum(len(x) for x in batches)
    acc = {name: _Moments(samples) for name in layers}
    kept: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    seen: set[str] = set()
    used = 0
    limit = int(memory_gb * (1 << 30))

    def pre(name):
        conv = model.get_submodule(name)

        def hook(_mod, args):
            _accumulate(conv, args[0], acc[name])

        return hook

    def post(name):
        def hook(_mod, _args, output):
            nonlocal used
            if name in seen:  # first call of the module in this forward pass only
                return
            seen.add(name)
            # a copy: the model may still change its output in place (torchvision's ResNets: `out += identity`,
            # ReLU(inplace=True)), and ``.to`` returns the tensor itself when it is already on the CPU in float32
            y = output.detach().to("cpu", torch.float64 if output.dtype == torch.float64 else torch.float32,
                                   copy=True)
            used += y.numel() * y.element_size()
            if used > limit:
                raise SeparifyError(f"calibration would keep more than {memory_gb:g} GB of layer outputs for "
                                    f"{samples} samples; use fewer samples (e.g. --calib-limit "
                                    f"{max(1, int(samples * limit / max(used, 1) * 0.9))}) or raise calib_memory_gb")
            kept[name].append(y)

        return hook

    handles = []
    try:
        for name, target in layers.items():
            if moments:
                handles.append(model.get_submodule(name).register_forward_pre_hook(pre(name)))
            handles.append(model.get_submodule(target).register_forward_hook(post(name)))
        with torch.no_grad(), frozen_mode(model), reuse_freed_memory():
            for batch in batches:
                # on a CPU, at most _OBSERVE_BYTES of input per forward (large batches of large images run slower)
                size = _OBSERVE_BYTES // max(1, batch[0].numel() * batch.element_size()) \
                    if batch.device.type == "cpu" else len(batch)
                for x in batch.split(max(1, size)):
                    seen.clear()
                    model(x)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if not kept[n]]
    if missing:
        raise SeparifyError(f"the calibration data never reaches layer(s) {', '.join(missing[:3])}")
    covariances = {n: acc[n].result() for n in layers} if moments else {}
    return Observation(covariances, {n: torch.cat(kept[n]) for n in layers}, samples)
