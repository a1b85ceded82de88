"""Calibration-aware initialisation: the least-squares refit of the last 1×1 conv."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import separify
from separify.calibration import as_batches
from separify.errors import SeparifyError


def _correlated_inputs(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Images whose channels are one fixed mixture of 2 smooth latent maps: strongly correlated, as real activations
    are. ``seed`` draws the latent maps (the mixture is the same for every seed: one distribution)."""
    mix = torch.randn(channels, 2, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 2, size, size, generator=g)
    latent = nn.functional.avg_pool2d(latent, 3, stride=1, padding=1)
    return torch.einsum("cl,nlhw->nchw", mix, latent) + 0.01 * torch.randn(n, channels, size, size, generator=g)


class OneConv(nn.Module):
    def __init__(self, cin=16, cout=24, k=3):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=1)

    def forward(self, x):
        return self.conv(x)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method, rank", [("dw-pw", 1), ("dw-pw", 2), ("pw-dw-pw", 8), ("pw-dw-pw", 16)])
def test_calibration_lowers_output_error_on_correlated_inputs(method, rank):
    torch.manual_seed(0)
    model = OneConv().eval()
    calib, test = _correlated_inputs(64, 16, 12, seed=1), _correlated_inputs(32, 16, 12, seed=2)
    plain = separify.convert(model, example_inputs=calib[:1], method=method, rank=rank)
    fitted = separify.convert(model, example_inputs=calib[:1], method=method, rank=rank, calibration=calib)
    rec = fitted.converted[0]
    assert rec.calib_error_after < rec.calib_error_before
    with torch.no_grad():
        ref = model(test)
        e_plain, e_fit = _rel(plain.model(test), ref), _rel(fitted.model(test), ref)
    assert e_fit < 0.7 * e_plain, (e_fit, e_plain)  # and it generalises to held-out inputs


@pytest.mark.parametrize("method", ["dw-pw", "pw-dw-pw"])
def test_refit_is_exact_at_full_rank(method):
    model = OneConv(6, 8).double().eval()
    calib = torch.randn(16, 6, 10, 10, dtype=torch.float64)
    res = separify.convert(model, example_inputs=calib[:1], method=method, rank=10_000, require_saving=False,
                           calibration=calib, calib_ridge=0.0)
    assert res.converted[0].calib_error_after < 1e-12  # residual form: no cancellation in the statistics
    x = torch.randn(4, 6, 10, 10, dtype=torch.float64)
    torch.testing.assert_close(res.model(x), model(x), rtol=1e-12, atol=1e-12)


def test_calibrated_resnet_beats_weight_svd_and_keeps_bn_stats():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    calib = torch.randn(8, 3, 32, 32)
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()  # calibration must not update BatchNorm statistics, even for a model left in training mode
    res = separify.convert(model, example_inputs=calib[:1], method="dw-pw", rank=2, calibration=calib)
    assert model.training and all(torch.equal(stats[k], v) for k, v in model.state_dict().items())
    assert all(r.calib_error_after <= r.calib_error_before for r in res.converted)
    assert len(res.converted) == 17


def test_bad_calibration_data():
    model = OneConv().eval()
    x = torch.randn(1, 16, 8, 8)
    with pytest.raises(SeparifyError, match="does not fit the model"):
        separify.convert(model, example_inputs=x, rank=1, calibration=torch.randn(4, 3, 8, 8))
    with pytest.raises(SeparifyError, match="empty"):
        separify.convert(model, example_inputs=x, rank=1, calibration=[])
    with pytest.raises(SeparifyError, match="floating point"):
        separify.convert(model, example_inputs=x, rank=1, calibration=torch.zeros(4, 16, 8, 8, dtype=torch.uint8))


def test_as_batches_limits_and_unpacks():
    data = [(torch.randn(5, 2), torch.zeros(5)) for _ in range(3)]
    batches = as_batches(data, limit=7)
    assert [len(b) for b in batches] == [7]  # one sample shape: gathered into one batch
    assert [len(b) for b in as_batches(torch.randn(300, 2))] == [128, 128, 44]


# ------------------------------------------------------------------------------------ input moments and whitening


def _random_cov(m: int, p: int, seed: int) -> "separify.core.decompose.InputCovariance":
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, p, p, generator=g, dtype=torch.float64)
    spatial = a @ a.transpose(1, 2) + 0.05 * torch.eye(p, dtype=torch.float64)  # anisotropic, well-posed
    c = torch.randn(m, m, generator=g, dtype=torch.float64)
    return separify.core.decompose.InputCovariance(c @ c.T + 0.05 * torch.eye(m, dtype=torch.float64), spatial, 1)


