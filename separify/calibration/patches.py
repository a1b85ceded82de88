"""Patch geometry of a conv: output size, output-pixel coordinates, and the input patches read at chosen pixels.

Notation: a conv with kernel ``(kh, kw)``, stride ``(sy, sx)`` and dilation ``(dy, dx)`` reads ``P = kh·kw`` taps
per channel; its input ``h (B, C, H, W)`` is taken as already padded, so output pixel ``(oy, ox)`` reads
``h[:, :, oy·sy + i·dy, ox·sx + j·dx]`` for taps ``(i, j)``. Patch vectors are ordered channel-major: entry
``c·P + (i·kw + j)``.
"""

from __future__ import annotations

import torch

__all__ = ["gather_patches", "gather_taps", "out_size", "pixel_coords"]


def out_size(size: int, k: int, stride: int, dilation: int) -> int:
    """Output length of a conv along one axis of (padded) input length ``size``, kernel ``k``, no padding."""
    return (size - dilation * (k - 1) - 1) // stride + 1


def pixel_coords(idx: torch.Tensor, out_w: int, out_hw: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat output-pixel indices ``(sample, row, column)`` (``out_hw`` pixels per sample, rows ``out_w`` wide) →
    sample, row and column."""
    bi, rest = idx // out_hw, idx % out_hw
    return bi, rest // out_w, rest % out_w


def gather_taps(h: torch.Tensor, bi: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, kernel_size, stride,
                dilation) -> torch.Tensor:
    """The patches a conv (no padding: ``h (B, C, H, W)`` is already padded) reads at the output pixels
    ``(bi, oy, ox)`` (:func:`pixel_coords`, ``n`` of them), as ``(n, P, C)``:
    ``u[i, i_k·kw + j_k, c] = h[b_i, c, oy_i·sy + i_k·dy, ox_i·sx + j_k·dx]``."""
    (kh, kw), (sy, sx), (dy, dx) = kernel_size, stride, dilation
    rows = (oy * sy)[:, None] + torch.arange(kh, device=h.device).repeat_interleave(kw)[None] * dy  # (n, P)
    cols = (ox * sx)[:, None] + torch.arange(kw, device=h.device).repeat(kh)[None] * dx  # (n, P)
    return h.permute(0, 2, 3, 1)[bi[:, None], rows, cols]  # channels-last rows, contiguous reads


def gather_patches(h: torch.Tensor, bi: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, kernel_size, stride,
                   dilation) -> torch.Tensor:
    """:func:`gather_taps` as ``(n, C·P)``, channel-major: ``u[i, c·P + (i_k·kw + j_k)]``."""
    u = gather_taps(h, bi, oy, ox, kernel_size, stride, dilation)  # (n, P, C)
    return u.transpose(1, 2).reshape(len(bi), -1)
