"""Rank selection: fixed rank, energy threshold, or a global FLOPs target allocated across layers.

**Global FLOPs target.** Every layer ``i`` offers options ``(F_i(r), E_i(r))``: the FLOPs of its replacement at rank
``r`` (affine in ``r``, counted by ``FlopCounterMode``) and the squared relative kernel error ``E = ‖W − Ŵ‖²/‖W‖²``,
plus the option of staying dense ``(F_i^dense, 0)``. We minimise ``Σ_i E_i`` subject to ``Σ_i F_i ≤ budget``. This is
a multiple-choice knapsack; the greedy rule used here starts every layer at its cheapest option and repeatedly takes
the upgrade with the largest error decrease per FLOP added (along each layer's lower convex hull of options), while
it fits in the budget. For convex error curves, which per-channel SVD tails are, this is the classic optimal
marginal-allocation rule (Fox 1966): at the end every layer trades error for FLOPs at the same rate. Relative (not
absolute) error is used so that layers with larger weights (e.g. after BatchNorm folding) do not dominate, and the
squared error adds up across layers like independent noise added to the network.

**Error curves.** dw-pw: exact, from the per-channel singular values. pw-dw-pw: running ALS at every candidate rank
of every layer would cost far more than the conversion, so the allocation uses the error that the closed-form
starts of :func:`separify.decompose.cp_decompose` guarantee (ALS only lowers it); the fit actually reached is
measured and reported after the conversion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import decompose as dec

__all__ = ["LayerCost", "error_curve", "rank_for_energy", "allocate", "Allocation"]


def _tail_fraction(spectra: torch.Tensor, total: float) -> np.ndarray:
    """``tail[k]`` = energy beyond the first ``k`` terms of every row of ``spectra``, over ``total``; k = 0..q."""
    per_term = (spectra**2).sum(0).numpy()  # (q,)
    kept = np.concatenate([[0.0], np.cumsum(per_term)])
    return np.clip(1.0 - kept / total, 0.0, 1.0)


def error_curve(method: str, weight: torch.Tensor, ranks: np.ndarray) -> np.ndarray:
    """Relative kernel error at each rank in ``ranks`` (exact for dw-pw, a guaranteed upper bound for pw-dw-pw)."""
    w = weight.detach().to(torch.float64).cpu()
    n, m, kh, kw = w.shape
    p = kh * kw
    total = float((w**2).sum())
    ranks = np.asarray(ranks, dtype=np.int64)
    if total == 0.0:
        return np.zeros(len(ranks))
    if method == "dw-pw":
        tail = _tail_fraction(dec.dwpw_spectra(w), total)
        return np.sqrt(tail[np.minimum(ranks, len(tail) - 1)])
    t = w.reshape(n, m, p).float()  # a planning estimate: float32 spectra are ample and several times faster
    best = np.ones(len(ranks))
    # (rows of the construction, spectra of its slices): per input channel, per output channel, per spatial tap
    for count, slices in (
        (m, t.permute(1, 0, 2)),  # (M, N, P)
        (n, t),  # (N, M, P)
        (p, t.permute(2, 0, 1)),  # (P, N, M)
    ):
        tail = _tail_fraction(torch.linalg.svdvals(slices).double(), total)
        k = np.minimum(ranks // count, len(tail) - 1)
        best = np.minimum(best, tail[k])
    return np.sqrt(best)


def rank_for_energy(method: str, weight: torch.Tensor, energy: float) -> int:
    """Smallest rank keeping ``energy`` of ``‖W‖²`` (pw-dw-pw: the necessary rank from the unfoldings)."""
    if method == "dw-pw":
        return dec.dwpw_rank_for_energy(dec.dwpw_spectra(weight), energy)
    return dec.cp_rank_for_energy(weight, energy)


@dataclass(frozen=True)
class LayerCost:
    """What the allocator needs of one layer.

    Attributes:
        name: qualified module name.
        dense_flops: FLOPs of the original conv on the example input.
        flops_at: ``(a, b)`` with replacement FLOPs ``a + b·rank``.
        max_rank: largest rank worth considering (the exact rank).
        errors: relative error at a vector of ranks.
    """

    name: str
    dense_flops: int
    flops_at: tuple[int, int]
    max_rank: int
    errors: Callable[[np.ndarray], np.ndarray]

    def flops(self, rank: int) -> int:
        a, b = self.flops_at
        return a + b * rank

    def saving_ranks(self) -> np.ndarray:
        """Ranks ``1..`` whose replacement costs fewer FLOPs than the dense conv (may be empty)."""
        a, b = self.flops_at
        top = self.max_rank if b <= 0 else min(self.max_rank, math.ceil((self.dense_flops - a) / b) - 1)
        return np.arange(1, max(top, 0) + 1)


@dataclass(frozen=True)
class Allocation:
    """Result of :func:`allocate`: rank per layer (``None`` = stay dense), FLOPs reached and whether it fits."""

    ranks: dict[str, int | None]
    flops: int
    budget: int
    feasible: bool


def _lower_hull(flops: np.ndarray, err2: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of points sorted by ``flops`` (error decreasing along it)."""
    hull: list[int] = []
    for i in range(len(flops)):
        if hull and err2[i] >= err2[hull[-1]]:
            continue  # costs more, no better: never worth it
        while len(hull) >= 2:
            i0, i1 = hull[-2], hull[-1]
            # drop i1 if it lies on or above the segment i0 → i
            cross = (flops[i1] - flops[i0]) * (err2[i] - err2[i0]) - (err2[i1] - err2[i0]) * (flops[i] - flops[i0])
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate(layers: list[LayerCost], budget: int) -> Allocation:
    """Choose a rank (or dense) per layer to minimise ``Σ relative error²`` with ``Σ FLOPs ≤ budget``.

    Layers with no saving rank are left dense. If even the cheapest ranks exceed the budget, every layer takes its
    cheapest rank and the allocation is marked infeasible.
    """
    options = {}  # name -> (ranks or None for dense, flops, err2) along the hull
    for layer in layers:
        ranks = layer.saving_ranks()
        if len(ranks) == 0:
            continue
        flops = np.array([layer.flops(int(r)) for r in ranks] + [layer.dense_flops], dtype=np.float64)
        err2 = np.concatenate([layer.errors(ranks) ** 2, [0.0]])
        choice = [int(r) for r in ranks] + [None]
        hull = _lower_hull(flops, err2)
        if hull[0] != 0:  # keep the cheapest rank as the starting point even if it is dominated
            hull = [0] + hull
        options[layer.name] = ([choice[i] for i in hull], flops[hull], err2[hull])

    current = {name: 0 for name in options}
    used = sum(int(opts[1][0]) for opts in options.values())
    feasible = used <= budget
    if feasible:
        steps = []
        for name, (_, flops, err2) in options.items():
            for j in range(1, len(flops)):
                gain = (err2[j - 1] - err2[j]) / max(flops[j] - flops[j - 1], 1e-9)
                steps.append((-gain, name, j))
        steps.sort()
        frozen: set[str] = set()
        for _, name, j in steps:
            if name in frozen or current[name] != j - 1:
                continue
            extra = int(options[name][1][j] - options[name][1][j - 1])
            if used + extra > budget:
                frozen.add(name)  # its later steps build on this one, so none of them can be taken either
                continue
            used += extra
            current[name] = j
    ranks: dict[str, int | None] = {layer.name: None for layer in layers}
    for name, j in current.items():
        ranks[name] = options[name][0][j]
    return Allocation(ranks, used, budget, feasible)
