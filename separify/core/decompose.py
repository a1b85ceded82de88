"""Pure decomposition math: a conv kernel in, separable factors out. No ``nn.Module`` here.

Notation: a conv weight ``W`` has shape ``(N, M, kh, kw)`` (N output channels, M input channels) and ``P = kh·kw``
spatial taps. A dense conv costs ``P·M·N`` multiply-adds per output pixel.

**dw-pw** (depthwise then pointwise; "Network Decoupling", Guo et al. 2018). For each input channel ``m`` the slice
``W[:, m]`` is an ``N×P`` matrix with SVD ``U Σ Vᵀ``. Keeping ``K`` terms::

    W[n, m, p] ≈ Σ_k  (U[n,k]·√σ_k) · (√σ_k·V[p,k])
                 ╰── pointwise ──╯   ╰─ depthwise ─╯

gives a depthwise conv with channel multiplier ``K`` (``M·K`` filters of size kh×kw, filter ``m·K + k`` reads input
channel ``m``) followed by a ``1×1`` conv from ``M·K`` to ``N`` channels. Cost ``P·M·K + M·K·N`` per pixel; exact at
``K = min(N, P)``; the relative error is ``sqrt(Σ_m Σ_{k>K} σ²_{m,k}) / ‖W‖`` (Eckart–Young, per channel).

**pw-dw-pw** (CP form). Reshape ``W`` to a 3-way tensor ``T (N, M, P)`` and fit a rank-``R`` CP model
``T[n, m, p] ≈ Σ_r A[n,r]·B[m,r]·D[p,r]``: a ``1×1`` conv ``M→R`` (weights ``Bᵀ``), a depthwise conv on ``R`` channels
(filter ``r`` is ``D[:, r]`` reshaped to kh×kw), and a ``1×1`` conv ``R→N`` (weights ``A``). Cost ``R·(M + P + N)``.
Three closed-form constructions are exact CP models of ``T`` at finite rank and serve as deterministic starts:
per input channel (the dw-pw SVD above with the first 1×1 copying channels, ``R = M·min(N, P)``), per output channel
(``R = N·min(M, P)``) and per spatial tap (``R = P·min(N, M)``, one-hot depthwise filters). Their minimum is
:func:`cp_exact_rank`; at or above it :func:`cp_decompose` returns an exact factorisation. Below it each construction
keeps the ``R`` rank-1 terms with the largest singular values over all its slices (:func:`pooled_slice_terms`; a
channel with more energy gets more terms), and the best of these (or the SVD-of-unfoldings start, whichever fits
better) is refined by alternating least squares (ALS, Kolda & Bader 2009, §3.4). ALS never increases the fit error,
so the CP result is never worse than the truncated constructions, in particular never worse than dw-pw at
``K = R // M``.

Why ALS is written here rather than calling ``tensorly.decomposition.parafac``: tensorly's MTTKRP materialises the
Khatri–Rao product of the two other factors, which for the spatial mode is an ``(N·M)×R`` matrix (``N·M·R``
values: 1.2 GB in float32 for a 512-channel layer at R = 1100). Here each ALS sweep contracts the kernel with one
factor at a time (two ``N·M·P·R`` matrix products per sweep, ``O(M·P·R)`` memory). tests/test_decompose.py checks
this solver against tensorly's on the same tensors.

**Data-aware (whitened) factors.** What matters is the error of the layer's *output* on real inputs, not of its
weights. With ``x`` the input patch a conv sees (``M·P`` values) and ``Σ = E[x xᵀ]`` its second moment, the mean
squared output error of an approximation ``Ŵ`` is ``‖(W − Ŵ) Σ^{1/2}‖²`` (``W`` as an ``N × M·P`` matrix). Both
forms keep their structure under a change of input basis that acts per channel and per tap, so with an
:class:`InputCovariance` the kernel is first *whitened* (:func:`whiten`) and the whitened kernel is decomposed, then
the factors are mapped back:

* dw-pw treats channels separately, so it uses the per-channel patch moments ``Σ_m`` (``P×P``):
  ``W'[:, m] = W[:, m] S_m`` with ``S_m = (Σ_m + δ I)^{1/2}``; truncating the SVD of ``W'[:, m]`` is optimal for
  ``‖(W[:, m] − Ŵ[:, m]) S_m‖`` (Eckart–Young), and the depthwise filters are mapped back by ``S_m⁻¹``. Correlation
  *between* channels is left to the least-squares refit of the pointwise conv (:mod:`separify.calibration`).
* pw-dw-pw uses a Kronecker model ``Σ ≈ Σ_M ⊗ Σ_P`` (channel moments ``M×M`` times the mean spatial moments
  ``P×P``): ``T' = T ×₂ L_Mᵀ ×₃ L_Pᵀ`` with ``L L ᵀ = Σ + δI`` (``L = V Λ^{1/2}``, the principal directions).
  A CP model of ``T'`` maps back to one of ``T`` by ``B = L_M⁻ᵀ B'``, ``D = L_P⁻ᵀ D'``, because CP is multilinear.

``δ`` (``damp`` times the mean input power) keeps the square roots invertible and pulls directions the data never
excites towards the weight-space solution; ``damp → ∞`` gives back the plain weight-space factors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from separify.errors import BadWeightsError, ConfigError

__all__ = [
    "InputCovariance",
    "whiten",
    "DwPwFactors",
    "CPFactors",
    "check_weight",
    "dwpw_max_rank",
    "dwpw_spectra",
    "dwpw_error",
    "dwpw_rank_for_energy",
    "dwpw_decompose",
    "cp_exact_rank",
    "cp_error_lower_bound",
    "cp_rank_for_energy",
    "cp_decompose",
    "dwpw_reconstruct",
    "cp_reconstruct",
]


@dataclass(frozen=True)
class DwPwFactors:
    """Factors of the dw-pw form.

    Attributes:
        depthwise: ``(M·K, 1, kh, kw)``; filter ``m·K + k`` applies to input channel ``m``.
        pointwise: ``(N, M·K, 1, 1)``.
        rank: ``K``, the depthwise channel multiplier.
        rel_error: ``‖W − Ŵ‖ / ‖W‖`` of the reconstructed kernel.
        data_error: with an :class:`InputCovariance`, the predicted relative output error ``‖(W − Ŵ)S‖ / ‖W S‖``
            (channels treated as uncorrelated); else ``None``.
    """

    depthwise: torch.Tensor
    pointwise: torch.Tensor
    rank: int
    rel_error: float
    data_error: float | None = None


@dataclass(frozen=True)
class CPFactors:
    """Factors of the pw-dw-pw (CP) form.

    Attributes:
        pw_in: ``(R, M, 1, 1)``, the first 1×1 conv (``Bᵀ``).
        depthwise: ``(R, 1, kh, kw)`` (columns of ``D``).
        pw_out: ``(N, R, 1, 1)``, the last 1×1 conv (``A``).
        rank: ``R``.
        rel_error: ``‖W − Ŵ‖ / ‖W‖``, always computed from the reconstructed kernel.
        init: which start won (``"in-channel"``, ``"out-channel"``, ``"spatial"``, ``"svd"`` or ``"warm"``).
        iterations: ALS sweeps run (0 when a closed form was already exact).
        data_error: with an :class:`InputCovariance`, the predicted relative output error ``‖T' − T̂'‖ / ‖T'‖`` of the
            whitened kernel (Kronecker covariance model); else ``None``.
    """

    pw_in: torch.Tensor
    depthwise: torch.Tensor
    pw_out: torch.Tensor
    rank: int
    rel_error: float
    init: str
    iterations: int
    data_error: float | None = None


def check_weight(weight: torch.Tensor) -> None:
    """Raise :class:`BadWeightsError` unless ``weight`` is a finite 4-D conv kernel."""
    if weight.dim() != 4:
        raise ConfigError(f"expected a 4-D conv weight (N, M, kh, kw), got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise BadWeightsError(f"the conv weight contains {bad} NaN or inf value(s); it cannot be decomposed")


def _work_dtype(weight: torch.Tensor) -> torch.dtype:
    # float64 stays float64; everything else (fp32, fp16, bf16) is decomposed in float32.
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _check_rank(rank: object, name: str = "rank") -> int:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ConfigError(f"{name} must be a positive integer, got {rank!r}")
    if rank <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {rank}")
    return rank


# ------------------------------------------------------------------------------------------------ input whitening


@dataclass(frozen=True)
class InputCovariance:
    """Second moments of the inputs a conv sees, measured on calibration data (see :mod:`separify.calibration`).

    Attributes:
        channel: ``(M, M)``, ``E[x xᵀ]`` over input pixels (``x`` the ``M`` channel values at one pixel).
        spatial: ``(M, P, P)``, for each input channel ``m``, ``E[u uᵀ]`` over the ``kh×kw`` patches the conv reads
            (``u`` the ``P`` values of channel ``m`` in one patch, after padding, at the conv's stride and dilation).
        count: number of pixels / patches averaged.
    """

    channel: torch.Tensor
    spatial: torch.Tensor
    count: int

    def check(self, weight_shape: torch.Size | tuple[int, ...]) -> None:
        n, m, kh, kw = weight_shape
        p = kh * kw
        if tuple(self.channel.shape) != (m, m) or tuple(self.spatial.shape) != (m, p, p):
            raise ConfigError(f"input covariance of shapes {tuple(self.channel.shape)}, {tuple(self.spatial.shape)} "
                              f"does not fit a {n}×{m}×{kh}×{kw} kernel (expected ({m}, {m}) and ({m}, {p}, {p}))")
        if not (torch.isfinite(self.channel).all() and torch.isfinite(self.spatial).all()):
            raise BadWeightsError("the input covariance contains NaN or inf (non-finite calibration activations)")


def _damped_eigh(cov: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Eigenvalues (clamped above 0) and eigenvectors of ``Σ + δI``, ``δ = damp ·`` mean diagonal (over the whole
    batch of matrices); ``cov`` is ``(..., d, d)`` symmetric PSD. ``None`` when the data is all zero."""
    cov = cov.to(torch.float64)
    scale = float(cov.diagonal(dim1=-2, dim2=-1).mean())
    if not scale > 0:
        return None
    vals, vecs = torch.linalg.eigh(cov + damp * scale * torch.eye(cov.shape[-1], dtype=torch.float64))
    return vals.clamp_min(damp * scale * 1e-3 + 1e-300), vecs  # eigh round-off can dip below the shift


def _sqrt_pair(cov: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(S, S⁻¹)`` with ``S = (Σ + δI)^{1/2}`` symmetric (batched); ``None`` when the data is all zero."""
    eig = _damped_eigh(cov, damp)
    if eig is None:
        return None
    vals, vecs = eig
    root = vals.sqrt()
    return (vecs * root[..., None, :]) @ vecs.transpose(-1, -2), (vecs / root[..., None, :]) @ vecs.transpose(-1, -2)


def _root_pair(cov: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(L, L⁻ᵀ)`` with ``L = V Λ^{1/2}``, ``L Lᵀ = Σ + δI`` (eigenbasis square root), or ``None`` when flat.

    Any ``L`` with ``L Lᵀ = Σ`` gives ``‖E L‖ = ‖E Σ^{1/2}‖``; this one also rotates the mode into the principal
    directions of the data, sorted by variance, so that the closed-form CP starts (which pick terms slice by slice)
    can spend their terms on the few directions that carry the signal.
    """
    eig = _damped_eigh(cov, damp)
    if eig is None:
        return None
    vals, vecs = eig[0].flip(0), eig[1].flip(1)  # descending variance
    root = vals.sqrt()
    return vecs * root, vecs / root


def _cp_whiteners(cov: InputCovariance, damp: float):
    """``((L_M, L_M⁻ᵀ), (L_P, L_P⁻ᵀ))`` for the Kronecker model ``Σ ≈ Σ_M ⊗ mean_m Σ_m``; ``None`` where flat."""
    return _root_pair(cov.channel, damp), _root_pair(cov.spatial.to(torch.float64).mean(0), damp)


def _cp_whiten(t: torch.Tensor, sm, sp) -> torch.Tensor:
    """``T (N, M, P) ×₂ L_Mᵀ ×₃ L_Pᵀ`` for the pairs of :func:`_cp_whiteners` (a ``None`` pair leaves its mode)."""
    if sm is not None:
        t = torch.einsum("nmp,mi->nip", t, sm[0])
    if sp is not None:
        t = t @ sp[0]
    return t


def whiten(weight: torch.Tensor, cov: InputCovariance, method: str, *, damp: float = 0.01) -> torch.Tensor:
    """The kernel whose plain (weight-space) error equals the predicted output error of ``method``'s factors.

    ``(N, M, kh, kw)`` in, same shape out, float64. dw-pw: ``W'[:, m] = W[:, m] S_m``; pw-dw-pw:
    ``W' = W ×₂ L_Mᵀ ×₃ L_Pᵀ`` (see the module docstring). Rank allocation uses the error curves of this kernel.
    """
    check_weight(weight)
    cov.check(weight.shape)
    n, m, kh, kw = weight.shape
    t = weight.detach().to(device="cpu", dtype=torch.float64).reshape(n, m, kh * kw)
    if method == "dw-pw":
        pair = _sqrt_pair(cov.spatial, damp)
        if pair is not None:
            t = torch.einsum("nmp,mpq->nmq", t, pair[0])
    else:
        t = _cp_whiten(t, *_cp_whiteners(cov, damp))
    return t.reshape(n, m, kh, kw)



# ----------------------------------------------------------------------------------------------------------- dw-pw


def dwpw_max_rank(weight_shape: torch.Size | tuple[int, ...]) -> int:
    """The dw-pw rank at which the factorisation is exact: ``min(N, kh·kw)``."""
    n, _, kh, kw = weight_shape
    return min(n, kh * kw)


def dwpw_spectra(weight: torch.Tensor) -> torch.Tensor:
    """Singular values of every input channel's ``N×P`` slice, float64, shape ``(M, min(N, P))``, descending."""
    check_weight(weight)
    n, m, kh, kw = weight.shape
    slices = weight.detach().to(torch.float64).permute(1, 0, 2, 3).reshape(m, n, kh * kw)  # (M, N, P)
    return torch.linalg.svdvals(slices)


def dwpw_error(spectra: torch.Tensor, rank: int) -> float:
    """Relative kernel error of dw-pw at ``rank``, from :func:`dwpw_spectra` (exact, no reconstruction needed)."""
    total = float((spectra**2).sum())
    if total == 0.0:
        return 0.0
    tail = float((spectra[:, rank:] ** 2).sum())
    return math.sqrt(tail / total)


def dwpw_rank_for_energy(spectra: torch.Tensor, energy: float) -> int:
    """Smallest ``K`` whose kept energy ``Σ_m Σ_{k≤K} σ²`` is at least ``energy·‖W‖²``."""
    sq = (spectra**2).sum(0)  # (q,) energy of the k-th term summed over channels
    total = float(sq.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(sq, 0) / total
    hits = (kept >= energy - 1e-12).nonzero()
    return int(hits[0]) + 1 if len(hits) else int(spectra.shape[1])


def dwpw_decompose(
    weight: torch.Tensor, rank: int, *, cov: InputCovariance | None = None, damp: float = 0.01,
) -> DwPwFactors:
    """Per-input-channel SVD of ``weight`` truncated to ``rank`` terms (of the whitened slices, given ``cov``).

    Args:
        weight: ``(N, M, kh, kw)`` conv kernel of any float dtype.
        rank: ``K`` in ``[1, min(N, kh·kw)]``.
        cov: input moments from calibration data; the truncation then minimises the predicted output error
            ``‖(W[:, m] − Ŵ[:, m]) S_m‖`` of every channel instead of the weight error.
        damp: relative damping ``δ`` of the whitening (see the module docstring).

    Returns:
        :class:`DwPwFactors` in ``weight``'s dtype and device; computed in float64.
    """
    check_weight(weight)
    k = _check_rank(rank)
    n, m, kh, kw = weight.shape
    q = dwpw_max_rank(weight.shape)
    if k > q:
        raise ConfigError(
            f"dw-pw rank {k} is impossible for a {n}×{m}×{kh}×{kw} kernel: the largest useful rank is "
            f"min(out_channels, kh·kw) = {q}, where the factorisation is already exact"
        )
    w64 = weight.detach().to(device="cpu", dtype=torch.float64)
    slices = w64.permute(1, 0, 2, 3).reshape(m, n, kh * kw)  # (M, N, P)
    pair = None
    if cov is not None:
        cov.check(weight.shape)
        pair = _sqrt_pair(cov.spatial, damp)  # (M, P, P) each
    target = slices if pair is None else slices @ pair[0]  # (M, N, P): W[:, m] S_m
    u, s, vh = torch.linalg.svd(target, full_matrices=False)  # (M, N, q), (M, q), (M, q, P)
    root = s[:, :k].sqrt()  # (M, K): split each σ evenly between the two convs
    dw = root[:, :, None] * vh[:, :k, :]  # (M, K, P)
    if pair is not None:
        dw = dw @ pair[1]  # back to the input basis: filters · S_m⁻¹
    pw = (u[:, :, :k] * root[:, None, :]).permute(1, 0, 2).reshape(n, m * k, 1, 1)  # (N, M·K, 1, 1)
    dw = dw.reshape(m * k, 1, kh, kw)  # (M·K, 1, kh, kw)
    if pair is None:
        err, data_err = dwpw_error(s, k), None
    else:
        total = float((slices**2).sum())
        diff = dwpw_reconstruct(dw, pw, m) - w64
        err = math.sqrt(float((diff**2).sum()) / total) if total > 0 else 0.0
        data_err = dwpw_error(s, k)
    cast = dict(dtype=weight.dtype, device=weight.device)
    return DwPwFactors(dw.to(**cast), pw.to(**cast), k, err, data_err)


def dwpw_reconstruct(depthwise: torch.Tensor, pointwise: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Dense kernel ``(N, M, kh, kw)`` of depthwise ``(M·K, 1, kh, kw)`` followed by pointwise ``(N, M·K, 1, 1)``."""
    mk, _, kh, kw = depthwise.shape
    k = mk // in_channels
    n = pointwise.shape[0]
    pw = pointwise.reshape(n, in_channels, k)  # (N, M, K)
    dw = depthwise.reshape(in_channels, k, kh * kw)  # (M, K, P)
    return torch.einsum("nmk,mkp->nmp", pw, dw).reshape(n, in_channels, kh, kw)


# ---------------------------------------------------------------------------------------------------------- pw-dw-pw


def cp_exact_rank(weight_shape: torch.Size | tuple[int, ...]) -> int:
    """Smallest rank at which one of the closed-form constructions is an exact CP model of the kernel."""
    n, m, kh, kw = weight_shape
    p = kh * kw
    return min(m * min(n, p), n * min(m, p), p * min(n, m))


def _unfolding_spectra(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, m, p = t.shape
    s0 = torch.linalg.svdvals(t.reshape(n, m * p))
    s1 = torch.linalg.svdvals(t.permute(1, 0, 2).reshape(m, n * p))
    return s0, s1


def cp_error_lower_bound(weight: torch.Tensor, ranks: list[int]) -> list[float]:
    """A cheap lower bound on the relative error of any rank-``R`` CP model, for each ``R`` in ``ranks``.

    A rank-``R`` CP tensor has mode-0 and mode-1 unfoldings of rank ``≤ R``, so its error is at least the tail energy
    of either unfolding's spectrum beyond ``R`` (Eckart–Young). :func:`separify.planning.ranks.error_curve` gives the matching
    upper bound (what the closed-form starts guarantee), which is what rank allocation uses.
    """
    check_weight(weight)
    n, m, kh, kw = weight.shape
    t = weight.detach().to(torch.float64).reshape(n, m, kh * kw)
    s0, s1 = _unfolding_spectra(t)
    total = float((t**2).sum())
    if total == 0.0:
        return [0.0 for _ in ranks]
    out = []
    for r in ranks:
        tail = max(float((s0[r:] ** 2).sum()), float((s1[r:] ** 2).sum()))
        out.append(math.sqrt(tail / total))
    return out


def cp_rank_for_energy(weight: torch.Tensor, energy: float) -> int:
    """Smallest ``R`` at which both the mode-0 and mode-1 unfoldings keep ``energy`` of ``‖W‖²``.

    This is a necessary condition for a rank-``R`` CP model to keep that energy (see :func:`cp_error_lower_bound`);
    the fit actually reached is reported by :func:`cp_decompose`.
    """
    check_weight(weight)
    n, m, kh, kw = weight.shape
    t = weight.detach().to(torch.float64).reshape(n, m, kh * kw)
    total = float((t**2).sum())
    if total == 0.0:
        return 1
    ranks = []
    for s in _unfolding_spectra(t):
        kept = torch.cumsum(s**2, 0) / total
        hits = (kept >= energy - 1e-12).nonzero()
        ranks.append(int(hits[0]) + 1 if len(hits) else len(s))
    return max(ranks)


def _pad_columns(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor, rank: int, gen: torch.Generator):
    """Widen CP factors to ``rank`` columns: zeros in ``A`` (the new channels add nothing yet), small random ``B`` and
    ``D`` (so that the ALS normal equations stay regular and the channels can be put to use)."""
    extra = rank - a.shape[1]
    if extra == 0:
        return a, b, d
    small = lambda rows: torch.randn(rows, extra, generator=gen, dtype=a.dtype) * 0.01  # noqa: E731
    return (torch.cat([a, a.new_zeros(a.shape[0], extra)], 1), torch.cat([b, small(b.shape[0])], 1),
            torch.cat([d, small(d.shape[0])], 1))


def pooled_slice_terms(t: torch.Tensor, rank: int):
    """The ``rank`` largest rank-1 terms over all slices of ``t`` in each of the three closed-form constructions.

    Construction ``c`` splits ``T (N, M, P)`` into slices (per input channel ``N×P``, per output channel ``M×P``,
    per tap ``N×M``), takes every slice's SVD, and keeps the ``rank`` terms with the largest singular values *over
    all slices* (so a channel that carries more energy gets more terms). The slices are disjoint and the terms within
    a slice orthogonal, so the kept energy is the sum of the kept ``σ²``: the construction's error is exact, and it
    is the best choice of terms from these SVDs.

    Returns ``[(name, (A, B, D))]`` with exactly ``min(rank, terms available)`` columns each.
    """
    n, m, p = t.shape
    out = []
    for name, slices in (("in-channel", t.permute(1, 0, 2)), ("out-channel", t), ("spatial", t.permute(2, 0, 1))):
        u, sv, vh = torch.linalg.svd(slices, full_matrices=False)  # (S, r, q), (S, q), (S, q, c)
        q = sv.shape[1]
        top = torch.topk(sv.flatten(), min(rank, sv.numel())).indices
        which, k = top // q, top % q  # slice and term of every kept term
        root = sv[which, k].sqrt()
        left = u[which, :, k].T * root  # (r, R): rows of the slice's row mode
        right = (vh[which, k, :] * root[:, None]).T  # (c, R)
        onehot = torch.zeros(slices.shape[0], len(top), dtype=t.dtype)
        onehot[which, torch.arange(len(top))] = 1.0
        if name == "in-channel":  # slice m: rows n, cols p
            out.append((name, (left, onehot, right)))
        elif name == "out-channel":  # slice n: rows m, cols p
            out.append((name, (onehot, left, right)))
        else:  # slice p: rows n, cols m
            out.append((name, (left, right, onehot)))
    return out


def _closed_form_starts(t: torch.Tensor, rank: int, gen: torch.Generator) -> list[tuple[str, tuple]]:
    """The closed-form CP constructions (:func:`pooled_slice_terms`) padded to ``rank`` channels.

    Unused channels get zero in ``A`` (so they add nothing) and small random ``B``/``D`` (so that ALS can use them).
    """
    return [(name, _pad_columns(a, b, d, rank, gen)) for name, (a, b, d) in pooled_slice_terms(t, rank)]


def _svd_start(t: torch.Tensor, rank: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading singular vectors of the mode-1 and mode-2 unfoldings as ``B`` and ``D`` (random columns past their
    rank); ``A`` then comes from the first least-squares step. The usual "svd" initialisation of CP-ALS."""
    n, m, p = t.shape

    def lead(unfolded: torch.Tensor) -> torch.Tensor:
        # left singular vectors of a wide (rows × cols) matrix = eigenvectors of its small rows × rows Gram matrix
        rows = unfolded.shape[0]
        _, vecs = torch.linalg.eigh(unfolded @ unfolded.T)  # ascending eigenvalues
        u = vecs.flip(1)[:, :rank]
        if u.shape[1] < rank:
            u = torch.cat([u, torch.randn(rows, rank - u.shape[1], generator=gen, dtype=t.dtype)], 1)
        return u

    b = lead(t.permute(1, 0, 2).reshape(m, n * p))
    d = lead(t.permute(2, 0, 1).reshape(p, n * m))
    return b, d


class _ALS:
    """CP-ALS on a fixed tensor ``T (N, M, P)`` with the contractions arranged to avoid any ``(N·M)×R`` matrix."""

    def __init__(self, t: torch.Tensor) -> None:
        n, m, p = t.shape
        self.shape = (n, m, p)
        self.t_np_m = t.permute(0, 2, 1).reshape(n * p, m)  # rows (n, p)
        self.t_n_mp = t.reshape(n, m * p)
        self.norm2 = float((t**2).sum())

    @staticmethod
    def _solve(rhs: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        """Least-squares factor update ``rhs · gram⁻¹`` for a symmetric PSD ``gram`` (tiny ridge for stability)."""
        eye = torch.eye(gram.shape[0], dtype=gram.dtype)
        ridge = (gram.diagonal().mean().clamp_min(1e-30)) * (1e-12 if gram.dtype == torch.float64 else 1e-6)
        chol, info = torch.linalg.cholesky_ex(gram + ridge * eye)
        if int(info) == 0:
            return torch.cholesky_solve(rhs.T, chol).T
        return rhs @ torch.linalg.pinv(gram, hermitian=True)

    def update_a(self, b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        n, m, p = self.shape
        y = (self.t_np_m @ b).reshape(n, p, -1)  # (N, P, R) = Σ_m T[n,m,p] B[m,r]
        mttkrp = (y * d[None]).sum(1)  # (N, R)
        return self._solve(mttkrp, (b.T @ b) * (d.T @ d))

    def sweep(self, a, b, d):
        """One ALS sweep (A, then B, then D); returns the new factors and the squared error."""
        n, m, p = self.shape
        a = self.update_a(b, d)
        w = (self.t_n_mp.T @ a).reshape(m, p, -1)  # (M, P, R) = Σ_n T[n,m,p] A[n,r]
        ata = a.T @ a
        b = self._solve((w * d[None]).sum(1), ata * (d.T @ d))  # (M, R)
        mttkrp_d = (w * b[:, None, :]).sum(0)  # (P, R)
        d = self._solve(mttkrp_d, ata * (b.T @ b))
        inner = float((mttkrp_d * d).sum())
        model2 = float((ata * (b.T @ b) * (d.T @ d)).sum())
        return a, b, d, max(self.norm2 - 2 * inner + model2, 0.0)


def _balance(a, b, d):
    """Give the three factors equal column norms (same product), so no conv carries all the scale."""
    na, nb, nd = a.norm(dim=0), b.norm(dim=0), d.norm(dim=0)
    target = (na * nb * nd).clamp_min(0).pow(1 / 3)
    safe = lambda x: torch.where(x > 0, x, torch.ones_like(x))  # noqa: E731
    return a * (target / safe(na)), b * (target / safe(nb)), d * (target / safe(nd))


def cp_reconstruct(pw_in: torch.Tensor, depthwise: torch.Tensor, pw_out: torch.Tensor) -> torch.Tensor:
    """Dense kernel ``(N, M, kh, kw)`` of pw ``(R, M, 1, 1)`` → dw ``(R, 1, kh, kw)`` → pw ``(N, R, 1, 1)``."""
    kh, kw = depthwise.shape[-2:]
    a = pw_out[:, :, 0, 0]  # (N, R)
    b = pw_in[:, :, 0, 0].T  # (M, R)
    d = depthwise.reshape(depthwise.shape[0], kh * kw).T  # (P, R)
    return _cp_dense(a, b, d).reshape(a.shape[0], b.shape[0], kh, kw)


def _cp_dense(a: torch.Tensor, b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``Σ_r A[n,r] B[m,r] D[p,r]`` as ``(N, M, P)``, via the small ``(M·P)×R`` Khatri–Rao product."""
    m, p, r = b.shape[0], d.shape[0], b.shape[1]
    kr = (b[:, None, :] * d[None, :, :]).reshape(m * p, r)  # (M·P, R)
    return (a @ kr.T).reshape(a.shape[0], m, p)


def _warm_factors(warm_start: CPFactors, t: torch.Tensor, rank: int, sm, sp, gen: torch.Generator):
    """``(A (N, R), B (M, R), D (P, R))`` of ``warm_start`` in the (whitened) basis of ``t (N, M, P)``, padded to
    ``rank`` columns (:func:`_pad_columns`); :class:`ConfigError` where its rank or shape does not fit."""
    n, m, p = t.shape
    if warm_start.rank > rank or warm_start.pw_out.shape[0] != n or warm_start.pw_in.shape[1] != m:
        raise ConfigError(f"warm_start has rank {warm_start.rank} or a shape that does not fit rank {rank}")
    b_w = warm_start.pw_in.reshape(-1, m).T.to(dtype=t.dtype, device="cpu")  # (M, R_w)
    d_w = warm_start.depthwise.reshape(-1, p).T.to(dtype=t.dtype, device="cpu")  # (P, R_w)
    if sm is not None:
        b_w = sm[0].T @ b_w  # into the whitened basis: B' = L_Mᵀ B
    if sp is not None:
        d_w = sp[0].T @ d_w
    return _pad_columns(warm_start.pw_out.reshape(n, -1).to(dtype=t.dtype, device="cpu"), b_w, d_w, rank, gen)


def _best_start(t: torch.Tensor, rank: int, als: _ALS, gen: torch.Generator, exact_floor: float,
                warm_start: CPFactors | None, sm, sp):
    """``(name, squared error, (A, B, D))`` of the start that fits ``t`` best: the closed-form constructions, the
    factors of ``warm_start`` (if given; whitened by ``sm``, ``sp``), and, unless one of them is already exact
    (squared error at most ``exact_floor``), the SVD-of-unfoldings start. ``gen`` is drawn from in that order."""
    best = None
    for name, (a, b, d) in _closed_form_starts(t, rank, gen):
        err2 = _sq_error(t, a, b, d)
        if best is None or err2 < best[1]:
            best = (name, err2, (a, b, d))
    if warm_start is not None:
        a_w, b_w, d_w = _warm_factors(warm_start, t, rank, sm, sp, gen)
        err2 = _sq_error(t, a_w, b_w, d_w)
        if best is None or err2 < best[1]:
            best = ("warm", err2, (a_w, b_w, d_w))
    if best is None or best[1] > exact_floor:
        b, d = _svd_start(t, rank, gen)
        a = als.update_a(b, d)
        err2 = _sq_error(t, a, b, d)
        if best is None or err2 < best[1]:
            best = ("svd", err2, (a, b, d))
    return best


def _refine(als: _ALS, a, b, d, err2: float, *, max_iter: int, tol: float, exact_floor: float):
    """ALS sweeps from ``(A, B, D)`` with squared error ``err2``: at most ``max_iter``, until the relative error
    ``sqrt(err2 / ‖T‖²)`` drops by less than ``tol`` times itself, the fit is exact (``err2 ≤ exact_floor``), or a
    sweep makes it worse or non-finite (its factors are then dropped). Returns ``(A, B, D, err2, sweeps run)``."""
    norm2 = als.norm2 if als.norm2 > 0 else 1.0
    iters = 0
    while iters < max_iter and err2 > exact_floor:
        a2, b2, d2, new2 = als.sweep(a, b, d)
        iters += 1
        if not math.isfinite(new2) or new2 > err2 * (1 + 1e-6):
            break  # numerical trouble: keep the previous factors (ALS is monotone in exact arithmetic)
        improvement = math.sqrt(err2 / norm2) - math.sqrt(new2 / norm2)
        a, b, d, err2 = a2, b2, d2, new2
        if improvement < tol * math.sqrt(err2 / norm2):
            break
    return a, b, d, err2, iters


def cp_decompose(
    weight: torch.Tensor, rank: int, *, max_iter: int = 25, tol: float = 1e-4, seed: int = 0,
    warm_start: CPFactors | None = None, cov: InputCovariance | None = None, damp: float = 0.01,
) -> CPFactors:
    """Rank-``R`` CP factorisation of a conv kernel as pw → dw → pw.

    Args:
        weight: ``(N, M, kh, kw)`` kernel of any float dtype (fitted in float64 if it is float64, else float32).
        rank: ``R ≥ 1``. At ``R ≥ cp_exact_rank(weight.shape)`` the result is exact (closed form, no iterations).
        max_iter: bound on ALS sweeps.
        tol: stop when a sweep lowers the relative error by less than ``tol`` (relative to the current error).
        seed: seeds the only random numbers used (padding columns of the starts), so results are reproducible.
        warm_start: factors of the same kernel at a rank ``≤ R`` (e.g. the previous rank of a sweep), used as one
            more start (padded with inactive columns). Because ALS never increases the error, a sweep over ranks
            that passes each result on is non-increasing in error; independent fits at neighbouring ranks can
            differ by the ALS convergence slack.
        cov: input moments from calibration data; the CP model is then fitted to the whitened kernel
            ``T ×₂ L_Mᵀ ×₃ L_Pᵀ`` (predicted output error) and mapped back (see the module docstring).
        damp: relative damping ``δ`` of the whitening.

    Returns:
        :class:`CPFactors` in ``weight``'s dtype and device, with the relative error of the reconstructed kernel.
    """
    check_weight(weight)
    rank = _check_rank(rank)
    n, m, kh, kw = weight.shape
    p = kh * kw
    dtype = _work_dtype(weight)
    t0 = weight.detach().to(device="cpu", dtype=dtype).reshape(n, m, p)  # (N, M, P)
    sm = sp = None
    t = t0
    if cov is not None:
        cov.check(weight.shape)
        sm, sp = ((x[0].to(dtype), x[1].to(dtype)) if x is not None else None for x in _cp_whiteners(cov, damp))
        t = _cp_whiten(t0, sm, sp)  # (N, M, P), whitened
    gen = torch.Generator().manual_seed(seed)
    als = _ALS(t)
    norm2 = als.norm2 if als.norm2 > 0 else 1.0

    # Score every start by its squared error and keep the best; ALS refines it.
    exact_floor = (1e-24 if dtype == torch.float64 else 1e-12) * norm2
    init, err2, (a, b, d) = _best_start(t, rank, als, gen, exact_floor, warm_start, sm, sp)
    a, b, d, err2, iters = _refine(als, a, b, d, err2, max_iter=max_iter, tol=tol, exact_floor=exact_floor)
    data_err = math.sqrt(err2 / norm2) if cov is not None and als.norm2 > 0 else None
    if sm is not None:
        b = sm[1] @ b  # back to the input basis: B = L_M⁻ᵀ B'
    if sp is not None:
        d = sp[1] @ d
    a, b, d = _balance(a, b, d)  # (N, R), (M, R), (P, R)
    pw_in = b.T.reshape(rank, m, 1, 1)
    dw = d.T.reshape(rank, 1, kh, kw)
    pw_out = a.reshape(n, rank, 1, 1)
    total = float((t0**2).sum())
    rel = math.sqrt(_sq_error(t0, a, b, d) / total) if total > 0 else 0.0
    cast = dict(dtype=weight.dtype, device=weight.device)
    return CPFactors(pw_in.to(**cast), dw.to(**cast), pw_out.to(**cast), rank, rel, init, iters, data_err)


def _sq_error(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor) -> float:
    return float(((_cp_dense(a, b, d) - t) ** 2).sum())
