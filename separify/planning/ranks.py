"""Rank selection: fixed rank, energy threshold, or a global FLOPs target allocated across layers.

**Global FLOPs target.** Every layer ``i`` offers options ``(F_i(r), E_i(r))``: the FLOPs of its replacement at rank
``r`` (affine in ``r``, counted by ``FlopCounterMode``) and the squared relative kernel error ``E = ‖W − Ŵ‖²/‖W‖²``,
plus the option of staying dense ``(F_i^dense, 0)``. We minimise ``Σ_i E_i`` subject to ``Σ_i F_i ≤ budget``. This is
a multiple-choice knapsack; the greedy rule used here starts every layer at its cheapest option and repeatedly takes,
over all layers, the upgrade with the largest error decrease per FLOP added among the options that still fit in the
budget (from a layer's current option, that is the next vertex of the lower convex hull of its affordable options,
so non-convex stretches are jumped over). For convex error curves, which per-channel SVD tails are, this is the
classic optimal marginal-allocation rule (Fox 1966): at the end every layer trades error for FLOPs at the same rate.
Restricting each step to what still fits matters: an unaffordable hull step (e.g. the jump to staying dense) must
not stop a layer while others take upgrades worth less. Relative (not
absolute) error is used so that layers with larger weights (e.g. after BatchNorm folding) do not dominate, and the
squared error adds up across layers like independent noise added to the network.

**Error curves.** dw-pw: exact, from the per-channel singular values. pw-dw-pw: running ALS at every candidate rank
of every layer would cost far more than the conversion, so the allocation uses the error that the closed-form
starts of :func:`separify.core.decompose.cp_decompose` guarantee (ALS only lowers it); the fit actually reached is
measured and reported after the conversion.

**With calibration data** the curves are those of the kernel whitened by the layer's measured input moments
(:func:`separify.core.decompose.whiten`): the predicted relative error of the layer's *output* on that data. A layer
whose inputs only span a few directions then needs few terms, and the FLOPs go where the data needs them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from separify.core import decompose as dec

__all__ = ["LayerCost", "error_curve", "rank_for_energy", "allocate", "allocate_options", "Allocation"]


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
    # spectra of the slices of each construction: per input channel, per output channel, per spatial tap; a rank-R
    # construction keeps the R largest terms over all slices (decompose.pooled_slice_terms)
    for slices in (t.permute(1, 0, 2), t, t.permute(2, 0, 1)):
        sq = torch.linalg.svdvals(slices).double().flatten() ** 2
        kept = np.concatenate([[0.0], np.cumsum(torch.sort(sq, descending=True).values.numpy())])
        tail = np.clip(1.0 - kept / total, 0.0, 1.0)
        best = np.minimum(best, tail[np.minimum(ranks, len(tail) - 1)])
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
    """Result of :func:`allocate`: rank per layer (``None`` = stay dense), FLOPs (or the cost unit of
    :func:`allocate_options`) reached and whether it fits."""

    ranks: dict[str, int | None]
    flops: float
    budget: float
    feasible: bool


def allocate(layers: list[LayerCost], budget: int) -> Allocation:
    """Choose a rank (or dense) per layer to minimise ``Σ relative error²`` with ``Σ FLOPs ≤ budget``.

    Layers with no saving rank are left dense. If even the cheapest ranks exceed the budget, every layer takes its
    cheapest rank and the allocation is marked infeasible.
    """
    options = {}
    for layer in layers:
        ranks = layer.saving_ranks()
        if len(ranks) == 0:
            continue
        options[layer.name] = ([int(r) for r in ranks] + [None], [layer.flops(int(r)) for r in ranks] + [layer.dense_flops],
                               np.concatenate([layer.errors(ranks) ** 2, [0.0]]))
    alloc = allocate_options(options, budget)
    return Allocation({layer.name: alloc.ranks.get(layer.name) for layer in layers}, int(alloc.flops), budget,
                      alloc.feasible)


def allocate_options(options: dict[str, tuple[list, "np.ndarray | list", "np.ndarray | list"]],
                     budget: float) -> Allocation:
    """The greedy marginal-gain allocation (module docstring) over explicit options.

    ``options[name] = (choices, costs, err2)``: what each option is (a rank, or ``None`` for staying dense), its cost
    (FLOPs, or measured milliseconds) and its squared relative error. Every layer starts at its cheapest option;
    ``Allocation.flops`` is the total cost reached (in the unit of ``costs``).
    """
    raw = {}  # name -> (choices, costs, err2), sorted by cost
    for name, (choices, costs, err2) in options.items():
        order = np.argsort(np.asarray(costs, dtype=np.float64), kind="stable")
        raw[name] = ([choices[i] for i in order], np.asarray(costs, dtype=np.float64)[order],
                     np.asarray(err2, dtype=np.float64)[order])

    current = {name: 0 for name in raw}  # index into raw
    used = sum(float(raw[name][1][0]) for name in raw)
    feasible = used <= budget

    def best_upgrade(name: str, room: float):
        """(gain, option, extra cost) of the best upgrade of ``name`` costing at most ``room``, or None."""
        _, flops, err2 = raw[name]
        i = current[name]
        ok = (flops > flops[i]) & (flops - flops[i] <= room) & (err2 < err2[i])
        if not ok.any():
            return None
        gain = np.where(ok, (err2[i] - err2) / np.maximum(flops - flops[i], 1e-9), -np.inf)
        k = int(np.argmax(gain))
        return float(gain[k]), k, float(flops[k] - flops[i])

    # the best affordable upgrade (largest error decrease per unit of cost added) over all layers, until none fits;
    # a layer's best upgrade only changes when the layer moves or the upgrade stops fitting, so it is cached
    cache = {name: best_upgrade(name, budget - used) for name in raw} if feasible else {}
    while cache:
        room = budget - used
        for name, up in list(cache.items()):
            if up is not None and up[2] > room:
                cache[name] = best_upgrade(name, room)
        live = [(up[0], name) for name, up in cache.items() if up is not None]
        if not live:
            break
        _, name = max(live)
        _, k, extra = cache[name]
        used += extra
        current[name] = k
        cache[name] = best_upgrade(name, budget - used)
    chosen = {name: raw[name][0][i] for name, i in current.items()}
    return Allocation(chosen, used, budget, feasible)
