"""Calibration: measure each layer's real inputs, then refit each replacement's last 1×1 conv to the original outputs.

Weight-space decomposition minimises ‖W − Ŵ‖, which treats every input direction as equally likely. On real data
the inputs of a layer are strongly correlated, and what matters is the error of the layer's output. Calibration
works in two passes over the data:

1. :func:`observe` runs the *original* model once over the calibration batches. Forward hooks accumulate, for every
   candidate conv, the second moments of its real inputs (:class:`~separify.decompose.InputCovariance`: ``M×M`` over
   pixels and ``M×P×P`` over the patches the conv reads) and keep the output of its target (the conv, or the
   BatchNorm folded into it). The moments drive the whitened decomposition and the data-aware rank allocation.
2. :func:`refit_pointwise` runs the *converted* model once, on all calibration samples as one batch. A pre-hook on
   each replacement's last 1×1 conv fires when the forward reaches it; there ``z`` (its input, ``C`` channels:
   ``M·K`` for dw-pw, ``R`` for pw-dw-pw) and the kept original output ``y`` give the output-optimal weights by
   linear least squares over all pixels ``i``::

       min_{P, b}  Σ_i ‖y_i − P z_i − b‖²   ⇒   [P b] = H G⁻¹,   G = Σ_i ž_i ž_iᵀ,   H = Σ_i y_i ž_iᵀ,   ž = [z; 1]

   (with a tiny ridge ``λ‖[P b] − [P₀ b₀]‖²`` towards the current factors, so that directions the data does not
   excite keep their values). The weights are replaced before the conv runs, so the forward continues with the
   refitted layer: every later layer sees, and corrects, the error left upstream, in one pass instead of one pass
   per layer. At full rank the refit reproduces the original layer exactly.

   Before the refit (``calib_als > 0``, the default), when the forward reaches a replacement, its depthwise conv
   ``D`` and last 1×1 conv ``P`` are fitted *jointly* to ``y`` by alternating least squares (:func:`als_dw_pw`):
   ``ŷ_i = P·dw_D(u_i) + b`` is linear in ``D`` for fixed ``P`` and in ``[P b]`` for fixed ``D``, so both
   half-steps are least-squares solves from the patch statistics ``S = Σ u uᵀ``, ``Σ y uᵀ`` of the depthwise conv's
   input ``u`` (``C·P`` values per pixel; a seeded sample of pixels), gathered once — no further pass over the data.
3. Optionally (``calib_steps > 0``), in the same pass, each replacement is *reconstructed* before the forward moves
   on: a few hundred Adam steps on all of its factors against the same targets, then the least-squares refit again.

Scarce data: with fewer calibration pixels than the last 1×1 conv has weights per output channel, the least-squares
fit reproduces the data and fails elsewhere. Where a layer has fewer than :data:`PIXELS_PER_INPUT` pixels per
input channel (:func:`scarce`), the refit's ridge is chosen by 2-fold cross-validation over even and odd samples
(:class:`PointwiseRefit`), and the alternating least squares and the reconstruction are skipped; the layer's note
says so. The kept outputs are copies: models such as torchvision's ResNets change a BatchNorm's output in place
(``out += identity``, ``ReLU(inplace=True)``) after the hook has seen it.

Speed: both passes (of the PyTorch path) run inside :func:`reuse_freed_memory`, a process-wide allocator setting. glibc hands every block above its mmap threshold (at most
32 MiB by default) back to the kernel when it is freed, so each large activation of a forward pass is a fresh
mapping whose pages fault in zeroed; at batch 64 at 224², a converted ResNet-50's forward took 7.2 s for it against
3.1 s (2-core CPU). On the CPU the observation pass also runs a few samples per forward.

Memory: the kept outputs (every converted layer's output for every sample, float32 — float64 for float64 models; bounded by
``calib_memory_gb``, with a clear error beyond), plus one forward pass of the converted model on all samples at
once, plus ``(C+1)²`` float64 statistics for one layer at a time (with ALS also its ``(C·P)²`` patch Gram, at most
512 MiB: larger layers skip ALS with a note). A module called several times in one forward
pass is calibrated on its first call.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from separify.core.decompose import InputCovariance
from separify.errors import SeparifyError
from separify.core.measure import frozen_mode

__all__ = ["LayerFit", "Observation", "PatchStatistics", "PointwiseRefit", "als_dw_pw", "als_fit", "als_skip_reason",
           "als_runs", "as_batches", "observe", "refit_pointwise", "reuse_freed_memory", "scarce",
           "scarce_note"]


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc's malloc.h)


def _glibc() -> Any:
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:  # pragma: no cover - a static interpreter
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


_ALLOCATOR_LOCK = threading.Lock()
_allocator_depth = 0  # calibrations running now (nested or in other threads): the first sets, the last restores


def _allocator_tuned_by_user() -> bool:
    env = os.environ
    return (any(k in env for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
            or "glibc.malloc." in env.get("GLIBC_TUNABLES", "")
            or env.get("SEPARIFY_MALLOPT", "").strip().lower() in ("0", "false", "no", "off"))


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Let glibc reuse freed large blocks for the duration (see the module docstring).

    Raises glibc's mmap and trim thresholds to 1 GiB. On exit (of the outermost use, when several run at once) it
    sets them to 32 MiB and 64 MiB, the largest values glibc's own dynamic threshold moves to, and trims the heap so
    the memory goes back to the system. This is a process-wide setting, and it stays fixed afterwards: glibc's
    dynamic adjustment, which starts at 128 KiB, is off for the rest of the process once any threshold is set. It is
    a no-op off glibc, when the user tuned the allocator (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or a
    ``glibc.malloc`` tunable in ``GLIBC_TUNABLES``: their tuning wins), and with ``SEPARIFY_MALLOPT=0``.
    """
    global _allocator_depth
    libc = None if _allocator_tuned_by_user() else _glibc()
    if libc is None:
        yield
        return
    with _ALLOCATOR_LOCK:
        _allocator_depth += 1
        if _allocator_depth == 1:
            libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
            libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield
    finally:
        with _ALLOCATOR_LOCK:
            _allocator_depth -= 1
            if _allocator_depth == 0:
                libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
                libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
                libc.malloc_trim(0)


