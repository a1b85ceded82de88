"""Least-squares refit of a 1×1 conv to wanted outputs, and the rule for when calibration data is too scarce for it.

For a 1×1 conv ``P (N, C)`` with bias ``b``, input ``z (B, C, H, W)`` and wanted output ``y (B, N, H, W)``, the
output-optimal weights over all pixels ``i`` are::

    min_{P, b}  Σ_i ‖y_i − P z_i − b‖²   ⇒   [P b] = H G⁻¹,   G = Σ_i ž_i ž_iᵀ,   H = Σ_i y_i ž_iᵀ,   ž = [z; 1]

solved as a correction ``Δ = R (G + λI)⁻¹`` of the current weights ``W₀ = [P₀ b₀]`` with ``R = Σ_i e_i ž_iᵀ``,
``e = y − W₀ ž``: the ridge ``λ‖Δ‖²`` pulls towards the current factors, so directions the data does not excite
keep their values. At full rank the refit reproduces the original layer exactly.

Scarce data: with fewer calibration pixels than the conv has weights per output channel, the plain least-squares
fit reproduces the data and fails elsewhere. Below :data:`PIXELS_PER_INPUT` pixels per input (:func:`scarce`) the
ridge is chosen by 2-fold cross-validation over even and odd samples (:class:`PointwiseRefit`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from separify.calibration.linalg import spd_solve, sq_norm
from separify.errors import SeparifyError

__all__ = ["LayerFit", "PIXELS_PER_INPUT", "PointwiseRefit", "scarce", "scarce_note", "solve"]

PIXELS_PER_INPUT = 32  # fewer calibration pixels than this per input of a 1×1 conv (its C channels and bias): scarce
_RIDGES = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # relative ridges tried by cross-validation on scarce data


@dataclass(frozen=True)
class LayerFit:
    """Relative output error ``‖y − ŷ‖ / ‖y‖`` of one layer on the calibration data, before and after the refit;
    ``scarce``: its ``pixels`` were :func:`scarce` for the inputs of the conv refitted (``note`` says what was done)."""

    name: str
    error_before: float
    error_after: float
    pixels: int
    note: str | None = None
    scarce: bool = False


def scarce_note(pixels: int, inputs: int) -> str:
    """How scarce: the words the layer notes use."""
    return (f"scarce calibration data ({pixels:,} pixels; {PIXELS_PER_INPUT * (inputs + 1):,} wanted for the "
            f"{inputs:,} input channels of the last 1×1 conv)")


def scarce(pixels: int, inputs: int) -> bool:
    """Whether ``pixels`` calibration pixels are too few to fit a 1×1 conv with ``inputs`` input channels (and a
    bias) by plain least squares: ``pixels < PIXELS_PER_INPUT · (inputs + 1)``. With fewer pixels than weights the
    fit is underdetermined and reproduces the calibration data exactly while its error on other inputs is
    unbounded."""
    return pixels < PIXELS_PER_INPUT * (inputs + 1)


def _pixels(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B·H·W, C)``."""
    return t.detach().permute(0, 2, 3, 1).reshape(-1, t.shape[1]).to(dtype)


class PointwiseRefit:
    """Streaming least-squares refit of a 1×1 conv ``last`` so that ``last(z) ≈ y`` (see the module docstring).

    :meth:`add` takes batches of its input ``z (B, C, H, W)`` and the wanted output ``y (B, N, H, W)`` and keeps only
    ``(D, D)`` and ``(N, D)`` float64 sums, ``D = C + 1`` with a bias (``C`` without), so the data can be streamed
    (the ONNX pass feeds it from onnxruntime); :meth:`apply` solves and writes the new weights into ``last``.

    The sums are kept in two folds, even and odd samples in the order given. Where the data is :func:`scarce` for
    this conv, the ridge is chosen by 2-fold cross-validation (fit on one fold, error on the other, both ways)
    among relative ridges 1e-6 … 10 (and ``ridge``) and "no change" (keep the current factors); otherwise it is
    ``ridge`` (relative: times the mean diagonal of ``G``).
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
        """Add the statistics of ``z_all (B, C, H, W)`` and ``y_all (B, N, H, W)``; sample ``j`` of the stream goes
        to fold ``j mod 2``."""
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
        # bound the pixel matrices (16 MiB of float32 each): small temporaries are reused, large ones are fresh
        # pages to fault in
        step = max(1, (1 << 22) // max(1, z_all[0].numel(), y_all[0].numel()))
        for i in range(0, len(z_all), step):
            end = min(i + step, len(z_all))
            for fold in (0, 1):
                first = i + (fold - self.samples - i) % 2  # the first sample of this chunk in this fold
                if first >= end:
                    continue
                z = _pixels(z_all[first:end:2].to(dev), work)  # (b·H·W, C)
                y = _pixels(y_all[first:end:2].to(dev), work)  # (b·H·W, N)
                if self.has_bias:
                    z = torch.cat([z, z.new_ones(z.shape[0], 1)], 1)  # (b·H·W, D): ž = [z; 1]
                e = y - z @ old.T  # (b·H·W, N)
                self.grams[fold] += (z.T @ z).double()
                self.resids[fold] += (e.T @ z).double()
                self.y2 += sq_norm(y)  # in the data's precision: a blocked sum
                self.e2s[fold] += sq_norm(e)
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
                delta = spd_solve(gram + rel * scale * eye, self.resids[f].T).T  # (N, D)
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
        few = scarce(self.pixels, c)
        if ridge is None:
            return LayerFit(self.name, before, before, self.pixels, note, few)
        lam = ridge * scale
        # ridge on Δ: directions the data never excites keep their current weights
        eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
        delta = spd_solve(gram + lam * eye, resid.T).T  # (N, D)
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
        return LayerFit(self.name, before, after, self.pixels, note, few)


def solve(last: nn.Conv2d, zs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], ridge: float,
          name: str) -> LayerFit:
    """Least-squares refit of ``last`` (a 1×1 conv) so that ``last(z) ≈ y``, over every pair of ``zs``/``ys`` (one
    per group of samples of one shape)."""
    fit = PointwiseRefit(last, name, ridge=ridge)
    for z, y in zip(zs, ys):
        fit.add(z, y)
    return fit.apply()