def _data_error(w: torch.Tensor, w_hat: torch.Tensor, sqrt_spatial: torch.Tensor) -> float:
    """‖(W − Ŵ)[:, m] S_m‖ summed over channels (the objective of the whitened dw-pw truncation)."""
    n, m = w.shape[:2]
    d = (w - w_hat).reshape(n, m, -1)
    return float(torch.einsum("nmp,mpq->nmq", d, sqrt_spatial).norm())


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_whitened_dwpw_minimises_the_output_error_per_channel(rank):
    from separify.core import decompose as dec

    w = torch.randn(8, 5, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    cov = _random_cov(5, 9, seed=4)
    vals, vecs = torch.linalg.eigh(cov.spatial)
    root = (vecs * vals.sqrt()[:, None, :]) @ vecs.transpose(1, 2)  # exact S_m (no damping)
    plain = dec.dwpw_decompose(w, rank)
    white = dec.dwpw_decompose(w, rank, cov=cov, damp=0.0)
    rec = lambda f: dec.dwpw_reconstruct(f.depthwise, f.pointwise, 5)  # noqa: E731
    e_plain, e_white = _data_error(w, rec(plain), root), _data_error(w, rec(white), root)
    assert e_white < e_plain
    # Eckart–Young: the whitened truncation reaches the tail of the whitened spectra, which it reports
    total = float(torch.einsum("nmp,mpq->nmq", w.reshape(8, 5, 9), root).norm())
    assert white.data_error == pytest.approx(e_white / total, rel=1e-9)
    assert plain.rel_error <= white.rel_error  # and pays for it in weight space


@pytest.mark.parametrize("method", ["dw-pw", "pw-dw-pw"])
def test_whitened_decomposition_is_exact_at_full_rank(method):
    from separify.core import decompose as dec

    w = torch.randn(6, 4, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    cov = _random_cov(4, 6, seed=6)
    if method == "dw-pw":
        f = dec.dwpw_decompose(w, dec.dwpw_max_rank(w.shape), cov=cov)
        w_hat = dec.dwpw_reconstruct(f.depthwise, f.pointwise, 4)
    else:
        f = dec.cp_decompose(w, dec.cp_exact_rank(w.shape), cov=cov)
        w_hat = dec.cp_reconstruct(f.pw_in, f.depthwise, f.pw_out)
    torch.testing.assert_close(w_hat, w, rtol=1e-10, atol=1e-10)


def test_whitened_cp_fits_the_output_better_under_anisotropic_inputs():
    from separify.core import decompose as dec

    g = torch.Generator().manual_seed(7)
    w = torch.randn(16, 12, 3, 3, dtype=torch.float64, generator=g)
    mix = torch.randn(12, 3, dtype=torch.float64, generator=g)  # inputs live near a 3-dim channel subspace
    channel = mix @ mix.T + 1e-3 * torch.eye(12, dtype=torch.float64)
    spatial = torch.eye(9, dtype=torch.float64).repeat(12, 1, 1)
    cov = dec.InputCovariance(channel, spatial, 1)
    plain = dec.cp_decompose(w, 12, cov=None)
    white = dec.cp_decompose(w, 12, cov=cov, damp=1e-4)
    s = torch.linalg.cholesky(channel)  # ‖E ×₂ Lᵀ‖ = ‖E Σ^{1/2}‖ for any square root

    def out_err(f):
        e = (dec.cp_reconstruct(f.pw_in, f.depthwise, f.pw_out) - w).reshape(16, 12, 9)
        return float(torch.einsum("nmp,mi->nip", e, s).norm())

    assert out_err(white) < 0.5 * out_err(plain)


def test_observed_moments_match_the_patches_the_conv_reads():
    """The moments come from F.pad + unfold; check them against patches extracted by a conv with one-hot filters
    and the same padding mode / 'same' padding / stride / dilation (torch's own conv padding logic)."""
    from separify.calibration import observe

    conv = nn.Conv2d(3, 4, (2, 3), padding="same", padding_mode="reflect", dilation=(2, 1), bias=False).double()
    model = nn.Sequential(conv).eval()
    x = torch.randn(5, 3, 9, 8, dtype=torch.float64)
    obs = observe(model, {"0": "0"}, [x[:2], x[2:]])
    cov = obs.covariances["0"]
    p = 6
    taps = nn.Conv2d(3, 3 * p, (2, 3), padding="same", padding_mode="reflect", dilation=(2, 1), groups=3,
                     bias=False).double()
    with torch.no_grad():
        taps.weight.copy_(torch.eye(p, dtype=torch.float64).reshape(p, 1, 2, 3).repeat(3, 1, 1, 1))
        u = taps(x)  # (B, 3·P, H, W): the value of each tap of each patch
    u = u.reshape(5, 3, p, -1).permute(1, 2, 0, 3).reshape(3, p, -1)
    torch.testing.assert_close(cov.spatial, u @ u.transpose(1, 2) / u.shape[-1], rtol=1e-10, atol=1e-10)
    px = x.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(cov.channel, px @ px.T / px.shape[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat(obs.outputs["0"]), model(x))  # kept in float64 for a float64 model


def test_observation_in_small_forwards_gives_the_same_outputs_and_moments(monkeypatch):
    """One sample per forward (the pass splits large batches) changes nothing: same kept outputs, same moments."""
    import separify.calibration.observation as cal

    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 3, stride=2)).double().eval()
    x = torch.randn(6, 3, 10, 10, dtype=torch.float64)
    layers = {"0": "0", "2": "2"}
    whole = cal.observe(model, layers, [x])
    monkeypatch.setattr(cal, "_OBSERVE_BYTES", 1)
    split = cal.observe(model, layers, [x])
    for name in layers:
        torch.testing.assert_close(split.outputs[name], whole.outputs[name], rtol=0, atol=1e-12)
        torch.testing.assert_close(split.covariances[name].spatial, whole.covariances[name].spatial)
        torch.testing.assert_close(split.covariances[name].channel, whole.covariances[name].channel)


@pytest.mark.parametrize("shape, kernel, stride, dilation, dtype, channels_last", [
    ((3, 8, 12, 12), (3, 3), (1, 1), (1, 1), torch.float32, False),
    ((3, 8, 12, 12), (3, 3), (1, 1), (1, 1), torch.bfloat16, True),
    ((2, 5, 13, 11), (3, 5), (2, 1), (1, 2), torch.float32, True),
    ((2, 4, 9, 10), (1, 3), (1, 3), (1, 1), torch.float64, False),
], ids=["3x3", "3x3-bf16-channels-last", "3x5-strided-dilated", "1x3-float64"])
def test_every_patch_moments_equal_those_of_unfold_exactly(shape, kernel, stride, dilation, dtype, channels_last):
    """The patches copied from a strided view are unfold's, in its order: the same sums to the last bit."""
    import separify.calibration.observation as cal

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    conv = nn.Conv2d(shape[1], 2, kernel, stride=stride, dilation=dilation)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    p = kernel[0] * kernel[1]
    u = nn.functional.unfold(x.to(work), kernel, dilation=dilation, stride=stride).view(shape[0] * shape[1], p, -1)
    expected = torch.bmm(u, u.transpose(1, 2)).view(shape[0], shape[1], p, p).sum(0).double()
    torch.testing.assert_close(cal._all_patch_moments(conv, x, work), expected, rtol=0, atol=0)


def test_patch_moments_from_a_sample_are_close_deterministic_and_exact_per_channel(monkeypatch):
    """Beyond ``_MOMENT_PATCHES`` patches in all, the spatial moments come from a seeded sample scaled to the full
    count: close to the exact ones, the same on every run; the channel moments still use every pixel."""
    import separify.calibration.observation as cal
    from separify.calibration.patches import gather_patches, pixel_coords

    conv = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", dilation=(1, 2), bias=False).double()
    model = nn.Sequential(conv).eval()
    x = _correlated_inputs(8, 4, 20).double() + 0.3
    exact = cal.observe(model, {"0": "0"}, [x[:3], x[3:]]).covariances["0"]
    monkeypatch.setattr(cal, "_MOMENT_PATCHES", 800)  # of 8·20·18 = 2,880 patches
    first = cal.observe(model, {"0": "0"}, [x[:3], x[3:]]).covariances["0"]
    again = cal.observe(model, {"0": "0"}, [x[:3], x[3:]]).covariances["0"]
    torch.testing.assert_close(first.spatial, again.spatial, rtol=0, atol=0)
    torch.testing.assert_close(first.channel, exact.channel, rtol=1e-12, atol=1e-12)
    assert first.count == exact.count == 2880
    rel = float((first.spatial - exact.spatial).norm() / exact.spatial.norm())
    assert 0 < rel < 0.1, rel
    # the sampled patches are the ones the conv reads: all of them, gathered, equal unfold's (also strided)
    xp = nn.functional.pad(x, conv._reversed_padding_repeated_twice, mode="reflect")
    for stride in ((1, 1), (2, 3)):
        ho, wo = (22 - 3) // stride[0] + 1, (22 - 5) // stride[1] + 1  # padded 22×22, reach 3 × 5
        n = 8 * ho * wo
        every = gather_patches(xp, *pixel_coords(torch.arange(n), wo, ho * wo), (3, 3), stride, (1, 2))
        unfolded = nn.functional.unfold(xp, (3, 3), dilation=(1, 2), stride=stride).transpose(1, 2).reshape(n, -1)
        torch.testing.assert_close(every, unfolded, rtol=0, atol=0)


def test_freed_memory_is_reused_only_while_calibrating_and_settings_are_restored(monkeypatch):
    """The allocator thresholds are raised inside, set back and the heap trimmed on exit (also on an error); the
    user's own tuning (``MALLOC_MMAP_THRESHOLD_``) or ``SEPARIFY_MALLOPT=0`` switch it off."""
    import separify.calibration.memory as cal

    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("trim", pad))
            return 1

    monkeypatch.setattr(cal, "_glibc", lambda: FakeLibc())
    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "SEPARIFY_MALLOPT"):
        monkeypatch.delenv(var, raising=False)
    raised = [(cal._M_MMAP_THRESHOLD, 1 << 30), (cal._M_TRIM_THRESHOLD, 1 << 30)]
    with pytest.raises(RuntimeError):
        with cal.reuse_freed_memory():
            assert calls == raised
            with cal.reuse_freed_memory():  # nested (or another thread's): nothing set again, nothing restored
                pass
            assert calls == raised
            raise RuntimeError("inside")
    assert calls[2:] == [(cal._M_MMAP_THRESHOLD, 32 << 20), (cal._M_TRIM_THRESHOLD, 64 << 20), ("trim", 0)]
    for var, value in (("MALLOC_MMAP_THRESHOLD_", "65536"), ("MALLOC_TRIM_THRESHOLD_", "0"),
                       ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536"), ("SEPARIFY_MALLOPT", "0"),
                       ("SEPARIFY_MALLOPT", "off")):
        calls.clear()
        with monkeypatch.context() as m:
            m.setenv(var, value)
            with cal.reuse_freed_memory():
                pass
        assert calls == []