@dataclass(frozen=True)
class LayerFit:
    """Relative output error ``‖y − ŷ‖ / ‖y‖`` of one layer on the calibration data, before and after the refit."""

    name: str
    error_before: float
    error_after: float
    pixels: int
    note: str | None = None


@dataclass
class Observation:
    """What :func:`observe` measured: per conv name, its input moments and its target's outputs ``(n, N, H, W)``."""

    covariances: dict[str, InputCovariance]
    outputs: dict[str, torch.Tensor]
    samples: int


@dataclass
class _Moments:
    """Running sums of one conv's input moments. ``samples``: how many samples the calibration set holds in all (the
    spatial moments then use a seeded uniform sample of about ``_MOMENT_PATCHES`` of its patches per call of the
    conv in a forward pass, rounded up per batch; ``None``: all)."""

    samples: int | None = None
    channel: torch.Tensor | None = None
    spatial: torch.Tensor | None = None
    pixels: int = 0
    patches: int = 0
    gen: torch.Generator | None = None

    def result(self) -> InputCovariance:
        # on the CPU, where the decomposition runs
        return InputCovariance((self.channel / max(self.pixels, 1)).cpu(), (self.spatial / max(self.patches, 1)).cpu(),
                               self.patches)


_UNFOLD_BYTES = 1 << 28  # bound on one buffer of patches (256 MiB)
_OBSERVE_BYTES = 1 << 21  # input bytes per forward of the observation pass (3 images of 3×224²)
_MOMENT_PATCHES = 1 << 16  # patches per layer (over the whole calibration set) for the spatial moments, about


def _out_size(size: int, k: int, stride: int, dilation: int) -> int:
    return (size - dilation * (k - 1) - 1) // stride + 1


