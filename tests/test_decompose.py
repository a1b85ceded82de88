"""Decomposition math and replacement modules: exact at full rank over many conv configurations, error monotone in
rank, dtypes, and a cross-check of the CP solver against tensorly's."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from separify import DwPwConv2d, PwDwPwConv2d
from separify.core import decompose as dec
from separify.errors import BadWeightsError, ConfigError

FORMS = {"dw-pw": DwPwConv2d, "pw-dw-pw": PwDwPwConv2d}


@st.composite
def conv_configs(draw):
    """A random nn.Conv2d configuration nn.Conv2d itself accepts, with a kernel larger than 1×1."""
    kh = draw(st.integers(1, 5))
    kw = draw(st.integers(1 if kh > 1 else 2, 5))
    padding_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    stride = (1, 1) if padding_kind == "same" else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    if padding_kind == "int":
        padding = draw(st.integers(0, 2))
    elif padding_kind == "tuple":
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    else:
        padding = padding_kind
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    return dict(
        in_channels=draw(st.integers(1, 6)),
        out_channels=draw(st.integers(1, 7)),
        kernel_size=(kh, kw),
        stride=stride,
        padding=padding,
        dilation=dilation,
        bias=draw(st.booleans()),
        padding_mode=padding_mode,
    )


def _input_for(cfg, batch=2):
    kh, kw = cfg["kernel_size"]
    dh, dw = cfg["dilation"]
    # big enough for the receptive field, and for reflect padding (pad < input size)
    h = (kh - 1) * dh + 6
    w = (kw - 1) * dw + 7
    return torch.randn(batch, cfg["in_channels"], h, w, dtype=torch.float64)


def _make_conv(cfg) -> nn.Conv2d:
    conv = nn.Conv2d(**cfg, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.normal_()
        if conv.bias is not None:
            conv.bias.normal_()
    return conv


def _ids(cfg) -> str:
    return (f"{cfg['in_channels']}to{cfg['out_channels']}_k{cfg['kernel_size'][0]}x{cfg['kernel_size'][1]}"
            f"_s{cfg['stride'][0]}{cfg['stride'][1]}_p{cfg['padding']}_{cfg['padding_mode']}")


@pytest.mark.parametrize("method", sorted(FORMS))
@settings(max_examples=130, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=conv_configs())
def test_full_rank_is_exact(method, cfg):
    """At the exact rank, the replacement computes the original conv's output (float64, tight tolerance)."""
    conv = _make_conv(cfg)
    x = _input_for(cfg)
    sep = FORMS[method].from_conv(conv)
    assert sep.decomposition_error < 1e-10, _ids(cfg)
    torch.testing.assert_close(sep(x), conv(x), rtol=1e-10, atol=1e-10, msg=lambda m: f"{method} {_ids(cfg)}: {m}")
    torch.testing.assert_close(sep.dense_weight(), conv.weight, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", sorted(FORMS))
@settings(max_examples=40, deadline=None)
@given(cfg=conv_configs())
def test_replacement_is_conv_like(method, cfg):
    conv = _make_conv(cfg)
    sep = FORMS[method].from_conv(conv)
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "padding_mode",
                 "groups"):
        assert getattr(sep, attr) == getattr(conv, attr), attr
    assert (sep.bias is None) == (conv.bias is None)
    x = _input_for(cfg)
    torch.testing.assert_close(sep.to_dense()(x), conv(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(8, 4, 3, 3), (16, 3, 5, 5), (6, 6, 3, 1), (32, 16, 3, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_dwpw_error_non_increasing_and_matches_reconstruction(shape):
    w = torch.randn(*shape, dtype=torch.float64)
    prev = math.inf
    spectra = dec.dwpw_spectra(w)
    for k in range(1, dec.dwpw_max_rank(shape) + 1):
        f = dec.dwpw_decompose(w, k)
        actual = float((dec.dwpw_reconstruct(f.depthwise, f.pointwise, shape[1]) - w).norm() / w.norm())
        assert f.rel_error == pytest.approx(actual, rel=1e-9, abs=1e-12)
        assert f.rel_error == pytest.approx(dec.dwpw_error(spectra, k), rel=1e-12, abs=1e-14)
        assert f.rel_error <= prev + 1e-12
        prev = f.rel_error
    assert prev < 1e-12


@pytest.mark.parametrize("shape", [(8, 4, 3, 3), (12, 6, 3, 3), (6, 10, 3, 2)], ids=lambda s: "x".join(map(str, s)))
def test_cp_error_non_increasing_in_rank(shape):
    w = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    prev, f = math.inf, None
    for r in range(1, dec.cp_exact_rank(shape) + 1):
        f = dec.cp_decompose(w, r, max_iter=60, warm_start=f)  # a sweep passes each fit on
        actual = float((dec.cp_reconstruct(f.pw_in, f.depthwise, f.pw_out) - w).norm() / w.norm())
        assert f.rel_error == pytest.approx(actual, rel=1e-9, abs=1e-12)
        assert f.rel_error <= prev + 1e-12, (r, f.rel_error, prev)
        prev = f.rel_error
    assert prev < 1e-10


def test_cp_never_worse_than_dwpw_with_same_channel_budget():
    """R = M·K channels can express dw-pw at rank K exactly, so the CP fit must be at least as good."""
    w = torch.randn(32, 16, 3, 3, generator=torch.Generator().manual_seed(2))
    for k in (1, 2, 3):
        assert dec.cp_decompose(w, 16 * k).rel_error <= dec.dwpw_decompose(w, k).rel_error + 1e-5


def test_cp_recovers_a_low_rank_kernel():
    g = torch.Generator().manual_seed(3)
    a, b, d = torch.randn(24, 5, generator=g), torch.randn(12, 5, generator=g), torch.randn(9, 5, generator=g)
    w = torch.einsum("nr,mr,pr->nmp", a, b, d).reshape(24, 12, 3, 3).double()
    assert dec.cp_decompose(w, 5, max_iter=500, tol=0).rel_error < 1e-6


def test_cp_is_deterministic():
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(4))
    f1, f2 = dec.cp_decompose(w, 12, seed=7), dec.cp_decompose(w, 12, seed=7)
    assert torch.equal(f1.pw_in, f2.pw_in) and torch.equal(f1.depthwise, f2.depthwise)
    assert f1.rel_error == f2.rel_error


def test_cp_solver_matches_tensorly_from_the_same_start():
    """Our ALS sweep is the textbook one: from the same start it must fit as well as tensorly's parafac."""
    tl = pytest.importorskip("tensorly")
    from tensorly.cp_tensor import CPTensor
    from tensorly.decomposition import parafac

    g = torch.Generator().manual_seed(5)
    w = torch.randn(10, 6, 3, 3, dtype=torch.float64, generator=g)
    t = w.reshape(10, 6, 9)
    rank, iters = 7, 30
    start = [torch.randn(n, rank, dtype=torch.float64, generator=g) for n in t.shape]
    cp = parafac(t.numpy(), rank, n_iter_max=iters, init=CPTensor((None, [f.numpy() for f in start])), tol=0)
    ref = float(torch.from_numpy(tl.cp_to_tensor(cp) - t.numpy()).norm() / t.norm())
    als = dec._ALS(t)
    a, b, d = start
    for _ in range(iters):
        a, b, d, _err2 = als.sweep(a, b, d)
    ours = float((dec._cp_dense(a, b, d) - t).norm() / t.norm())
    assert ours == pytest.approx(ref, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("method", sorted(FORMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision_weights_keep_their_dtype(method, dtype):
    conv = nn.Conv2d(8, 16, 3, padding=1).to(dtype)
    sep = FORMS[method].from_conv(conv)
    assert all(p.dtype == dtype for p in sep.parameters())
    x = torch.randn(1, 8, 10, 10)
    ref = conv.float()(x)
    out = sep.float()(x)
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    assert float((out - ref).norm() / ref.norm()) < tol


def test_impossible_ranks_are_refused():
    w = torch.randn(8, 4, 3, 3)
    with pytest.raises(ConfigError, match="largest useful rank"):
        dec.dwpw_decompose(w, 10)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="positive integer"):
            dec.dwpw_decompose(w, bad)
        with pytest.raises(ConfigError, match="positive integer"):
            dec.cp_decompose(w, bad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_are_refused(bad):
    conv = nn.Conv2d(4, 4, 3)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = bad
    for cls in FORMS.values():
        with pytest.raises(BadWeightsError, match="NaN or inf"):
            cls.from_conv(conv)


def test_energy_rank_selection():
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64)
    spectra = dec.dwpw_spectra(w)
    for energy in (0.3, 0.6, 0.9, 1.0):
        k = dec.dwpw_rank_for_energy(spectra, energy)
        assert 1 - dec.dwpw_error(spectra, k) ** 2 >= energy - 1e-9
        if k > 1:
            assert 1 - dec.dwpw_error(spectra, k - 1) ** 2 < energy
    r = dec.cp_rank_for_energy(w, 0.9)
    assert dec.cp_error_lower_bound(w, [r])[0] ** 2 <= 0.1 + 1e-9