class TwoBranches(nn.Module):
    """Two convs with the same weights; the first only ever sees inputs that are one number per image (the same in
    every channel and pixel), so a rank-1 CP model reproduces its output exactly."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 16, 3, padding=1, bias=False, padding_mode="replicate")
        self.b = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight)

    def forward(self, x):
        return self.a(x[:, :1].mean((2, 3), keepdim=True).expand_as(x)) + self.b(x)


def test_data_aware_allocation_gives_rank_where_the_data_needs_it():
    torch.manual_seed(0)
    model = TwoBranches().eval()
    calib = torch.randn(16, 8, 10, 10)
    opts = dict(example_inputs=calib[:1], method="pw-dw-pw", flops=0.4)
    blind = separify.convert(model, **opts, calibration=calib, calib_ranks=False)  # weight-error allocation
    aware = separify.convert(model, **opts, calibration=calib)
    r_blind = {r.name: r.rank for r in blind.converted}
    r_aware = {r.name: r.rank for r in aware.converted}
    assert abs(r_blind["a"] - r_blind["b"]) <= 1  # same weights, same weight error curve (ties: one step apart)
    # branch a's output needs rank 1 on this data; the FLOPs it does not need go to b
    assert r_aware["a"] <= 2 < r_blind["a"] and r_aware["b"] > r_blind["b"]
    assert all("calibration" in r.rank_source for r in aware.converted)
    assert not any("calibration" in r.rank_source for r in blind.converted)
    with torch.no_grad():
        x = torch.randn(8, 8, 10, 10)
        ref = model(x)
        assert _rel(aware.model(x), ref) < 0.9 * _rel(blind.model(x), ref)


def test_calibration_memory_bound_is_a_clear_error():
    model = OneConv().eval()
    x = torch.randn(64, 16, 12, 12)
    with pytest.raises(SeparifyError, match="calib-limit"):
        separify.convert(model, example_inputs=x[:1], rank=2, calibration=x, calib_memory_gb=1e-5)


@pytest.mark.parametrize("method, rank", [("dw-pw", 1), ("pw-dw-pw", 4)])
def test_layerwise_reconstruction_beats_the_refit_alone_and_is_deterministic(method, rank):
    torch.manual_seed(0)
    model = OneConv().eval()
    calib, test = _correlated_inputs(64, 16, 12, seed=1), _correlated_inputs(32, 16, 12, seed=2)
    opts = dict(example_inputs=calib[:1], method=method, rank=rank, calibration=calib)
    refit = separify.convert(model, **opts, calib_steps=0)
    recon = separify.convert(model, **opts, calib_steps=150, calib_lr=3e-3)
    again = separify.convert(model, **opts, calib_steps=150, calib_lr=3e-3)
    assert recon.converted[0].calib_error_after < refit.converted[0].calib_error_after
    with torch.no_grad():
        ref = model(test)
        assert _rel(recon.model(test), ref) < _rel(refit.model(test), ref)  # on held-out inputs too
        torch.testing.assert_close(recon.model(test), again.model(test), rtol=0, atol=0)
    for p in recon.model.parameters():
        assert p.grad is None


def test_reconstruction_settings_are_checked():
    with pytest.raises(SeparifyError, match="calib_steps"):
        separify.ConvertConfig(calib_steps=-1)
    with pytest.raises(SeparifyError, match="calib_lr"):
        separify.ConvertConfig(calib_lr=0)


ALS_CONFIGS = [
    pytest.param(dict(kernel_size=3, padding=1), id="3x3-pad1"),
    pytest.param(dict(kernel_size=3, padding="same", padding_mode="reflect"), id="3x3-same-reflect"),
    pytest.param(dict(kernel_size=3, padding=1, padding_mode="circular", bias=False), id="3x3-circular-nobias"),
    pytest.param(dict(kernel_size=3, stride=2, padding=2, dilation=2), id="3x3-stride2-dil2"),
    pytest.param(dict(kernel_size=(1, 3), padding=(0, 1), padding_mode="replicate"), id="1x3-replicate"),
    pytest.param(dict(kernel_size=(5, 3), stride=(2, 1), padding=(2, 1)), id="5x3-stride21"),
]


@pytest.mark.parametrize("cfg", ALS_CONFIGS)
def test_als_is_exact_at_full_rank_from_a_random_start(cfg):
    from separify.calibration import als_dw_pw
    from separify.core.modules import DwPwConv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, **cfg).double()
    x = torch.randn(3, 5, 11, 12, dtype=torch.float64)
    with torch.no_grad():
        y = conv(x)
    kh, kw = conv.kernel_size
    mod = DwPwConv2d.from_conv(conv, min(7, kh * kw))  # K = min(N, kh·kw): the form is exact
    with torch.no_grad():  # forget the SVD: start from random factors
        for p in mod.parameters():
            p.normal_()
    before, after = als_dw_pw(mod.conv_dw, mod.conv_pw, x, y, iters=100, max_pixels=10**9, tol=0.0)
    assert before > 0.5 and after < 1e-6
    with torch.no_grad():
        torch.testing.assert_close(mod(x), y, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("cfg", ALS_CONFIGS[:4])
@pytest.mark.parametrize("rank", [1, 2])
def test_als_never_increases_the_output_error_and_reports_it_exactly(cfg, rank):
    from separify.calibration import als_dw_pw
    from separify.core.modules import DwPwConv2d

    torch.manual_seed(1)
    conv = nn.Conv2d(6, 9, **cfg).double()
    x = _correlated_inputs(8, 6, 12).double()
    with torch.no_grad():
        y = conv(x)
    mod = DwPwConv2d.from_conv(conv, rank)
    errors = []
    with torch.no_grad():
        start = _rel(mod(x), y)
    for _ in range(4):  # one iteration at a time: each reported error is the true error of the written factors
        before, after = als_dw_pw(mod.conv_dw, mod.conv_pw, x, y, iters=1, max_pixels=10**9, ridge=0.0)
        with torch.no_grad():
            real = _rel(mod(x), y)
        assert after == pytest.approx(real, rel=1e-6, abs=1e-9)
        assert after <= before * (1 + 1e-9)
        errors.append(after)
    assert errors[-1] < 0.9 * start  # and it does fit: the first SVD factors are not output-optimal here


@pytest.mark.parametrize("method, rank", [("dw-pw", 1), ("dw-pw", 2), ("pw-dw-pw", 4)])
def test_calibration_with_als_beats_the_refit_alone(method, rank):
    torch.manual_seed(0)
    model = OneConv().eval()
    calib, test = _correlated_inputs(64, 16, 12, seed=1), _correlated_inputs(32, 16, 12, seed=2)
    opts = dict(example_inputs=calib[:1], method=method, rank=rank, calibration=calib)
    refit = separify.convert(model, **opts, calib_als=0)
    als = separify.convert(model, **opts, calib_als=10)
    again = separify.convert(model, **opts, calib_als=10)
    rec = als.converted[0]
    assert rec.calib_error_after < refit.converted[0].calib_error_after
    # the same start; with ALS the error before is measured on the 4,096 pixels it samples (of 9,216)
    assert rec.calib_error_before == pytest.approx(refit.converted[0].calib_error_before, rel=0.05)
    with torch.no_grad():
        ref = model(test)
        assert _rel(als.model(test), ref) < _rel(refit.model(test), ref)  # on held-out inputs too
        torch.testing.assert_close(als.model(test), again.model(test), rtol=0, atol=0)  # deterministic


def test_als_samples_pixels_deterministically_and_still_fits():
    from separify.calibration import als_dw_pw
    from separify.core.modules import DwPwConv2d

    conv = nn.Conv2d(8, 12, 3, padding=1)
    x = _correlated_inputs(16, 8, 16)
    with torch.no_grad():
        y = conv(x)
    first = DwPwConv2d.from_conv(conv, 1)
    second = DwPwConv2d.from_conv(conv, 1)
    with torch.no_grad():
        start = _rel(first(x), y)
    a = als_dw_pw(first.conv_dw, first.conv_pw, x, y, iters=5, max_pixels=500, seed=3)  # of 4,096 pixels
    b = als_dw_pw(second.conv_dw, second.conv_pw, x, y, iters=5, max_pixels=500, seed=3)
    assert a == b
    torch.testing.assert_close(first.conv_dw.weight, second.conv_dw.weight, rtol=0, atol=0)
    with torch.no_grad():
        assert _rel(first(x), y) < start  # fitted on a sample, better on all pixels


def test_als_setting_is_checked():
    with pytest.raises(SeparifyError, match="calib_als"):
        separify.ConvertConfig(calib_als=-1)
    with pytest.raises(SeparifyError, match="calib_als"):
        separify.ConvertConfig(calib_als=True)


def test_als_is_skipped_with_a_note_where_its_statistics_would_be_too_large(monkeypatch):
    import separify.calibration.als as cal

    monkeypatch.setattr(cal, "_ALS_MAX_CP", 100)  # 16 channels · 9 taps = 144 values per pixel: too many
    model = OneConv().eval()
    calib = _correlated_inputs(16, 16, 12)
    res = separify.convert(model, example_inputs=calib[:1], method="dw-pw", rank=1, calibration=calib)
    refit = separify.convert(model, example_inputs=calib[:1], method="dw-pw", rank=1, calibration=calib, calib_als=0)
    rec = res.converted[0]
    assert "no ALS" in rec.note and "144" in rec.note
    assert rec.calib_error_after == pytest.approx(refit.converted[0].calib_error_after)  # the refit alone


def test_cp_sweeps_default_to_fewer_when_the_calibration_refits_the_layer(monkeypatch, cp_sweeps):
    """``cp_max_iter=None``: 25 CP sweeps without calibration or with ``calib_als=0``, 5 when the ALS refits the
    depthwise and last 1×1 conv afterwards; an explicit value always wins."""
    model = OneConv().eval()
    x = _correlated_inputs(8, 16, 8)
    cases = [(dict(), 25), (dict(calibration=x), 5), (dict(calibration=x, calib_als=0), 25),
             (dict(calibration=x, cp_max_iter=7), 7)]
    for options, sweeps in cases:
        cp_sweeps.clear()
        separify.convert(model, example_inputs=x[:1], method="pw-dw-pw", rank=6, **options)
        assert cp_sweeps == [sweeps], (options, cp_sweeps)
    # a layer whose calibration data is scarce (no ALS there) gets the full sweeps: 2 samples of 8×8 for 7 inputs
    cp_sweeps.clear()
    with pytest.warns(UserWarning, match="calibration sample"):
        separify.convert(model, example_inputs=x[:1], method="pw-dw-pw", rank=6, calibration=x[:2])
    assert cp_sweeps == [25]
    # and so does a layer the alternating least squares skips for its size
    import separify.calibration.als as cal

    monkeypatch.setattr(cal, "_ALS_MAX_CP", 6 * 9 - 1)  # rank 6 · 9 taps = 54 values per pixel: skipped
    cp_sweeps.clear()
    separify.convert(model, example_inputs=x[:1], method="pw-dw-pw", rank=6, calibration=x)
    assert cp_sweeps == [25]
    with pytest.raises(separify.ConfigError, match="cp_max_iter"):
        separify.ConvertConfig(cp_max_iter=-1)


@pytest.mark.parametrize("d", [7, 1024, 1031], ids=lambda d: f"d{d}")
def test_blocked_gram_equals_the_full_product(d):
    from separify.calibration.linalg import blocked_gram

    u = torch.randn(300, d, dtype=torch.float64)
    torch.testing.assert_close(blocked_gram(u), u.T @ u, rtol=1e-12, atol=1e-10)


# ------------------------------------------------------------------------------------ in-place ops, scarce data


class _InPlaceBlock(nn.Module):
    """conv → BN, then `out += x` and ReLU(inplace=True) on the BN's output, as torchvision's BasicBlock does."""

    def __init__(self, c=6):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.bn(self.conv(x))
        out += x
        return self.relu(out)


def test_kept_outputs_are_not_changed_by_later_inplace_ops():
    from separify.calibration import observe

    model = _InPlaceBlock().eval()
    x = torch.randn(4, 6, 8, 8)
    obs = observe(model, {"conv": "bn"}, [x])
    with torch.no_grad():
        expected = model.bn(model.conv(x))
    assert (expected < 0).any()  # what the in-place ReLU would have clipped
    torch.testing.assert_close(torch.cat(obs.outputs["conv"]), expected, rtol=0, atol=0)


def test_calibrated_torchvision_resnet_generalises():
    """torchvision's ResNet changes each block's BN output in place (`out += identity`, ReLU(inplace=True)); the
    refit must fit the BN output as the BN returned it (a copy), so the calibrated model's held-out error is below
    0.4 times the weight-space init's (the layer pass alone: no output reconstruction)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    calib, held = torch.randn(32, 3, 64, 64), torch.randn(8, 3, 64, 64)
    plain = separify.convert(model, example_inputs=calib[:1], method="dw-pw", flops=0.5)
    fitted = separify.convert(model, example_inputs=calib[:1], method="dw-pw", flops=0.5, calibration=calib,
                              calib_output_steps=0)
    with torch.no_grad():
        ref = model(held)
        e_plain, e_fit = _rel(plain.model(held), ref), _rel(fitted.model(held), ref)
    assert e_fit < 0.4 * e_plain, (e_fit, e_plain)