def _pixel_coords(idx: torch.Tensor, out_w: int, out_hw: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat output-pixel indices ``(sample, row, column)`` (``out_hw`` pixels per sample, rows ``out_w`` wide) →
    sample, row and column."""
    bi, rest = idx // out_hw, idx % out_hw
    return bi, rest // out_w, rest % out_w


def _gather_patches(h: torch.Tensor, bi: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, kernel_size, stride,
                    dilation) -> torch.Tensor:
    """The patches a conv (no padding: ``h (B, C, H, W)`` is already padded) reads at the output pixels
    ``(bi, oy, ox)`` (:func:`_pixel_coords`), as ``(n, C·P)``, channel-major:
    ``u[i, c·P + (i_k·kw + j_k)] = h[b_i, c, oy_i·sy + i_k·dy, ox_i·sx + j_k·dx]``."""
    (kh, kw), (sy, sx), (dy, dx) = kernel_size, stride, dilation
    rows = (oy * sy)[:, None] + torch.arange(kh, device=h.device).repeat_interleave(kw)[None] * dy  # (n, P)
    cols = (ox * sx)[:, None] + torch.arange(kw, device=h.device).repeat(kh)[None] * dx
    u = h.permute(0, 2, 3, 1)[bi[:, None], rows, cols]  # (n, P, C): channels-last rows, contiguous reads
    return u.transpose(1, 2).reshape(len(bi), -1)  # (n, C·P)


def _accumulate(conv: nn.Conv2d, x: torch.Tensor, acc: _Moments) -> None:
    """Add the channel and patch second moments of ``x (B, M, H, W)``, the input of ``conv``, to ``acc``.

    The channel moments use every pixel. The patch moments use every patch, or, when the calibration set has more
    than ``_MOMENT_PATCHES`` patches in all (``acc.samples`` given), a seeded uniform sample of that many, scaled to
    the full count (an ``M×P×P`` statistic needs no more; unfolding every patch cost seconds per layer at 224²)."""
    x = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    b, m = x.shape[:2]
    kh, kw = conv.kernel_size
    p = kh * kw
    xb = x.reshape(b, m, -1)  # (B, M, H·W)
    channel = torch.bmm(xb, xb.transpose(1, 2)).sum(0).double()  # Σ over pixels of x xᵀ, no transposed copy
    # the patches exactly as the conv reads them: its own padding (any mode, 'same' included), stride, dilation
    pad = tuple(conv._reversed_padding_repeated_twice)
    if any(pad):
        x = F.pad(x, pad, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
    ho = _out_size(x.shape[2], kh, conv.stride[0], conv.dilation[0])
    wo = _out_size(x.shape[3], kw, conv.stride[1], conv.dilation[1])
    total = b * ho * wo
    keep = total if acc.samples is None else min(total, -(-_MOMENT_PATCHES * total // max(acc.samples * ho * wo, 1)))
    if keep < total:  # (M, P, P) from a sample of the patches, scaled to all of them
        if acc.gen is None:
            acc.gen = torch.Generator().manual_seed(0)
        idx = torch.randperm(total, generator=acc.gen)[:keep].to(x.device)
        spatial = torch.zeros(m, p, p, dtype=torch.float64, device=x.device)
        for part in idx.split(max(1, _UNFOLD_BYTES // (m * p * x.element_size()))):
            u = _gather_patches(x, *_pixel_coords(part, wo, ho * wo), conv.kernel_size, conv.stride,
                                conv.dilation)  # (n, M·P)
            u = u.view(len(part), m, p).permute(1, 2, 0)  # (M, P, n)
            spatial += torch.bmm(u, u.transpose(1, 2)).double()
        spatial *= total / keep
    else:
        spatial = torch.zeros(m, p, p, dtype=torch.float64, device=x.device)
        per_sample = max(1, x[0].numel() * p * x.element_size())
        for chunk in x.split(max(1, _UNFOLD_BYTES // per_sample)):
            u = F.unfold(chunk, (kh, kw), dilation=conv.dilation, stride=conv.stride)  # (b, M·P, L)
            u = u.view(len(chunk), m, p, -1).permute(1, 2, 0, 3).reshape(m, p, -1)  # (M, P, b·L)
            spatial += torch.bmm(u, u.transpose(1, 2)).double()  # (M, P, P)
    if acc.channel is None:
        acc.channel, acc.spatial = channel, spatial
    else:
        acc.channel += channel
        acc.spatial += spatial
    acc.pixels += b * xb.shape[2]
    acc.patches += total


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


def observe(
    model: nn.Module, layers: dict[str, str], batches: list[torch.Tensor], *, memory_gb: float = 4.0,
    moments: bool = True,
) -> Observation:
    """Run ``model`` (the original) over ``batches`` once, measuring every conv in ``layers``.

    Args:
        model: the unconverted model (run in eval mode, never changed).
        layers: conv name → name of the module whose output the replacement must reproduce (the conv itself, or the
            BatchNorm folded into it).
        batches: calibration inputs, see :func:`as_batches`.
        memory_gb: bound on the kept outputs; exceeded → :class:`SeparifyError` saying how many samples fit.
        moments: measure the input moments (``False``: only keep the outputs; ``covariances`` is then empty).

    Returns:
        :class:`Observation` with one :class:`~separify.decompose.InputCovariance` and one output tensor per layer.
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
                # on a CPU, a few samples per forward: large batches of large images ran 1.5–2× slower
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


def _pixels(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B·H·W, C)``."""
    return t.detach().permute(0, 2, 3, 1).reshape(-1, t.shape[1]).to(dtype)


PIXELS_PER_INPUT = 32  # fewer calibration pixels than this per input of a 1×1 conv (its C channels and bias): scarce
_RIDGES = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # relative ridges tried by cross-validation on scarce data


def scarce_note(pixels: int, inputs: int) -> str:
    """How scarce: the words the layer notes use."""
    return (f"scarce calibration data ({pixels:,} pixels; {PIXELS_PER_INPUT * (inputs + 1):,} wanted for the "
            f"{inputs:,} input channels of the last 1×1 conv)")


def scarce(pixels: int, inputs: int) -> bool:
    """Whether ``pixels`` calibration pixels are too few to fit a 1×1 conv with ``inputs`` input channels (and a
    bias) by plain least squares: fewer than 32 per weight of one output channel. With fewer pixels than weights the
    fit is underdetermined and reproduces the calibration data exactly while its error on other inputs grows
    without bound (measured: a ResNet-18 calibrated on 8 images at 64² gave outputs of 1e26)."""
    return pixels < PIXELS_PER_INPUT * (inputs + 1)


class PointwiseRefit:
    """Streaming least-squares refit of a 1×1 conv ``last`` so that ``last(z) ≈ y`` (see the module docstring).

    :meth:`add` takes batches of its input ``z (B, C, H, W)`` and the wanted output ``y (B, N, H, W)`` and keeps only
    ``(C+1)²`` and ``N·(C+1)`` float64 sums, so the data can be streamed (the ONNX pass feeds it from onnxruntime);
    :meth:`apply` solves and writes the new weights into ``last``.

    The sums are kept in two folds, even and odd samples in the order given. Where the data is :func:`scarce` for
    this conv, the ridge is chosen by 2-fold cross-validation (fit on one fold, error on the other, both ways)
    among relative ridges 1e-6 … 10 (and ``ridge``) and "no change" (keep the current factors); otherwise it is
    ``ridge``.
    """

    def __init__(self, last: nn.Conv2d, name: str, *, ridge: float = 1e-6) -> None:
        self.last, self.name, self.ridge = last, name, ridge
        self.has_bias = last.bias is not None
        self.c = last.in_channels
        dim = self.c + int(self.has_bias)
        dev = last.weight.device
        w = last.weight.detach().reshape(last.out_channels, self.c).to(dtype=torch.float64)
        self.old = torch.cat([w, last.bias.detach().to(dtype=torch.float64)[:, None]], 1) if self.has_bias else w
        z = dict(dtype=torch.float64, device=dev)
        self.grams = [torch.zeros(dim, dim, **z) for _ in range(2)]  # per fold: Σ ž žᵀ
        self.resids = [torch.zeros(last.out_channels, dim, **z) for _ in range(2)]  # per fold: Σ e žᵀ
        self.e2s = [0.0, 0.0]  # per fold: Σ ‖e‖²
        self.counts = [0, 0]  # per fold: pixels
        self.y2 = 0.0
        self.samples = 0  # samples seen so far: the fold of the next one is its parity

    @property
    def pixels(self) -> int:
        return sum(self.counts)

    def add(self, z_all: torch.Tensor, y_all: torch.Tensor) -> None:
        if z_all.shape[0] != y_all.shape[0] or z_all.shape[2:] != y_all.shape[2:]:
            raise SeparifyError(f"layer {self.name}: the converted layer's shape {tuple(z_all.shape[2:])} does not "
                                f"match the original output {tuple(y_all.shape[2:])}")
        # Accumulate the residual of the current weights, E = Y − P₀Ž, rather than Y itself: the correction
        # Δ = R (G + λI)⁻¹ with R = Σ e žᵀ is then computed to full precision even when P₀ is already (nearly) exact.
        # Products and per-chunk sums run in the model's precision (float32 unless the model is float64), the running
        # sums in float64.
        work = torch.float64 if z_all.dtype == torch.float64 else torch.float32
        dev = self.old.device
        old = self.old.to(work)
        step = max(1, (1 << 24) // max(1, z_all[0].numel()))  # bound the pixel matrices
        for i in range(0, len(z_all), step):
            end = min(i + step, len(z_all))
            for fold in (0, 1):
                first = i + (fold - self.samples - i) % 2  # the first sample of this chunk in this fold
                if first >= end:
                    continue
                z = _pixels(z_all[first:end:2].to(dev), work)  # (b·H·W, C)
                y = _pixels(y_all[first:end:2].to(dev), work)  # (b·H·W, N)
                if self.has_bias:
                    z = torch.cat([z, z.new_ones(z.shape[0], 1)], 1)
                e = y - z @ old.T
                self.grams[fold] += (z.T @ z).double()
                self.resids[fold] += (e.T @ z).double()
                self.y2 += float(y.square().sum())  # in the data's precision: a pairwise sum
                self.e2s[fold] += float(e.square().sum())
                self.counts[fold] += y.shape[0]
        self.samples += len(z_all)

    def _cross_validate(self) -> float | None:
        """The relative ridge with the least held-out error summed over both folds, or ``None`` where keeping the
        current factors (no refit) does best. For each fold ``f`` and ridge ``λ``, ``Δ_f = R_f (G_f + λI)⁻¹``
        (a Cholesky solve) and its error on the other fold ``g``,
        ``‖E_g‖² − 2 tr(Δ_f R_gᵀ) + tr(Δ_f G_g Δ_fᵀ)``, come from the statistics alone."""
        ridges = sorted({r for r in (self.ridge, *_RIDGES) if r > 0})  # the configured ridge is a candidate too
        totals = [0.0] * len(ridges)
        for f, g in ((0, 1), (1, 0)):
            gram = self.grams[f]
            scale = float(gram.diagonal().mean().clamp_min(1e-30))
            eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
            for i, rel in enumerate(ridges):
                delta = _spd_solve(gram + rel * scale * eye, self.resids[f].T).T  # (N, D)
                totals[i] += (self.e2s[g] - 2 * float((delta * self.resids[g]).sum())
                              + float(((delta @ self.grams[g]) * delta).sum()))
        keep = self.e2s[0] + self.e2s[1]  # Δ = 0 on both held-out folds
        best = min(range(len(ridges)), key=lambda i: totals[i])
        return ridges[best] if totals[best] < keep else None

    def apply(self) -> LayerFit:
        """Solve, write the refitted weights into the conv, and return the errors before and after."""
        last, c = self.last, self.c
        gram, resid, e2 = self.grams[0] + self.grams[1], self.resids[0] + self.resids[1], sum(self.e2s)
        before = (e2 / max(self.y2, 1e-300)) ** 0.5
        ridge, note, scale = self.ridge, None, float(gram.diagonal().mean().clamp_min(1e-30))
        if scarce(self.pixels, c):
            what = scarce_note(self.pixels, c)
            if before <= 1e-6:
                ridge, note = None, f"{what}: no refit (the layer already reproduces its data)"
            elif min(self.counts) == 0:
                ridge, note = None, f"{what}, one sample: no refit"
            else:
                ridge = self._cross_validate()
                note = (f"{what}: no refit (cross-validation kept the factors)" if ridge is None else
                        f"{what}: refit with ridge {ridge:g}, chosen by 2-fold cross-validation")
                scale /= 2  # relative to one fold's Gram, as it was validated (G is the sum of both)
        if ridge is None:
            return LayerFit(self.name, before, before, self.pixels, note)
        lam = ridge * scale
        # ridge on Δ: directions the data never excites keep their current weights
        eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
        delta = _spd_solve(gram + lam * eye, resid.T).T
        # ‖E − ΔŽ‖² = ‖E‖² − 2 tr(Δ Rᵀ) + tr(Δ G Δᵀ), from the accumulated statistics
        sq = e2 - 2 * float((delta * resid).sum()) + float(((delta @ gram) * delta).sum())
        after = (max(sq, 0.0) / max(self.y2, 1e-300)) ** 0.5
        new = self.old + delta
        if not after <= before:  # numerical trouble: keep the current factors
            new, after = self.old, before
        with torch.no_grad():
            last.weight.copy_(new[:, :c].reshape_as(last.weight).to(last.weight.dtype))
            if self.has_bias:
                last.bias.copy_(new[:, c].to(last.bias.dtype))
        return LayerFit(self.name, before, after, self.pixels, note)


def _solve(last: nn.Conv2d, z_all: torch.Tensor, y_all: torch.Tensor, ridge: float, name: str) -> LayerFit:
    """Least-squares refit of ``last`` (a 1×1 conv) so that ``last(z) ≈ y``, on all of the data at once."""
    fit = PointwiseRefit(last, name, ridge=ridge)
    fit.add(z_all, y_all)
    return fit.apply()


def _reconstruct(module: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float, batch_size: int,
                 seed: int) -> None:
    """Layer-wise reconstruction: ``steps`` Adam steps on all of ``module``'s parameters (every factor, not only the
    last 1×1 conv), minimising ``‖module(x) − y‖² / ‖y‖²`` over random minibatches of the calibration samples. A
    non-finite loss restores the parameters as they were."""
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


def _last_input(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of ``module``'s last 1×1 conv when ``module`` runs on ``x``."""
    seen: list[torch.Tensor] = []
    handle = module._last().register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            module(x)
    finally:
        handle.remove()
    return seen[0]


