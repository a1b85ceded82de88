"""``method="auto"``: each form's predicted error at a few sample ranks, on one yardstick, as curves for the allocation.

The two forms' own error curves are not comparable: dw-pw's is exact, pw-dw-pw's a loose upper bound, and their
whitened versions use different parts of the input moments. So for a layer with calibration data, the predicted
error of a form at rank ``r`` is the one calibration will reach: the form decomposed at ``r`` (as ``from_conv``
does), then its depthwise conv and last 1×1 conv fitted to the original output by the same alternating least
squares (:func:`~separify.calibration.als_fit`), on patch statistics of the original conv's input ``x`` and output
``y`` (:class:`~separify.calibration.PatchStatistics`, a seeded sample of pixels, gathered in the observation
pass). pw-dw-pw's depthwise conv reads ``h = A x`` (``A (R, M)`` its first 1×1 conv): with ``K = A ⊗ I_P`` its
statistics are ``K S Kᵀ``, ``Yu Kᵀ`` and ``K us``, from those of ``x`` without another pass. Without calibration
data the yardstick is the weight error of the decomposition. Between sample ranks the error is interpolated
(log error, linear in rank).

The sample ranks end where the refit's ALS still runs (:func:`~separify.calibration.als_runs`: pw-dw-pw's depthwise
conv reads ``R·P ≤ 8,192`` values per pixel). Beyond, a prediction by ALS would promise a fit the refit never makes,
and it is the costliest to make (the statistics grow as ``(R·P)²``; on ResNet-50's 512-channel layers the useful ranks
reach 2,283); the curve continues from its last sample with the shape of the form's weight-space curve
(:func:`~separify.planning.ranks.error_curve`, non-increasing).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from separify.calibration import PatchStatistics, als_fit, als_runs
from separify.core.modules import FORMS
from separify.planning.ranks import error_curve

__all__ = ["AUTO_FORMS", "SAMPLE_RANKS", "form_curve", "measured_ranks", "sample_ranks"]

AUTO_FORMS = ("dw-pw", "pw-dw-pw")
SAMPLE_RANKS = 5  # ranks per form and layer at which the predicted error is measured
ALS_ITERS = 4  # ALS iterations per prediction (the error falls fastest in the first; the refit runs the full count)


def sample_ranks(ranks: np.ndarray, count: int = SAMPLE_RANKS) -> np.ndarray:
    """Up to ``count`` ranks of ``ranks`` (sorted, ≥ 1), spread geometrically, the first and last included."""
    if len(ranks) <= count:
        return np.asarray(ranks, dtype=np.int64)
    picks = np.geomspace(1, len(ranks), count).round().astype(np.int64) - 1
    return np.asarray(ranks, dtype=np.int64)[np.unique(picks)]


def _statistics_of(mod: nn.Module, stats: PatchStatistics) -> PatchStatistics:
    """The statistics of ``mod``'s depthwise input: ``stats`` itself for dw-pw; for pw-dw-pw those of ``A x``."""
    if not hasattr(mod, "conv_pw_in"):
        return stats
    a = mod.conv_pw_in.weight.detach().to(stats.S.dtype).flatten(1)  # (R, M)
    (r, m), p = a.shape, stats.cp // a.shape[1]
    # K = A ⊗ I_P on channel-major patch vectors, applied without forming it (P times fewer products)
    left = (a @ stats.S.view(m, p * m * p)).view(r * p, m, p)  # Σ_m A[r, m] S[(m, p), (n, q)]: ((R, P), M, P)
    s = torch.matmul(a, left).reshape(r * p, r * p)  # Σ_n A[s, n] left[(r, p), n, q]: K S Kᵀ, [(r, p), (s, q)]
    yu = torch.matmul(a, stats.Yu.view(-1, m, p)).reshape(-1, r * p)  # Yu Kᵀ: (N, R·P)
    us = (a @ stats.us.view(m, p)).reshape(r * p)  # K us
    return PatchStatistics.from_sums(mod.conv_dw, s, yu, us, stats)


def predicted_error(mod: nn.Module, stats: PatchStatistics | None, *, iters: int, ridge: float) -> float:
    """The relative output error calibration reaches for the replacement ``mod`` (weight error without
    ``stats``); ``mod`` is changed."""
    if stats is None:
        return float(mod.decomposition_error)
    return float(als_fit(mod.conv_dw, mod._last(), _statistics_of(mod, stats), iters=iters, ridge=ridge)[1])


def measured_ranks(conv: nn.Conv2d, method: str, ranks: np.ndarray) -> np.ndarray:
    """The ranks of ``ranks`` at which ``method``'s error is predicted by ALS (module docstring): those where the
    refit's ALS runs, at least the first."""
    if method != "pw-dw-pw":
        return ranks
    taps = conv.kernel_size[0] * conv.kernel_size[1]
    fits = np.asarray([als_runs(int(r) * taps) for r in ranks], dtype=bool)
    return ranks[fits] if fits.any() else ranks[:1]


def form_curve(conv: nn.Conv2d, method: str, ranks: np.ndarray, stats: PatchStatistics | None, *,
               options: Callable[[str, int], dict[str, Any]], iters: int, ridge: float
               ) -> Callable[[np.ndarray], np.ndarray]:
    """The predicted relative error of ``method`` as a function of rank (module docstring): measured at
    :func:`sample_ranks` of :func:`measured_ranks` (``from_conv(conv, r, **options(method, r))``), interpolated
    between them, non-increasing; above the last, that error times the weight-space curve's ratio to its value
    there."""
    ranks = np.asarray(ranks, dtype=np.int64)
    at = sample_ranks(measured_ranks(conv, method, ranks))
    errors = []
    for r in at:
        mod = FORMS[method].from_conv(copy.deepcopy(conv), int(r), **options(method, int(r)))
        errors.append(max(predicted_error(mod, stats, iters=min(iters, ALS_ITERS), ridge=ridge), 1e-12))
    log = np.minimum.accumulate(np.log(np.asarray(errors)))
    beyond = np.concatenate([at[-1:], ranks[ranks > at[-1]]])  # the last sample and the ranks above it
    if len(beyond) > 1:  # the weight-space curve's shape from the last sample on, as log ratios (at most 0)
        shape = np.log(np.maximum(error_curve(method, conv.weight, beyond), 1e-300))
        at = np.concatenate([at, beyond[1:]])
        log = np.concatenate([log, log[-1] + np.minimum(shape[1:] - shape[0], 0.0)])

    def curve(r: np.ndarray) -> np.ndarray:
        return np.exp(np.interp(np.asarray(r, dtype=np.float64), at.astype(np.float64), log))

    return curve