def _scarce_problem(samples: int, seed: int = 0):
    """A 1×1 conv with 64 inputs, and data from a slightly different one plus noise: 4×4 pixels per sample, so a few
    samples give fewer pixels than weights per output channel."""
    g = torch.Generator().manual_seed(seed)
    last = nn.Conv2d(64, 8, 1)
    truth = nn.Conv2d(64, 8, 1)
    with torch.no_grad():
        truth.weight.copy_(last.weight + 0.05 * torch.randn(last.weight.shape, generator=g))
        truth.bias.copy_(last.bias)

    def data(n, s):
        gen = torch.Generator().manual_seed(s)
        z = torch.randn(n, 64, 4, 4, generator=gen)
        with torch.no_grad():
            return z, truth(z) + 0.05 * torch.randn(n, 8, 4, 4, generator=gen)

    return last, data(samples, seed + 1), data(64, seed + 2)


def _held_out_error(last, held):
    z, y = held
    with torch.no_grad():
        return _rel(last(z), y)


def test_scarce_data_refit_is_cross_validated_and_generalises(monkeypatch):
    import separify.calibration.refit as cal

    last, (z, y), held = _scarce_problem(4)  # 64 pixels for 65 inputs
    assert cal.scarce(64, 64)
    start = _held_out_error(last, held)
    plain = nn.Conv2d(64, 8, 1)
    plain.load_state_dict(last.state_dict())
    fit = cal.PointwiseRefit(last, "layer")
    fit.add(z, y)
    res = fit.apply()
    assert "2-fold cross-validation" in res.note and res.error_after < res.error_before
    monkeypatch.setattr(cal, "PIXELS_PER_INPUT", 0)  # never scarce: the plain least squares
    plain_fit = cal.PointwiseRefit(plain, "layer")
    plain_fit.add(z, y)
    assert plain_fit.apply().note is None
    e_cv, e_plain = _held_out_error(last, held), _held_out_error(plain, held)
    # as many pixels as weights: the plain fit reproduces the data and generalises worst there
    assert e_plain > 2 * e_cv
    assert e_cv < 0.5 * start