def refit_pointwise(
    converted: nn.Module,
    layers: Iterable[str],
    outputs: dict[str, torch.Tensor],
    inputs: torch.Tensor,
    *,
    ridge: float = 1e-6,
    steps: int = 0,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    als: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[LayerFit]:
    """Refit the last 1×1 conv of each replacement to the original outputs, in one forward pass (module docstring).

    With ``steps > 0``, each replacement is then also *reconstructed*: ``steps`` Adam steps (learning rate ``lr``,
    minibatches of ``batch_size`` samples) on all of its factors against the same targets, on the inputs the
    converted model really gives it, followed by a final least-squares refit of its last 1×1 conv. This costs
    ``steps`` forward/backward passes of each layer but recovers far more than the refit alone where the rank is
    very low (e.g. dw-pw at K = 1).

    With ``als > 0``, each replacement's depthwise conv and last 1×1 conv are first fitted jointly to the original
    outputs by up to ``als`` iterations of alternating least squares (:func:`als_dw_pw`; for pw-dw-pw on the output
    of its first 1×1 conv, which stays fixed), before any reconstruction steps and the final refit.

    Args:
        converted: the converted model; its replacements' factors are overwritten.
        layers: names (in ``converted``) of the replacements to refit.
        outputs: per name, the original target's outputs on ``inputs`` (:attr:`Observation.outputs`).
        inputs: all calibration samples, ``(n, ...)``; run as one batch.
        ridge: relative weight of the pull towards the current factors (times the mean diagonal of ``G``).

    Returns:
        One :class:`LayerFit` per layer, in the order the forward pass reached them (errors before anything and
        after the last step).
    """
    fits: list[LayerFit] = []
    entered: set[str] = set()
    done: set[str] = set()
    busy: set[str] = set()
    first_error: dict[str, float] = {}  # error before anything, for layers reconstructed before their refit
    notes: dict[str, str] = {}

    def enter_hook(name):  # on the replacement, before it runs: progress, and the reconstruction if asked for
        def hook(mod, args):
            if name in entered:
                return
            entered.add(name)
            if progress is not None:
                progress(name)
            y = outputs[name]  # (n, N, H, W)
            pixels, inputs = y.shape[0] * y[0, 0].numel(), mod._last().in_channels
            skip = als_skip_reason(mod.conv_dw, pixels=pixels, inputs=inputs) if als > 0 else None
            layer_als = 0 if skip else als
            layer_steps = steps
            if steps > 0 and scarce(pixels, inputs):  # Adam on every factor would overfit the few samples more
                layer_steps = 0
                skip = "; ".join(filter(None, (skip, f"no reconstruction: {scarce_note(pixels, inputs)}")))
            if skip:
                notes[name] = skip
            if layer_steps > 0 or layer_als > 0:
                x = args[0]
                busy.add(name)  # the calls below run the replacement; its refit hook must wait for the real one
                try:
                    if layer_als > 0:  # starts with its own pointwise step: no refit first; the error before it
                        # is measured on the pixels it samples
                        h = mod.conv_pw_in(x) if hasattr(mod, "conv_pw_in") else x  # dw input (n, C, H, W)
                        first_error[name] = als_dw_pw(mod.conv_dw, mod._last(), h, y, iters=layer_als, ridge=ridge,
                                                      seed=seed)[0]
                    else:  # the reconstruction starts from the refitted layer
                        first_error[name] = _solve(mod._last(), _last_input(mod, x), y, ridge, name).error_before
                    if layer_steps > 0:
                        _reconstruct(mod, x, y, steps=layer_steps, lr=lr, batch_size=batch_size, seed=seed)
                finally:
                    busy.discard(name)

        return hook

    def refit_hook(name):  # on its last 1×1 conv: least squares on the input that conv really gets
        def hook(mod, args):
            if name in done or name in busy:
                return
            done.add(name)
            fit = _solve(mod, args[0], outputs[name], ridge, name)
            if name in first_error or name in notes:
                note = "; ".join(n for n in (notes.get(name), fit.note) if n) or None
                fit = LayerFit(name, first_error.get(name, fit.error_before), fit.error_after, fit.pixels, note)
            fits.append(fit)

        return hook

    handles = []
    names = list(layers)
    # the refit hooks the last 1×1 conv as a module, which only the default layout calls (the others compute the
    # same function from the same weights), so the replacements run in their default layout meanwhile
    layouts = {name: converted.get_submodule(name).layout for name in names}
    try:
        for name in names:
            replacement = converted.get_submodule(name).set_layout(type(converted.get_submodule(name)).LAYOUTS[0])
            handles.append(replacement.register_forward_pre_hook(enter_hook(name)))
            handles.append(replacement._last().register_forward_pre_hook(refit_hook(name)))
        with torch.no_grad(), frozen_mode(converted), reuse_freed_memory():
            converted(inputs)
    finally:
        for h in handles:
            h.remove()
        for name, layout in layouts.items():
            converted.get_submodule(name).set_layout(layout)
    missing = [n for n in names if n not in done]
    if missing:
        raise SeparifyError(f"the calibration data never reaches layer(s) {', '.join(missing[:3])}")
    return fits


# ---------------------------------------------------------------------------------------------------------------
# Alternating least squares on the depthwise + last 1×1 part of a replacement


_ALS_PIXELS = (1024, 4096)  # pixels sampled per layer for the ALS statistics: at least, at most
_ALS_GRAM = 1 << 34  # and no more than this many multiply-adds for their Gram (pixels·(C·P)²) above the least
_ALS_MAX_CP = 8192  # larger depthwise convs (C·P > this: a (C·P)² Gram over 512 MiB) get the refit only


def als_runs(depthwise_values: int) -> bool:
    """Whether the alternating least squares runs for a depthwise conv that reads ``depthwise_values`` (``C·P``)
    values per output pixel."""
    return depthwise_values <= _ALS_MAX_CP


def als_skip_reason(dw: nn.Conv2d, *, pixels: int | None = None, inputs: int | None = None) -> str | None:
    """Why the alternating least squares is not run for the depthwise conv ``dw`` (``None``: it is): its ``(C·P)²``
    patch Gram would exceed the bound, or the layer's ``pixels`` calibration pixels are :func:`scarce` for the
    ``inputs`` channels of its last 1×1 conv (the ALS fits that conv with a fixed, tiny ridge)."""
    size = dw.in_channels * dw.kernel_size[0] * dw.kernel_size[1]
    if not als_runs(size):
        return f"no ALS: its depthwise conv reads {size:,} values per pixel (> {_ALS_MAX_CP:,})"
    if pixels is not None and inputs is not None and scarce(pixels, inputs):
        return f"no ALS: {scarce_note(pixels, inputs)}"
    return None


def _gram(u: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """``uᵀu`` for ``u (n, d)``: for wide ``u``, only the blocks on and above the diagonal of a ``blocks × blocks``
    partition are multiplied (``(blocks+1)/(2·blocks)`` of the multiply-adds, 5/8 at 4) and mirrored."""
    d = u.shape[1]
    if d < 1024:
        return u.T @ u
    out = u.new_empty(d, d)
    edges = [d * i // blocks for i in range(blocks + 1)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        row = u[:, lo:hi].T @ u[:, lo:]  # (hi − lo, d − lo): block row from the diagonal on
        out[lo:hi, lo:] = row
        out[hi:, lo:hi] = row[:, hi - lo :].T
    return out


class PatchStatistics:
    """Sufficient statistics of ``y ≈ pw(dw(h))`` over a seeded sample of the output pixels ``i``, streamed.

    ``u_i`` is the patch vector ``(C·P)`` that ``dw`` reads at pixel ``i`` (its own padding, any mode, stride,
    dilation; ``P = kh·kw``, ordered channel-major) and ``y_i (N)`` the wanted output there. Kept, in float64:
    ``S = Σ uuᵀ (C·P, C·P)``, ``Yu = Σ y uᵀ (N, C·P)``, ``us = Σ u``, ``ys = Σ y``, ``yy = Σ ‖y‖²`` and the count
    ``n``. :meth:`add` takes batches ``h (B, C, H, W)``, ``y (B, N, H', W')`` in order; of the ``total`` pixels
    (``samples × H'·W'``, all batches together) a uniform sample of ``max_pixels`` (seeded) is used.
    """

    def __init__(self, dw: nn.Conv2d, out_channels: int, total: int, *, max_pixels: int | None = None,
                 seed: int = 0, device=None) -> None:
        self.dw = dw
        kh, kw = dw.kernel_size
        self.cp = cp = dw.in_channels * kh * kw
        if max_pixels is None:  # 4,096 pixels, fewer (down to 1,024) where C·P is large: the Gram costs n·(C·P)²
            max_pixels = max(_ALS_PIXELS[0], min(_ALS_PIXELS[1], _ALS_GRAM // cp**2))
        self.keep = None
        if total > max_pixels:  # sorted, so that each batch takes its own
            gen = torch.Generator().manual_seed(seed)
            self.keep = torch.randperm(total, generator=gen)[:max_pixels].sort().values.to(device)
        self.offset = 0
        z = dict(dtype=torch.float64, device=device)
        self.S, self.Yu = torch.zeros(cp, cp, **z), torch.zeros(out_channels, cp, **z)
        self.us, self.ys = torch.zeros(cp, **z), torch.zeros(out_channels, **z)
        self.yy, self.n = 0.0, 0
        self.dtype = torch.float32  # the precision of the data (float64 once any batch was float64)
        self._s_work: torch.Tensor | None = None  # S in that precision, made on first use after the last add

    def add(self, h: torch.Tensor, y: torch.Tensor) -> None:
        dw = self.dw
        work = torch.float64 if h.dtype == torch.float64 else torch.float32
        if work == torch.float64:
            self.dtype = work
        h = h.detach().to(device=self.S.device, dtype=work)
        if any(dw._reversed_padding_repeated_twice):
            h = F.pad(h, tuple(dw._reversed_padding_repeated_twice),
                      mode="constant" if dw.padding_mode == "zeros" else dw.padding_mode)
        y = y.detach()
        b, _, ho, wo = y.shape
        (sy, sx), (dy, dx), (kh, kw) = dw.stride, dw.dilation, dw.kernel_size
        if _out_size(h.shape[2], kh, sy, dy) != ho or _out_size(h.shape[3], kw, sx, dx) != wo:
            raise SeparifyError(f"the depthwise conv's input {tuple(h.shape[2:])} does not give the original output "
                                f"size {(ho, wo)}")
        lo, self.offset = self.offset, self.offset + b * ho * wo
        idx = torch.arange(lo, self.offset, device=h.device) if self.keep is None else \
            self.keep[(self.keep >= lo) & (self.keep < self.offset)]
        idx = idx - lo  # pixels of this batch, in (sample, row, column) order as y's
        for part in idx.split(1 << 16):  # bounded gathers: (n, C·P) at most 65,536 rows
            bi, oy, ox = _pixel_coords(part, wo, ho * wo)
            u = _gather_patches(h, bi, oy, ox, dw.kernel_size, dw.stride, dw.dilation)  # (n, C·P)
            t = y[bi, :, oy, ox].to(work)  # (n, N)
            self.S += _gram(u).double()
            self.Yu += (t.T @ u).double()
            self.us += u.sum(0).double()
            self.ys += t.sum(0).double()
            self.yy += float(t.square().sum())
            self.n += len(part)
        self._s_work = None

    def s_work(self) -> torch.Tensor:
        """``S`` in the precision of the data (cached)."""
        if self._s_work is None:
            self._s_work = self.S.to(self.dtype)
        return self._s_work


def _z_statistics(st: PatchStatistics, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``z = dw(h)`` with depthwise filters ``d (C, K, P)``: the Gram of ``ž = [z; 1]`` and ``Σ y žᵀ``."""
    c, k, p = d.shape
    # in the precision of the data (S came from its products): reading S dominates, float32 halves it
    dw = d.to(st.dtype)
    t = torch.bmm(dw, st.s_work().view(c, p, c * p))  # (C, K, E·Q): Σ_p d[c,k,p] S[cp, eq], S read once, no copy
    t = t.view(c * k, c, p).transpose(0, 1)  # (E, C·K, Q)
    gzz = torch.bmm(t, dw.transpose(1, 2)).permute(1, 0, 2).reshape(c * k, c * k).to(d.dtype)  # Σ z zᵀ: [ck, el]
    zs = torch.einsum("ckp,cp->ck", d, st.us.view(c, p)).reshape(-1)  # Σ z
    yz = torch.einsum("ncp,ckp->nck", st.Yu.view(-1, c, p), d).reshape(-1, c * k)  # Σ y zᵀ
    gram = torch.cat([torch.cat([gzz, zs[:, None]], 1),
                      torch.cat([zs, zs.new_tensor([float(st.n)])])[None]], 0)
    return gram, torch.cat([yz, st.ys[:, None]], 1)


def _sq_error(st: PatchStatistics, gram: torch.Tensor, cross: torch.Tensor, w: torch.Tensor) -> float:
    """``Σ ‖y − W ž‖² = Σ‖y‖² − 2 tr(W Hᵀ) + tr(W G Wᵀ)`` from the statistics, ``W = [P b]``."""
    return max(st.yy - 2 * float((w * cross).sum()) + float(((w @ gram) * w).sum()), 0.0)


def _spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a⁻¹ b`` for a symmetric ``a`` that is positive definite up to rounding: Cholesky (half the cost of LU), LU
    where it fails."""
    chol, info = torch.linalg.cholesky_ex(a)
    return torch.cholesky_solve(b, chol) if int(info) == 0 else torch.linalg.solve(a, b)


def _pw_step(gram: torch.Tensor, cross: torch.Tensor, w: torch.Tensor, ridge: float, bias: bool) -> torch.Tensor:
    """Least-squares ``W = [P b]`` given the depthwise filters (bias column fixed at zero without a bias)."""
    if not bias:
        gram, cross, w = gram[:-1, :-1], cross[:, :-1], w[:, :-1]
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-30))
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    new = w + _spd_solve(gram + lam * eye, (cross - w @ gram).T).T
    return new if bias else torch.cat([new, new.new_zeros(len(new), 1)], 1)


def _dw_step(st: PatchStatistics, d: torch.Tensor, w: torch.Tensor, ridge: float, iters: int) -> torch.Tensor:
    """Least-squares depthwise filters ``d (C, K, P)`` given ``W = [P b]``: block-Jacobi preconditioned CG.

    The output is linear in ``d``: ``ŷ_i = Σ_{c,k} P[:, ck] (d_ckᵀ u_{c,i}) + b``, so the normal equations are
    ``Σ_{c'k'q} Q[ck, c'k'] S[cp, c'q] d[c'k'q] = Σ_n P[n, ck] (Yu[n, cp] − b_n us[cp])`` with ``Q = PᵀP``: a
    ``C·K·P`` system applied in ``O(C²·K·P·(K + P))`` without forming it; its ``K·P`` diagonal blocks (one per input
    channel) precondition it. Warm-started at the current ``d``, with the same relative ridge towards it as the
    pointwise refit; ``iters`` CG steps at most (a partial solve still lowers the error, and the next alternation
    continues from it).
    """
    c, k, p = d.shape
    pw, b = w[:, :-1], w[:, -1]
    q4 = (pw.T @ pw).view(c, k, c, k)
    rhs = torch.einsum("nck,ncp->ckp", pw.view(-1, c, k), (st.Yu - b[:, None] * st.us[None]).view(-1, c, p))
    # diagonal blocks Q[ck, ck'] ⊗ S[cp, cp'] → (C, K·P, K·P), from strided views of the diagonals
    s_diag = st.S.view(c, p, c, p).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (C, P, P)
    q_diag = q4.diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (C, K, K)
    blocks = (q_diag[:, :, None, :, None] * s_diag[:, None, :, None, :]).reshape(c, k * p, k * p)
    lam = ridge * float(blocks.diagonal(dim1=1, dim2=2).mean().clamp_min(1e-30))
    eye = torch.eye(k * p, dtype=d.dtype, device=d.device)
    # the blocks are PSD up to rounding (the statistics come from float32 products): a relative jitter, raised
    # until every block factorises, only changes the preconditioner, never the solution
    scale = blocks.diagonal(dim1=1, dim2=2).abs().amax(-1).clamp_min(1e-300)[:, None, None]  # (C, 1, 1)
    chol = None
    for jitter in (1e-6, 1e-4, 1e-2, 1.0):
        chol, info = torch.linalg.cholesky_ex(blocks + lam * eye + jitter * scale * eye)
        if not bool(info.any()):
            break
        chol = None
    # the products run in the precision of the data (float32 unless it was float64): reading S dominates
    work = st.dtype
    q_by_e = q4.permute(2, 0, 1, 3).reshape(c, c * k, k).to(work)  # (E, C·K, L): Q[ck, el] for each e
    s_rows = st.s_work().view(c, p, c * p)  # (C, P, E·Q): S[cp, eq]

    def apply(v):  # (C, K, P) → (C, K, P): (A + λI) v
        vq = torch.bmm(q_by_e, v.to(work))  # (E, C·K, Q): Σ_l Q[ck, el] v[e, l, q]
        vq = vq.view(c, c, k, p).permute(1, 2, 0, 3).reshape(c, k, c * p)  # (C, K, E·Q)
        return torch.bmm(vq, s_rows.transpose(1, 2)).to(v.dtype) + lam * v  # Σ_eq vq[c, k, eq] S[cp, eq]

    def precondition(r):
        return r.clone() if chol is None else torch.cholesky_solve(r.reshape(c, k * p, 1), chol).view(c, k, p)

    x = d.clone()
    r = rhs + lam * d - apply(x)  # ridge pulls towards the current d
    z = precondition(r)
    direction = z.clone()
    rz = float((r * z).sum())
    norm0 = float(rhs.norm()) + 1e-300
    for _ in range(iters):
        if float(r.norm()) <= 1e-12 * norm0:
            break
        ad = apply(direction)
        denom = float((direction * ad).sum())
        if not denom > 0:
            break
        alpha = rz / denom
        x += alpha * direction
        r -= alpha * ad
        z = precondition(r)
        rz, rz_old = float((r * z).sum()), rz
        direction = z + (rz / rz_old) * direction
    return x


def als_dw_pw(dw: nn.Conv2d, pw: nn.Conv2d, h: torch.Tensor, y: torch.Tensor, *, iters: int, ridge: float = 1e-6,
              max_pixels: int | None = None, seed: int = 0, cg_iters: int = 2, tol: float = 1e-4
              ) -> tuple[float, float]:
    """Fit a depthwise conv ``dw`` (``C → C·K``, groups ``C``, no bias) and the 1×1 conv ``pw`` after it (``C·K → N``)
    to ``pw(dw(h)) ≈ y`` by alternating least squares on the layer's *output*; returns the relative output error
    ``‖y − ŷ‖/‖y‖`` on the sampled pixels before and after.

    After a first pointwise step, each iteration solves the depthwise filters with the pointwise layer fixed
    (:func:`_dw_step`), then the pointwise layer (and bias) with the filters fixed, both in closed form from
    statistics gathered once (:class:`PatchStatistics`: the ``(C·P)²`` patch Gram of at most ``max_pixels`` sampled
    pixels; by default 4,096, down to 1,024 for layers with a large ``C·P``, to bound its cost), so an iteration
    costs no pass over the data. The error never increases (each step is a least-squares minimiser, up to the
    ridge and the rounding of the statistics); iterations stop early once it improves by at most ``tol``
    relative (``tol=0``: run all ``iters``). The filters are rescaled to unit norm after each step (the scale moves
    into ``pw``, the product is unchanged). At full rank the fit is exact.
    """
    y = y.to(h.device)
    st = PatchStatistics(dw, y.shape[1], y.shape[0] * y[0, 0].numel(), max_pixels=max_pixels, seed=seed,
                         device=h.device)
    st.add(h, y)
    return als_fit(dw, pw, st, iters=iters, ridge=ridge, cg_iters=cg_iters, tol=tol)


def als_fit(dw: nn.Conv2d, pw: nn.Conv2d, st: PatchStatistics, *, iters: int, ridge: float = 1e-6,
            cg_iters: int = 2, tol: float = 1e-4) -> tuple[float, float]:
    """:func:`als_dw_pw` from statistics already gathered (streamed by the caller, as the ONNX pass does)."""
    c = dw.in_channels
    k = dw.out_channels // c
    dtype = torch.float64
    d = dw.weight.detach().to(dtype).reshape(c, k, -1)  # (C·K, 1, kh, kw) → (C, K, P), channel c·K + k
    bias = pw.bias is not None
    w = pw.weight.detach().to(dtype).reshape(pw.out_channels, -1)
    w = torch.cat([w, pw.bias.detach().to(dtype)[:, None] if bias else w.new_zeros(len(w), 1)], 1)  # [P b]
    yy = max(st.yy, 1e-300)
    gram, cross = _z_statistics(st, d)
    before = best = _sq_error(st, gram, cross, w)
    best_d, best_w = d, w
    w = _pw_step(gram, cross, w, ridge, bias)  # start from the output-optimal pointwise layer for these filters
    err = _sq_error(st, gram, cross, w)
    if err <= best:
        best, best_w = err, w
    w = best_w
    for _ in range(iters):
        d = _dw_step(st, d, w, ridge, cg_iters)
        scale = d.norm(dim=2, keepdim=True).clamp_min(1e-30)  # (C, K, 1)
        d = d / scale
        w = torch.cat([w[:, :-1] * scale.reshape(1, -1), w[:, -1:]], 1)
        gram, cross = _z_statistics(st, d)
        w = _pw_step(gram, cross, w, ridge, bias)
        err = _sq_error(st, gram, cross, w)
        if not err <= best + 1e-12 * yy:  # worse beyond rounding (or NaN): keep the best factors
            break
        done = tol > 0 and best - err <= tol * best
        best, best_d, best_w = min(err, best), d, w  # a step within rounding of the best is taken
        if done:
            break
    with torch.no_grad():
        dw.weight.copy_(best_d.reshape_as(dw.weight).to(dw.weight.dtype))
        pw.weight.copy_(best_w[:, :-1].reshape_as(pw.weight).to(pw.weight.dtype))
        if bias:
            pw.bias.copy_(best_w[:, -1].to(pw.bias.dtype))
    return (before / yy) ** 0.5, (best / yy) ** 0.5
