"""Dense linear-algebra helpers of the calibration fits: a symmetric solve, a Gram product and a squared norm."""

from __future__ import annotations

import torch

__all__ = ["blocked_gram", "spd_solve", "sq_norm"]


def spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a⁻¹ b`` for a symmetric ``a (d, d)`` that is positive definite up to rounding, ``b (d, k)``: Cholesky (half
    the cost of LU), LU where it fails."""
    chol, info = torch.linalg.cholesky_ex(a)
    return torch.cholesky_solve(b, chol) if int(info) == 0 else torch.linalg.solve(a, b)


def blocked_gram(u: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """``uᵀu (d, d)`` for ``u (n, d)``: for wide ``u`` (``d ≥ 1024``), only the blocks on and above the diagonal of
    a ``blocks × blocks`` partition are multiplied (``(blocks+1)/(2·blocks)`` of the multiply-adds, 5/8 at 4) and
    mirrored."""
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


def sq_norm(t: torch.Tensor) -> float:
    """``Σ t²`` as a Python float, reduced in ``t``'s own precision (a blocked sum, without the float64 copy of the
    whole tensor that ``t.double().pow(2).sum()`` makes)."""
    return float(torch.linalg.vector_norm(t.detach())) ** 2
