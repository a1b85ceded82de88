"""The replacement modules: depthwise-separable stand-ins for a dense ``nn.Conv2d``.

Both forms look like a conv to the code around them (``in_channels``, ``out_channels``, ``kernel_size``, ``stride``,
``padding``, ``dilation``, ``groups``, ``padding_mode``, ``bias``) and are built from a trained conv by
``from_conv``. The spatial part of the original conv (kernel, stride, padding incl. ``'same'``, padding mode,
dilation) lives entirely in the depthwise conv; the 1×1 convs carry no padding and no stride, so the replacement has
exactly the original's output shape and, at full rank, its exact output:

* padding commutes with a 1×1 conv that has no bias (zeros map to zeros; reflect/replicate/circular copy pixels,
  and a per-pixel linear map commutes with copying), so the first 1×1 of pw-dw-pw may run before the padding;
* the original bias goes on the last 1×1 conv.

**Layouts.** The same factors can be computed in several ways that give identical outputs and differ, sometimes by
several times, in speed (``set_layout``; :mod:`separify.planning.latency` measures them and picks the fastest for a target):

* dw-pw with multiplier ``K``: ``"multiplier"`` (one depthwise conv with channel multiplier K, groups M),
  ``"split"`` (K depthwise convs with multiplier 1, their outputs interleaved, then the 1×1; exported to ONNX, and
  written by the ONNX pass, as K ``Conv`` → ``Concat`` → ``Conv`` with the 1×1 weights in the concatenated order),
  ``"repeat"``
  (each input channel repeated K times, then a depthwise conv with multiplier 1 on M·K channels; exported to ONNX,
  and written by the ONNX pass, as ``Tile`` → ``Conv`` → ``Conv`` with the factors permuted to the tiled order),
  ``"branches"`` (K depthwise → 1×1 branches, each using its slice of the 1×1 weights, summed).
* pw-dw-pw with rank ``R``: ``"plain"``, or ``"padN"`` (R rounded up to a multiple of N with zero terms, for
  kernels that prefer channel counts in multiples of 8 or 16).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from separify.core import decompose as dec
from separify.errors import ConfigError, UnsupportedLayerError

__all__ = ["SeparableConv2d", "DwPwConv2d", "PwDwPwConv2d", "FORMS", "register_form", "why_not_convertible"]

FORMS: dict[str, type["SeparableConv2d"]] = {}


def register_form(name: str) -> Callable[[type], type]:
    """Register a replacement form under ``name`` (used by ``method=`` and ``--method``); duplicates raise."""

    def wrap(cls: type) -> type:
        if name in FORMS:
            raise ValueError(f"a separable form named {name!r} is already registered ({FORMS[name].__name__})")
        FORMS[name] = cls
        cls.method = name
        return cls

    return wrap


def why_not_convertible(conv: nn.Module) -> str | None:
    """``None`` if ``conv`` can be replaced exactly by a separable form, else the reason it cannot."""
    if isinstance(conv, nn.Conv2d) and nn.utils.parametrize.is_parametrized(conv):
        return "weight is parametrized (torch.nn.utils.parametrize); remove the parametrization first"
    if type(conv) is not nn.Conv2d:
        if isinstance(conv, nn.Conv2d):
            return f"{type(conv).__name__} subclasses nn.Conv2d and may change its forward; only plain nn.Conv2d is converted"
        if isinstance(conv, nn.modules.conv._ConvNd):
            return f"{type(conv).__name__} is not a 2-D convolution"
        return f"{type(conv).__name__} is not an nn.Conv2d"
    if conv.transposed:
        return "transposed convolution"
    if conv.groups != 1:
        if conv.groups == conv.in_channels:
            return f"already depthwise (groups={conv.groups})"
        return f"grouped conv (groups={conv.groups})"
    if tuple(conv.kernel_size) == (1, 1):
        return "1×1 conv (already pointwise)"
    if not conv.weight.is_floating_point() or conv.weight.is_complex():
        return f"weight dtype {conv.weight.dtype} is not a real floating-point type"
    return None


class SeparableConv2d(nn.Module):
    """Common conv-like interface of the separable forms. Subclasses set ``method`` and build the convs."""

    method: str = ""
    #: the layouts ``set_layout`` accepts (pw-dw-pw also accepts ``"padN"``); the first is the default
    LAYOUTS: tuple[str, ...] = ()

    def layouts(self) -> list[str]:
        """The distinct equivalent layouts worth measuring for this module's rank."""
        raise NotImplementedError

    def set_layout(self, layout: str) -> "SeparableConv2d":
        """Compute the same function in another way (see the module docstring); returns ``self``."""
        raise NotImplementedError

    def _set_conv_attrs(self, conv_dw: nn.Conv2d, in_channels: int, out_channels: int, rank: int) -> None:
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.rank = rank
        self.kernel_size = conv_dw.kernel_size
        self.stride = conv_dw.stride
        self.padding = conv_dw.padding
        self.dilation = conv_dw.dilation
        self.padding_mode = conv_dw.padding_mode
        self.groups = 1
        self.transposed = False
        self.output_padding = (0, 0)
        self.layout = self.LAYOUTS[0]
        self.decomposition_error: float | None = None  # ‖W − Ŵ‖/‖W‖, set by from_conv
        self.predicted_output_error: float | None = None  # with calibration moments: see decompose.DwPwFactors

    @property
    def bias(self) -> nn.Parameter | None:
        """The bias of the whole layer (it lives on the last 1×1 conv)."""
        return self._last().bias

    def _last(self) -> nn.Conv2d:
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense kernel ``(out_channels, in_channels, kh, kw)``."""
        raise NotImplementedError

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` computing exactly what this module computes."""
        ref = self._last()
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, bias=self.bias is not None, padding_mode=self.padding_mode,
            device=ref.weight.device, dtype=ref.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}"
        if self.stride != (1, 1):
            s += f", stride={self.stride}"
        if self.padding not in ((0, 0), "valid"):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        if self.layout != self.LAYOUTS[0]:
            s += f", layout={self.layout!r}"
        return s

    @classmethod
    def like(cls, conv: nn.Conv2d, rank: int, *, device=None) -> "SeparableConv2d":
        """An untrained replacement with ``conv``'s shape, stride, padding, dilation, padding mode, bias and dtype
        (on ``conv``'s device unless ``device`` is given, e.g. ``"meta"`` to count FLOPs)."""
        return cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, rank, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device=conv.weight.device if device is None else device, dtype=conv.weight.dtype,
        )

    def _finish_from(self, conv: nn.Conv2d, rel_error: float, data_error: float | None = None) -> "SeparableConv2d":
        if conv.bias is not None:
            with torch.no_grad():
                self.bias.copy_(conv.bias)
        self.decomposition_error = rel_error
        self.predicted_output_error = data_error
        return self

    @staticmethod
    def _require_convertible(conv: nn.Module) -> nn.Conv2d:
        reason = why_not_convertible(conv)
        if reason is not None:
            raise UnsupportedLayerError(f"cannot make a separable replacement: {reason}")
        return conv  # type: ignore[return-value]