def test_scarce_data_statistics_stream_in_any_chunks():
    from separify.calibration import PointwiseRefit

    last, (z, y), _ = _scarce_problem(7)
    last, z, y = last.double(), z.double(), y.double()
    a, b = nn.Conv2d(64, 8, 1).double(), nn.Conv2d(64, 8, 1).double()
    a.load_state_dict(last.state_dict())
    b.load_state_dict(last.state_dict())
    whole, chunked = PointwiseRefit(a, "a"), PointwiseRefit(b, "b")
    whole.add(z, y)
    for lo, hi in ((0, 3), (3, 4), (4, 7)):  # folds follow the samples' order, not the chunks
        chunked.add(z[lo:hi], y[lo:hi])
    assert whole.counts == chunked.counts == [4 * 16, 3 * 16]
    for g1, g2 in zip(whole.grams + whole.resids, chunked.grams + chunked.resids):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-10)
    assert whole.apply().note == chunked.apply().note
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-9, atol=1e-9)


def test_one_scarce_sample_keeps_the_factors():
    from separify.calibration import PointwiseRefit

    last, (z, y), _ = _scarce_problem(1)
    weight = last.weight.detach().clone()
    res = PointwiseRefit(last, "layer")
    res.add(z, y)
    fit = res.apply()
    assert "one sample: no refit" in fit.note and fit.error_after == fit.error_before
    assert torch.equal(last.weight, weight)


