"""The observation pass: run the original model once over the calibration data, measuring every candidate conv.

For each conv, a forward pre-hook accumulates the second moments of its input ``x (B, M, H, W)`` (:class:`_Moments`):
the channel moments ``Σ_i x_i x_iᵀ (M, M)`` over all pixels ``i``, and the patch moments
``Σ_j u_{m,j} u_{m,j}ᵀ (M, P, P)`` over the patches ``j`` the conv reads (``u_{m,j}`` the ``P = kh·kw`` values of
channel ``m``; the conv's own padding, stride and dilation). A forward hook on its target (the conv, or the
BatchNorm folded into it) keeps the target's output, copied: models such as torchvision's ResNets change a
BatchNorm's output in place (``out += identity``, ``ReLU(inplace=True)``) after the hook has seen it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from separify.calibration.als import PatchStatistics, als_runs
from separify.calibration.memory import reuse_freed_memory
from separify.calibration.patches import gather_taps, out_size, pixel_coords
from separify.calibration.precision import fast_layout, forward_precision, full_precision
from separify.core.decompose import InputCovariance
from separify.core.measure import frozen_mode
from separify.errors import SeparifyError

__all__ = ["Observation", "observe"]

_UNFOLD_BYTES = 1 << 28  # bound on one buffer of patches (256 MiB)
_OBSERVE_BYTES = 1 << 21  # input bytes per forward of the observation pass on a CPU (3 images of 3×224²)
_OBSERVE_BYTES_AUTOCAST = 5 << 20  # the same under bfloat16 autocast (8 images: 12% less time than 3 on ResNet-50)
_MOMENT_PATCHES = 1 << 16  # patches per layer (over the whole calibration set) for the spatial moments, about


@dataclass
class Observation:
    """What :func:`observe` measured: per conv name, its input moments and its target's outputs over all
    ``samples`` calibration samples, one tensor ``(n_g, N, H_g, W_g)`` per sample shape ``g`` (the order of
    :func:`~separify.calibration.data.shape_groups`), in the precision the pass gave them."""

    covariances: dict[str, InputCovariance]
    outputs: dict[str, list[torch.Tensor]]
    samples: int
    patches: dict[str, PatchStatistics] = field(default_factory=dict)

    def pixels(self, name: str) -> int:
        """The output pixels of conv ``name`` over all samples."""
        return sum(y.shape[0] * y[0, 0].numel() for y in self.outputs[name])


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


def _channel_moments(x: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """``Σ_i x_i x_iᵀ (M, M)`` over the pixels ``i`` of ``x (B, M, H, W)``, float64, the products in ``work``;
    without a transposed copy in either memory layout."""
    b, m = x.shape[:2]
    if x.is_contiguous(memory_format=torch.channels_last):
        xp = x.permute(0, 2, 3, 1).reshape(-1, m).to(work)  # (B·H·W, M): a view, then the cast
        return (xp.T @ xp).double()
    xb = x.reshape(b, m, -1).to(work)  # (B, M, H·W)
    return torch.bmm(xb, xb.transpose(1, 2)).sum(0).double()


def _sampled_patch_moments(conv: nn.Conv2d, x: torch.Tensor, acc: _Moments, keep: int, total: int, wo: int,
                           ho: int, work: torch.dtype) -> torch.Tensor:
    """``Σ_j u_j u_jᵀ (M, P, P)`` over a seeded uniform sample of ``keep`` of the ``total`` patches of the padded
    ``x (B, M, H, W)``, scaled by ``total / keep``; the products in ``work``."""
    m = x.shape[1]
    p = conv.kernel_size[0] * conv.kernel_size[1]
    if acc.gen is None:
        acc.gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(total, generator=acc.gen)[:keep].to(x.device)
    spatial = torch.zeros(m, p, p, dtype=torch.float64, device=x.device)
    for part in idx.split(max(1, _UNFOLD_BYTES // (m * p * work.itemsize))):
        u = gather_taps(x, *pixel_coords(part, wo, ho * wo), conv.kernel_size, conv.stride, conv.dilation)
        # (n, P, M) → (M, P, n) in work's precision, one copy: each channel's P×n block contiguous for the bmm
        # (about half the time of a bmm on the permuted view for 128 channels, 2,048 patches)
        w = torch.empty((m, p, len(part)), dtype=work, device=x.device).copy_(u.permute(2, 1, 0))
        spatial += torch.bmm(w, w.transpose(1, 2)).double()
    spatial *= total / keep
    return spatial


def _all_patch_moments(conv: nn.Conv2d, x: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """``Σ_j u_j u_jᵀ (M, P, P)`` over every patch of the padded ``x (B, M, H, W)``, the products in ``work``.

    The patches are copied, in bounded chunks, from a strided view of ``x``: the values and the order
    ``F.unfold`` gives (so the same sums), cast to ``work`` on the way, in a fifth to three fifths of its time
    (ResNet-50's shapes, 2 CPU threads)."""
    m = x.shape[1]
    kh, kw = conv.kernel_size
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    p = kh * kw
    spatial = torch.zeros(m, p, p, dtype=torch.float64, device=x.device)
    per_sample = max(1, x[0].numel() * p * work.itemsize)
    for chunk in x.split(max(1, _UNFOLD_BYTES // per_sample)):
        taps = chunk.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)[..., ::dh, ::dw]
        # (b, M, Ho, Wo, kh, kw) view → (b, M, kh, kw, Ho, Wo) copy = unfold's (b, M·P, L), viewed (b·M, P, L)
        u = torch.empty((len(chunk), m, kh, kw, *taps.shape[2:4]), dtype=work, device=x.device)
        u = u.copy_(taps.permute(0, 1, 4, 5, 2, 3)).view(len(chunk) * m, p, -1)
        spatial += torch.bmm(u, u.transpose(1, 2)).view(len(chunk), m, p, p).sum(0).double()  # (M, P, P)
    return spatial


def _accumulate(conv: nn.Conv2d, x: torch.Tensor, acc: _Moments) -> None:
    """Add the channel and patch second moments of ``x (B, M, H, W)``, the input of ``conv``, to ``acc``.

    The channel moments use every pixel. The patch moments use every patch, or, when the calibration set has more
    than ``_MOMENT_PATCHES`` patches in all (``acc.samples`` given), a seeded uniform sample of that many, scaled to
    the full count (an ``M×P×P`` statistic needs no more)."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32  # products in it, sums in float64
    x = x.detach()
    b, m = x.shape[:2]
    kh, kw = conv.kernel_size
    pixels = b * x[0, 0].numel()
    channel = _channel_moments(x, work)
    # the patches exactly as the conv reads them: its own padding (any mode, 'same' included), stride, dilation;
    # padded in x's own precision (a bfloat16 activation: half the bytes), widened patch by patch
    pad = tuple(conv._reversed_padding_repeated_twice)
    if any(pad):
        x = F.pad(x, pad, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
    ho = out_size(x.shape[2], kh, conv.stride[0], conv.dilation[0])
    wo = out_size(x.shape[3], kw, conv.stride[1], conv.dilation[1])
    total = b * ho * wo
    keep = total if acc.samples is None else min(total, -(-_MOMENT_PATCHES * total // max(acc.samples * ho * wo, 1)))
    if keep < total:  # (M, P, P) from a sample of the patches, scaled to all of them
        spatial = _sampled_patch_moments(conv, x, acc, keep, total, wo, ho, work)
    else:
        spatial = _all_patch_moments(conv, x, work)
    if acc.channel is None:
        acc.channel, acc.spatial = channel, spatial
    else:
        acc.channel += channel
        acc.spatial += spatial
    acc.pixels += pixels
    acc.patches += total


def add_patches(stats: dict[str, PatchStatistics], name: str, conv: nn.Conv2d, x: torch.Tensor, y: torch.Tensor,
                samples: int, seed: int = 0) -> None:
    """Add the conv's input ``x`` and (target) output ``y`` to ``stats[name]``
    (:class:`~separify.calibration.PatchStatistics` over a seeded sample of the pixels of ``samples`` samples at
    the first batch's output size), made on first use; skipped where the ``(C·P)²`` Gram would be too large."""
    if name not in stats:
        if not als_runs(conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]):
            return
        stats[name] = PatchStatistics(conv, y.shape[1], samples * y[0, 0].numel(), seed=seed)
    stats[name].add(x, y)


class _Reached(Exception):
    """Every layer observed in this forward pass: it stops there."""


class _Kept:
    """The kept outputs of every layer: one tensor per sample shape, allocated at the layer's first output of that
    shape for every sample of it (within ``memory_gb``) and filled batch by batch, in order of first appearance. A
    copy: the model may still change its output in place (torchvision's ResNets: ``out += identity``,
    ``ReLU(inplace=True)``)."""

    def __init__(self, batches: list[torch.Tensor], memory_gb: float) -> None:
        self.counts: dict[tuple, int] = {}
        for b in batches:
            self.counts[tuple(b.shape[1:])] = self.counts.get(tuple(b.shape[1:]), 0) + len(b)
        self.memory_gb, self.samples, self.used = memory_gb, sum(self.counts.values()), 0
        self.buffers: dict[tuple[str, tuple], torch.Tensor] = {}
        self.filled: dict[tuple[str, tuple], int] = {}

    def add(self, name: str, shape: tuple, output: torch.Tensor) -> None:
        key = (name, shape)
        if key not in self.buffers:
            dtype = _kept_dtype(output.dtype)
            # in the output's own layout: the copy is then a plain one, and the fits read channels-last pixels
            # without a transpose
            buf = torch.empty((self.counts[shape], *output.shape[1:]), dtype=dtype,
                              memory_format=_layout(output))
            self.used += buf.numel() * buf.element_size()
            _check_kept(self.used, self.memory_gb, self.samples)
            self.buffers[key], self.filled[key] = buf, 0
        start = self.filled[key]
        self.buffers[key][start : start + len(output)].copy_(output.detach())
        self.filled[key] = start + len(output)

    def outputs(self, name: str) -> list[torch.Tensor]:
        return [buf for (n, _), buf in self.buffers.items() if n == name]


def _kept_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision an output of precision ``dtype`` is kept in: its own where it is a float (a 16-bit output of a
    pass under autocast holds no more digits than 16 bits keep, and takes half the memory and copying of float32),
    else float32."""
    return dtype if dtype.is_floating_point else torch.float32


def _layout(t: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a 4-D tensor stored so (and not also contiguous), else ``torch.contiguous_format``."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _check_kept(used: int, memory_gb: float, samples: int) -> None:
    """Refuse to keep more than ``memory_gb`` of layer outputs, saying how many samples would fit."""
    limit = int(memory_gb * (1 << 30))
    if used > limit:
        raise SeparifyError(f"calibration would keep more than {memory_gb:g} GB of layer outputs for {samples} "
                            f"samples; use fewer samples (e.g. --calib-limit "
                            f"{max(1, int(samples * limit / max(used, 1) * 0.9))}) or raise calib_memory_gb")


def _pieces(model: nn.Module, batches: list[torch.Tensor], dtype: torch.dtype | None, channels_last: bool):
    """``(sample shape, x)`` for each forward of :func:`observe`, with no gradients, the model frozen in eval mode
    and autocast to ``dtype`` (:func:`~separify.calibration.precision.forward_precision`); on a CPU at most
    ``_OBSERVE_BYTES`` of input per forward (large batches of large images run slower; ``_OBSERVE_BYTES_AUTOCAST``
    under autocast), channels-last where ``channels_last``."""
    device = batches[0].device if batches else torch.device("cpu")
    bound = _OBSERVE_BYTES if dtype is None else _OBSERVE_BYTES_AUTOCAST
    with torch.no_grad(), frozen_mode(model), reuse_freed_memory(), forward_precision(dtype, device):
        for batch in batches:
            size = bound // max(1, batch[0].numel() * batch.element_size()) if batch.device.type == "cpu" \
                else len(batch)
            for x in batch.split(max(1, size)):
                yield tuple(batch.shape[1:]), fast_layout(x) if channels_last else x


def _forwards(model: nn.Module, pieces, seen: set[str], current: list[tuple], samples: int,
              progress: Callable[[int, int], None] | None) -> None:
    """The forwards of :func:`observe` over ``pieces`` (each stopped once every layer is observed), ``current[0]``
    set to each piece's sample shape, ``seen`` cleared before each; ``progress(done, samples)`` after each."""
    done = 0
    for current[0], x in pieces:
        seen.clear()
        try:
            model(x)
        except _Reached:
            pass
        done += len(x)
        if progress is not None:
            progress(done, samples)


def observe(
    model: nn.Module, layers: dict[str, str], batches: list[torch.Tensor], *, memory_gb: float = 4.0,
    moments: bool = True, patches: frozenset[str] = frozenset(), dtype: torch.dtype | None = None,
    channels_last: bool = False, progress: Callable[[int, int], None] | None = None,
) -> Observation:
    """Run ``model`` (the original) over ``batches`` once, measuring every conv in ``layers``.

    Args:
        model: the unconverted model (run in eval mode, never changed).
        layers: conv name → name of the module whose output the replacement must reproduce (the conv itself, or the
            BatchNorm folded into it).
        batches: calibration inputs, see :func:`~separify.calibration.as_batches` (batches of one sample shape each,
            those of one shape together).
        memory_gb: bound on the kept outputs; exceeded → :class:`SeparifyError` saying how many samples fit.
        moments: measure the input moments (``False``: only keep the outputs; ``covariances`` is then empty).
        patches: layers whose patch statistics of input and output are gathered too (:func:`add_patches`, for
            ``method="auto"``).
        dtype: the forward runs under autocast to it (:mod:`~separify.calibration.precision`; ``None``: the
            model's precision); the moments are float32 (float64 for a float64 model) anyway, the kept outputs are
            in the precision the layer gave them (bfloat16 under bfloat16 autocast: widening them would add no
            digits). The fits widen what they read.
        channels_last: run the samples in the channels-last layout on a CPU (faster convolutions; only for models
            that take it, :func:`~separify.calibration.precision.runs_channels_last`).
        progress: called as ``progress(done, total)`` (samples) after each forward.

    Returns:
        :class:`Observation` with one :class:`~separify.core.decompose.InputCovariance` and one output tensor per
        layer.
    """
    samples = sum(len(x) for x in batches)
    acc = {name: _Moments(samples) for name in layers}
    kept = _Kept(batches, memory_gb)
    seen: set[str] = set()
    inputs: dict[str, torch.Tensor] = {}  # the last input of each conv in ``patches``
    stats: dict[str, PatchStatistics] = {}
    current: list[tuple] = [()]  # the sample shape of the batch running

    def pre(name):
        conv = model.get_submodule(name)

        def hook(_mod, args):
            if moments:
                with full_precision(args[0].device):
                    _accumulate(conv, args[0], acc[name])
            if name in patches:
                inputs[name] = args[0]

        return hook

    def post(name):
        def hook(_mod, _args, output):
            if name in seen:  # first call of the module in this forward pass only
                return
            seen.add(name)
            if name in patches:
                with full_precision(output.device):
                    add_patches(stats, name, model.get_submodule(name), inputs.pop(name), output.detach(), samples)
            kept.add(name, current[0], output)
            if len(seen) == len(layers):  # the rest of the forward measures nothing
                raise _Reached

        return hook

    handles = []
    try:
        for name, target in layers.items():
            if moments or name in patches:
                handles.append(model.get_submodule(name).register_forward_pre_hook(pre(name)))
            handles.append(model.get_submodule(target).register_forward_hook(post(name)))
        _forwards(model, _pieces(model, batches, dtype, channels_last), seen, current, samples, progress)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if not kept.outputs(n)]
    if missing:
        raise SeparifyError(f"the calibration data never reaches layer(s) {', '.join(missing[:3])}")
    covariances = {n: acc[n].result() for n in layers} if moments else {}
    return Observation(covariances, {n: kept.outputs(n) for n in layers}, samples, stats)