def _dw_conv(channels_in: int, channels_out: int, kernel_size, stride, padding, dilation, padding_mode, **kw):
    return nn.Conv2d(
        channels_in, channels_out, kernel_size, stride=stride, padding=padding, dilation=dilation,
        groups=channels_in, bias=False, padding_mode=padding_mode, **kw,
    )


@register_form("dw-pw")
class DwPwConv2d(SeparableConv2d):
    """Depthwise kh×kw conv with channel multiplier ``rank`` (K), then a 1×1 conv: ``(B, M, H, W) → (B, N, H', W')``.

    ``conv_dw``: ``M → M·K`` channels, groups ``M``, with the original stride/padding/dilation/padding mode.
    ``conv_pw``: ``M·K → N``, 1×1, carrying the original bias. Multiply-adds per output pixel: ``K·M·(kh·kw + N)``.
    Layouts (same function): ``"multiplier"`` (the default), ``"split"``, ``"repeat"``, ``"branches"`` (module
    docstring).
    """

    LAYOUTS = ("multiplier", "split", "repeat", "branches")

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size, rank: int, *, stride=1, padding=0, dilation=1,
        bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None,
    ) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.conv_dw = _dw_conv(in_channels, in_channels * rank, kernel_size, stride, padding, dilation, padding_mode, **kw)
        self.conv_pw = nn.Conv2d(in_channels * rank, out_channels, 1, bias=bias, **kw)
        self._set_conv_attrs(self.conv_dw, in_channels, out_channels, rank)

    def _last(self) -> nn.Conv2d:
        return self.conv_pw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "multiplier" or self.rank == 1:
            return self.conv_pw(self.conv_dw(x))  # (B, M, H, W) → (B, M·K, H', W') → (B, N, H', W')
        m, k, dw = self.in_channels, self.rank, self.conv_dw
        padding = dw.padding
        if dw.padding_mode != "zeros":  # pad once, as nn.Conv2d does, then convolve unpadded
            x, padding = F.pad(x, dw._reversed_padding_repeated_twice, mode=dw.padding_mode), 0
        w = dw.weight  # (M·K, 1, kh, kw), channel m·K + j: filter j of input channel m (in every layout)
        if self.layout == "repeat":
            if torch.onnx.is_in_onnx_export():  # as the ONNX pass writes it: Tile, factors in the tiled order
                wk, pk = self.repeat_factors()  # (B, M, H, W) → (B, K·M, H, W): channel j·M + m = input channel m
                return F.conv2d(F.conv2d(x.repeat(1, k, 1, 1), wk, None, dw.stride, padding, dw.dilation, m * k),
                                pk, self.conv_pw.bias)
            # eager: no copy of the weights; (B, M, H, W) → (B, M·K, H, W), channel m·K + j = input channel m
            h = F.conv2d(x.repeat_interleave(k, dim=1), w, None, dw.stride, padding, dw.dilation, m * k)
        elif self.layout == "split":  # K depthwise convs (B, M, H', W'), interleaved to (B, M·K, H', W')
            hs = [F.conv2d(x, w[j::k], None, dw.stride, padding, dw.dilation, m) for j in range(k)]
            if torch.onnx.is_in_onnx_export():  # as the ONNX pass writes it: Concat, pointwise in the concat order
                return F.conv2d(torch.cat(hs, dim=1), self.repeat_factors()[1], self.conv_pw.bias)  # j·M + m
            h = torch.stack(hs, dim=2).flatten(1, 2)  # channel m·K + j
        else:  # branches: K depthwise → 1×1 branches (B, M, H', W') → (B, N, H', W'), summed
            pw, out = self.conv_pw.weight, None
            for j in range(k):
                h = F.conv2d(x, w[j::k], None, dw.stride, padding, dw.dilation, m)
                y = F.conv2d(h, pw[:, j::k], self.conv_pw.bias if j == k - 1 else None)
                out = y if out is None else out + y
            return out
        return self.conv_pw(h)

    def repeat_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors in the ``repeat`` layout's channel order, ``j·M + m`` (the input tiled K times) instead of
        ``m·K + j``: depthwise ``(K·M, 1, kh, kw)``, pointwise ``(N, K·M, 1, 1)``."""
        m, k = self.in_channels, self.rank
        dw, pw = self.conv_dw.weight, self.conv_pw.weight
        return (dw.reshape(m, k, *dw.shape[1:]).transpose(0, 1).reshape(dw.shape),
                pw.reshape(pw.shape[0], m, k, 1, 1).transpose(1, 2).reshape(pw.shape))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(depthwise (M·K, 1, kh, kw), pointwise (N, M·K, 1, 1))``, channel ``m·K + k`` = filter k of input
        channel m. Every layout keeps this storage (so state dicts do not depend on the layout); only the forward
        differs, and it calls ``conv_dw``/``conv_pw`` as modules (hooks fire) in the multiplier layout only."""
        return self.conv_dw.weight, self.conv_pw.weight

    def layouts(self) -> list[str]:
        return list(self.LAYOUTS) if self.rank > 1 else ["multiplier"]

    def set_layout(self, layout: str) -> "DwPwConv2d":
        if layout not in self.LAYOUTS:
            raise ConfigError(f"unknown dw-pw layout {layout!r}; choose one of {', '.join(self.LAYOUTS)}")
        self.layout = layout
        return self

    def dense_weight(self) -> torch.Tensor:
        return dec.dwpw_reconstruct(*self.factors(), self.in_channels)

    @staticmethod
    def max_rank(conv: nn.Conv2d) -> int:
        """Rank at which the factorisation is exact: ``min(out_channels, kh·kw)``."""
        return dec.dwpw_max_rank(conv.weight.shape)

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, rank: int | None = None, *, cov: dec.InputCovariance | None = None, damp: float = 0.01,
    ) -> "DwPwConv2d":
        """Replace ``conv`` by its rank-``rank`` per-input-channel SVD (exact when ``rank`` is None or maximal).

        Args:
            conv: a plain ``nn.Conv2d`` with ``groups == 1`` and a kernel larger than 1×1.
            rank: channel multiplier ``K`` in ``[1, min(out_channels, kh·kw)]``; ``None`` means the exact maximum.
            cov, damp: input moments from calibration data, to minimise the output error instead of the weight
                error (see :func:`separify.core.decompose.dwpw_decompose`).
        """
        conv = cls._require_convertible(conv)
        factors = dec.dwpw_decompose(conv.weight, cls.max_rank(conv) if rank is None else rank, cov=cov, damp=damp)
        mod = cls.like(conv, factors.rank)
        with torch.no_grad():
            mod.conv_dw.weight.copy_(factors.depthwise)
            mod.conv_pw.weight.copy_(factors.pointwise)
        return mod._finish_from(conv, factors.rel_error, factors.data_error)