def test_a_few_calibration_images_never_cost_accuracy():
    """Two calibration images of the embedded model (FLOPs 0.5): the calibrated model is at least as accurate as the
    weight-space init (within 0.01), the layers with scarce data say so, and convert warns."""
    from separify.io import embedded

    model = embedded.load_default_model().eval()
    x, labels = embedded.load_eval_data()
    test_x, test_y = x[:500], labels[:500]
    plain = separify.convert(model, example_inputs=x[:1], flops=0.5)
    with pytest.warns(UserWarning, match="calibration sample.*few"):
        fitted = separify.convert(model, example_inputs=x[:1], flops=0.5, calibration=x[500:502])
    with torch.no_grad():
        acc_plain = float((plain.model(test_x).argmax(1) == test_y).float().mean())
        acc_fit = float((fitted.model(test_x).argmax(1) == test_y).float().mean())
    assert acc_fit >= acc_plain - 0.01, (acc_fit, acc_plain)
    notes = [r.note or "" for r in fitted.converted]
    assert any("scarce calibration data" in n for n in notes) and any("no ALS" in n for n in notes)


def test_scarce_layer_that_already_reproduces_its_data_is_left_alone():
    from separify.calibration import PointwiseRefit

    last = nn.Conv2d(64, 8, 1)
    z = torch.randn(4, 64, 4, 4)
    with torch.no_grad():
        y = last(z)
    weight = last.weight.detach().clone()
    fit = PointwiseRefit(last, "layer")
    fit.add(z, y)
    res = fit.apply()
    assert "already reproduces its data" in res.note and torch.equal(last.weight, weight)


def test_reconstruction_is_skipped_where_data_is_scarce():
    model = OneConv().eval()
    x = _correlated_inputs(2, 16, 6)  # 72 pixels for a dw-pw rank-2 layer (32 inputs): scarce
    with pytest.warns(UserWarning, match="calibration sample"):
        res = separify.convert(model, example_inputs=x[:1], method="dw-pw", rank=2, calibration=x, calib_steps=50)
    note = res.converted[0].note
    assert "no ALS: scarce calibration data (72 pixels; 1,056 wanted for the 32 input channels" in note
    assert "no reconstruction: scarce" in note
