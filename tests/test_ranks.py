"""The global FLOPs allocator: budget respected, optimal on small convex instances (checked by brute force)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from separify.planning import ranks
from separify.planning.ranks import LayerCost, allocate


def _layer(name, dense, a, b, max_rank, decay):
    # convex, decreasing relative-error² curve; error 0 at the exact rank
    def errors(r, _d=decay, _m=max_rank):
        return np.sqrt(np.where(r >= _m, 0.0, np.exp(-_d * np.asarray(r, dtype=float))))

    return LayerCost(name, dense, (a, b), max_rank, errors)


def _brute_force(layers, budget):
    choices = []
    for layer in layers:
        opts = [(int(r), layer.flops(int(r)), float(layer.errors(np.array([r]))[0] ** 2)) for r in layer.saving_ranks()]
        choices.append(opts + [(None, layer.dense_flops, 0.0)])
    best = None
    for combo in itertools.product(*choices):
        flops = sum(c[1] for c in combo)
        if flops <= budget:
            err = sum(c[2] for c in combo)
            if best is None or err < best[0] - 1e-12:
                best = (err, combo)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_matches_brute_force_within_one_step(seed):
    rng = np.random.default_rng(seed)
    layers = [_layer(f"l{i}", int(rng.integers(800, 2000)), int(rng.integers(0, 50)), int(rng.integers(40, 150)),
                     int(rng.integers(4, 9)), float(rng.uniform(0.2, 1.2))) for i in range(3)]
    total_dense = sum(l.dense_flops for l in layers)
    budget = int(total_dense * rng.uniform(0.3, 0.7))
    alloc = allocate(layers, budget)
    assert alloc.feasible and alloc.flops <= budget
    chosen_err = 0.0
    for layer in layers:
        r = alloc.ranks[layer.name]
        chosen_err += 0.0 if r is None else float(layer.errors(np.array([r]))[0] ** 2)
    best_err, _ = _brute_force(layers, budget)
    # the greedy is optimal up to the last step that did not fit: bounded by one layer's largest step
    largest_step = max(float(l.errors(np.array([1]))[0] ** 2) for l in layers)
    assert best_err - 1e-12 <= chosen_err <= best_err + largest_step


def test_identical_layers_get_equal_ranks():
    layers = [_layer(n, 10_000, 0, 100, 60, 0.1) for n in ("a", "b", "c")]
    alloc = allocate(layers, 3 * 1_000)
    assert len(set(alloc.ranks.values())) == 1 and alloc.ranks["a"] == 10


def test_infeasible_budget_takes_cheapest_ranks():
    layers = [_layer("a", 1000, 10, 100, 9, 1.0), _layer("b", 1000, 10, 100, 9, 1.0)]
    alloc = allocate(layers, 50)
    assert not alloc.feasible and alloc.ranks == {"a": 1, "b": 1}


def test_layer_without_saving_rank_stays_dense():
    layer = _layer("tiny", 100, 50, 80, 9, 1.0)  # rank 1 already costs 130 > 100
    assert len(layer.saving_ranks()) == 0
    assert allocate([layer], 10_000).ranks == {"tiny": None}


@pytest.mark.parametrize("method", ["dw-pw", "pw-dw-pw"])
def test_error_curves(method):
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    r = np.arange(1, 200)
    e = ranks.error_curve(method, w, r)
    floor = 1e-6 if method == "dw-pw" else 1e-3  # pw-dw-pw plans with float32 spectra: √(rounding) ≈ 1e-4 at rank max
    assert np.all(np.diff(e) <= 1e-12) and e[0] <= 1.0 and e[-1] < floor
    if method == "pw-dw-pw":  # a guaranteed bound: the actual fit is never worse
        from separify.core.decompose import cp_decompose

        for rank in (8, 20, 40):
            assert cp_decompose(w, rank).rel_error <= e[rank - 1] + 1e-6