@register_form("pw-dw-pw")
class PwDwPwConv2d(SeparableConv2d):
    """1×1 conv ``M → R``, depthwise kh×kw on ``R`` channels, 1×1 conv ``R → N`` (CP form, rank ``R``).

    ``conv_pw_in`` has no bias (so it commutes with the padding), ``conv_dw`` carries the original
    stride/padding/dilation/padding mode, ``conv_pw_out`` the original bias. Multiply-adds: ``R·M`` per input pixel
    plus ``R·(kh·kw + N)`` per output pixel. Layouts: ``"plain"``, or ``"padN"``: ``rank`` rounded up to a multiple
    of N by zero terms (``rank`` is then the padded width).
    """

    LAYOUTS = ("plain",)

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size, rank: int, *, stride=1, padding=0, dilation=1,
        bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None,
    ) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.conv_pw_in = nn.Conv2d(in_channels, rank, 1, bias=False, **kw)
        self.conv_dw = _dw_conv(rank, rank, kernel_size, stride, padding, dilation, padding_mode, **kw)
        self.conv_pw_out = nn.Conv2d(rank, out_channels, 1, bias=bias, **kw)
        self._set_conv_attrs(self.conv_dw, in_channels, out_channels, rank)

    def _last(self) -> nn.Conv2d:
        return self.conv_pw_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, M, H, W) → (B, R, H, W) → (B, R, H', W') → (B, N, H', W')
        return self.conv_pw_out(self.conv_dw(self.conv_pw_in(x)))

    def dense_weight(self) -> torch.Tensor:
        return dec.cp_reconstruct(self.conv_pw_in.weight, self.conv_dw.weight, self.conv_pw_out.weight)

    def layouts(self) -> list[str]:
        widths = {-(-self.rank // n) * n: f"pad{n}" for n in (16, 8)}  # a pad8 that is also a pad16 is one layout
        return ["plain"] + [layout for width, layout in sorted(widths.items()) if width != self.rank]

    def set_layout(self, layout: str) -> "PwDwPwConv2d":
        """``"padN"`` widens the module to ``ceil(rank/N)·N`` channels whose extra terms are zero (the output is
        unchanged, FLOPs grow); the padding cannot be undone (``"plain"`` keeps the current width)."""
        if layout == "plain" or layout == self.layout:
            return self
        multiple = int(layout[3:]) if layout.startswith("pad") and layout[3:].isdigit() else 0
        if multiple <= 0:
            raise ConfigError(f"unknown pw-dw-pw layout {layout!r}; choose plain or padN (N a positive integer)")
        width = -(-self.rank // multiple) * multiple
        if width != self.rank:
            ref = self.conv_pw_out.weight
            wide = type(self)(self.in_channels, self.out_channels, self.kernel_size, width, stride=self.stride,
                              padding=self.padding, dilation=self.dilation, bias=self.bias is not None,
                              padding_mode=self.padding_mode, device=ref.device, dtype=ref.dtype)
            with torch.no_grad():
                for name in ("conv_pw_in", "conv_dw", "conv_pw_out"):  # the same modules (hooks stay), wider weights
                    new, old = getattr(wide, name), getattr(self, name)
                    new.weight.zero_()  # (R', M, 1, 1), (R', 1, kh, kw), (N, R', 1, 1): the extra terms are zero
                    new.weight[tuple(slice(0, d) for d in old.weight.shape)] = old.weight
                    old.weight = nn.Parameter(new.weight, requires_grad=old.weight.requires_grad)
                    old.in_channels, old.out_channels, old.groups = new.in_channels, new.out_channels, new.groups
            self.rank = width
        self.layout = layout
        return self

    @staticmethod
    def max_rank(conv: nn.Conv2d) -> int:
        """Smallest rank with an exact closed-form factorisation (see :func:`separify.core.decompose.cp_exact_rank`)."""
        return dec.cp_exact_rank(conv.weight.shape)

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, rank: int | None = None, *, max_iter: int = 25,
        tol: float = 1e-4, seed: int = 0, cov: dec.InputCovariance | None = None, damp: float = 0.01,
    ) -> "PwDwPwConv2d":
        """Replace ``conv`` by a rank-``rank`` CP factorisation (exact when ``rank`` is None or ≥ :meth:`max_rank`).

        Args:
            conv: a plain ``nn.Conv2d`` with ``groups == 1`` and a kernel larger than 1×1.
            rank: number ``R`` of intermediate channels (≥ 1); ``None`` means :meth:`max_rank`.
            max_iter, tol, seed: ALS controls, see :func:`separify.core.decompose.cp_decompose`.
            cov, damp: input moments from calibration data, to fit the whitened kernel (predicted output error).
        """
        conv = cls._require_convertible(conv)
        rank = cls.max_rank(conv) if rank is None else rank
        factors = dec.cp_decompose(conv.weight, rank, max_iter=max_iter, tol=tol, seed=seed, cov=cov, damp=damp)
        mod = cls.like(conv, factors.rank)
        with torch.no_grad():
            mod.conv_pw_in.weight.copy_(factors.pw_in)
            mod.conv_dw.weight.copy_(factors.depthwise)
            mod.conv_pw_out.weight.copy_(factors.pw_out)
        return mod._finish_from(conv, factors.rel_error, factors.data_error)


def form(method: str) -> type[SeparableConv2d]:
    """The module class registered for ``method``."""
    try:
        return FORMS[method]
    except KeyError:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(sorted(FORMS))}") from None
