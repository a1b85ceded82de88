"""Alternating least squares on the depthwise conv and last 1×1 conv of a replacement, fitted to the layer's output.

A replacement ends in a depthwise conv ``D`` (``C → C·K``, filters ``d (C, K, P)``) followed by a 1×1 conv ``P``
(``C·K → N``, bias ``b``). On the depthwise conv's input ``h``, with ``u_i (C·P)`` the patch it reads at output
pixel ``i`` (:mod:`~separify.calibration.patches`), the output ``ŷ_i = P·dw_D(u_i) + b`` is linear in ``D`` for
fixed ``P`` and in ``[P b]`` for fixed ``D``. Both half-steps are therefore least-squares solves from the patch
statistics ``S = Σ u uᵀ (C·P, C·P)``, ``Σ y uᵀ (N, C·P)`` of a seeded sample of pixels (:class:`PatchStatistics`),
gathered once: an iteration costs no pass over the data.

Bounds: the statistics use 1,024 to 4,096 pixels (fewer where ``C·P`` is large, so that the Gram costs at most
``2³⁴`` multiply-adds); a depthwise conv reading more than 8,192 values per pixel (a ``(C·P)²`` Gram over 512 MiB)
gets no ALS (:func:`als_skip_reason`), nor does a layer whose data is :func:`~separify.calibration.scarce`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from separify.calibration.linalg import blocked_gram, spd_solve
from separify.calibration.patches import gather_patches, out_size, pixel_coords
from separify.calibration.refit import scarce, scarce_note
from separify.errors import SeparifyError

__all__ = ["PatchStatistics", "als_dw_pw", "als_fit", "als_runs", "als_skip_reason"]

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
        self.keep, self.total = None, total
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

    @classmethod
    def from_sums(cls, dw: nn.Conv2d, S: torch.Tensor, Yu: torch.Tensor, us: torch.Tensor,
                  like: "PatchStatistics") -> "PatchStatistics":
        """Statistics of another input of the same pixels (``S``, ``Yu``, ``us`` of it for the depthwise conv
        ``dw``), with the output sums, count and precision of ``like``; nothing more can be added."""
        out = cls.__new__(cls)
        kh, kw = dw.kernel_size
        out.dw, out.cp, out.keep, out.total, out.offset = dw, dw.in_channels * kh * kw, None, like.total, like.offset
        out.S, out.Yu, out.us, out.ys, out.yy, out.n = S, Yu, us, like.ys, like.yy, like.n
        out.dtype, out._s_work = like.dtype, None
        return out

    def add(self, h: torch.Tensor, y: torch.Tensor) -> None:
        """Add the sampled pixels of one batch: ``h (B, C, H, W)`` the depthwise conv's input (unpadded), ``y (B,
        N, H', W')`` the wanted output; ``(H', W')`` must be the conv's output size of ``h``."""
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
        if out_size(h.shape[2], kh, sy, dy) != ho or out_size(h.shape[3], kw, sx, dx) != wo:
            raise SeparifyError(f"the depthwise conv's input {tuple(h.shape[2:])} does not give the original output "
                                f"size {(ho, wo)}")
        lo, self.offset = self.offset, self.offset + b * ho * wo
        idx = torch.arange(lo, self.offset, device=h.device) if self.keep is None else \
            self.keep[(self.keep >= lo) & (self.keep < self.offset)]
        idx = idx - lo  # pixels of this batch, in (sample, row, column) order as y's
        if self.keep is not None and self.offset > self.total:  # more pixels than announced (samples of several
            # sizes): the part beyond ``total`` is sampled at the same rate
            start = max(self.total - lo, 0)
            gen = torch.Generator().manual_seed(self.offset)
            extra = torch.rand(b * ho * wo - start, generator=gen) < len(self.keep) / self.total
            idx = torch.cat([idx, start + extra.nonzero()[:, 0].to(idx.device)])
        if not len(idx):
            return
        for part in idx.split(1 << 16):  # bounded gathers: (n, C·P) at most 65,536 rows
            bi, oy, ox = pixel_coords(part, wo, ho * wo)
            u = gather_patches(h, bi, oy, ox, dw.kernel_size, dw.stride, dw.dilation)  # (n, C·P)
            t = y[bi, :, oy, ox].to(work)  # (n, N)
            self.S += blocked_gram(u).double()
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


def _pw_step(gram: torch.Tensor, cross: torch.Tensor, w: torch.Tensor, ridge: float, bias: bool) -> torch.Tensor:
    """Least-squares ``W = [P b]`` given the depthwise filters (bias column fixed at zero without a bias)."""
    if not bias:
        gram, cross, w = gram[:-1, :-1], cross[:, :-1], w[:, :-1]
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-30))
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    new = w + spd_solve(gram + lam * eye, (cross - w @ gram).T).T
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
