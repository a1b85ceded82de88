"""The calibration passes under bfloat16 autocast: when they use it, and that the fits stay in full precision."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import separify
import separify.calibration.precision as precision
from separify.calibration import observe
from separify.calibration.observation import _channel_moments
from separify.calibration.reconstruct import MINIBATCH_PIXELS, _minibatch, reconstruct
from separify.core.modules import PwDwPwConv2d
from separify.errors import ConfigError


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 8, 3, stride=2)).eval()


def _images(n: int = 48, size: int = 12) -> torch.Tensor:
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))
    return nn.functional.avg_pool2d(x, 3, stride=1, padding=1)  # smooth, correlated like real images


@pytest.mark.parametrize("setting, model_dtype, native, flops, expected", [
    ("float32", torch.float32, True, 1e15, None),
    ("bfloat16", torch.float32, False, 0, torch.bfloat16),
    ("bfloat16", torch.float64, True, 1e15, None),  # never below a float64 model's precision
    ("auto", torch.float32, True, precision.AUTO_FLOPS, torch.bfloat16),
    ("auto", torch.float32, True, precision.AUTO_FLOPS / 2, None),  # small jobs stay exact
    ("auto", torch.float32, False, 1e15, None),  # no native bfloat16: it would be slower
    ("auto", torch.float64, True, 1e15, None),
], ids=["float32", "bfloat16-forced", "bfloat16-float64-model", "auto-large", "auto-small", "auto-not-native",
        "auto-float64-model"])
def test_the_pass_precision_follows_the_setting_the_hardware_and_the_work(monkeypatch, setting, model_dtype, native,
                                                                          flops, expected):
    monkeypatch.setattr(precision, "native_bfloat16", lambda device: native)
    model = nn.Conv2d(3, 4, 3).to(model_dtype)
    assert precision.pass_dtype(setting, model, torch.device("cpu"), flops) is expected


def test_the_precision_setting_is_checked():
    with pytest.raises(ConfigError, match="calib_precision must be one of auto, float32, bfloat16"):
        separify.ConvertConfig(calib_precision="half")


def test_channel_moments_are_the_same_in_either_memory_layout():
    x = torch.randn(3, 5, 7, 6)
    nchw = _channel_moments(x, torch.float32)
    last = _channel_moments(x.contiguous(memory_format=torch.channels_last), torch.float32)
    px = x.double().transpose(0, 1).reshape(5, -1)
    torch.testing.assert_close(nchw, px @ px.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, px @ px.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels-last"])
def test_the_reconstruction_steps_are_adam_on_the_normalised_squared_error(layout):
    """``reconstruct`` hands the loss's gradient to the backward instead of a loss: its steps are those of plain
    Adam on ``mean((module(x_B) − y_B)²) / mean(y²)`` over the same minibatches (float64)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    module = PwDwPwConv2d.from_conv(conv, rank=2)
    x = torch.randn(12, 4, 7, 7, dtype=torch.float64).contiguous(memory_format=layout)
    with torch.no_grad():
        y = conv(x).contiguous(memory_format=layout)
    ref, start = copy.deepcopy(module), copy.deepcopy(module)
    reconstruct(module, [x], [y], steps=12, lr=1e-2, batch_size=4, seed=3)
    params = list(ref.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    scale = float(y.pow(2).mean())
    for _ in range(12):  # the same draws as reconstruct: one group, so no group choice
        idx = torch.randint(0, len(x), (4,), generator=gen)
        loss = nn.functional.mse_loss(ref(x[idx]), y[idx]) / scale
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not all(torch.equal(a, b) for a, b in zip(module.parameters(), start.parameters()))  # kept, not undone
    for got, want in zip(module.parameters(), params):
        torch.testing.assert_close(got, want.detach(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_kept_outputs_are_stored_in_the_layout_the_pass_runs_in(channels_last):
    model, x = _net(), _images(10)
    obs = observe(model, {"3": "3"}, [x[:6], x[6:]], channels_last=channels_last)
    (y,) = obs.outputs["3"]
    with torch.no_grad():
        expected = model[:4](x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last) is channels_last and y.is_contiguous() is not channels_last


def test_fast_layout_is_channels_last_for_cpu_images_only():
    assert precision.fast_layout(torch.randn(2, 3, 4, 5)).is_contiguous(memory_format=torch.channels_last)
    seq = torch.randn(2, 3, 4)
    assert precision.fast_layout(seq) is seq


def test_observation_under_bfloat16_keeps_its_outputs_and_float64_moments_close_to_float32_ones():
    """The forward runs in bfloat16: the kept outputs are its bfloat16 outputs as they are (half the memory of
    float32, no digits lost), the moments float64 sums of its activations; both equal to the float32 pass's up to
    bfloat16's rounding."""
    model, x = _net(), _images()
    layers = {"0": "1", "3": "3"}
    exact = observe(model, layers, [x])
    fast = observe(model, layers, [x], dtype=torch.bfloat16)
    for name in layers:
        y, y16 = torch.cat(exact.outputs[name]), torch.cat(fast.outputs[name])
        assert y.dtype == torch.float32 and y16.dtype == torch.bfloat16
        assert fast.covariances[name].channel.dtype == torch.float64
        assert 0 < float((y16.float() - y).norm() / y.norm()) < 0.02  # bfloat16 ran, and only rounded
        for part in ("channel", "spatial"):
            a, b = getattr(fast.covariances[name], part), getattr(exact.covariances[name], part)
            assert float((a - b).norm() / b.norm()) < 0.02


def test_calibration_under_bfloat16_fits_as_well_as_in_float32_and_leaves_float32_weights():
    """The whole conversion with the passes in bfloat16: every replacement is refitted to within a hair of the
    float32 fit (the fits run in full precision), and the model it returns is float32."""
    model, x = _net(), _images()
    errors = {}
    for setting in ("float32", "bfloat16"):
        res = separify.convert(model, example_inputs=x[:1], method="pw-dw-pw", flops=0.6, calibration=x,
                               calib_precision=setting)
        assert all(p.dtype == torch.float32 for p in res.model.parameters())
        errors[setting] = {r.name: r.calib_error_after for r in res.converted}
    assert errors["bfloat16"].keys() == errors["float32"].keys() and errors["float32"]
    for name, err in errors["float32"].items():
        assert abs(errors["bfloat16"][name] - err) < 0.01 + 0.05 * err, (name, errors)


@pytest.mark.parametrize("pixels, batch_size, samples, expected", [
    (10 * 10, 8, 100, 8),  # small images: the configured minibatch
    (56 * 56, 8, 100, -(-MINIBATCH_PIXELS // (56 * 56))),  # large: about MINIBATCH_PIXELS pixels
    (224 * 224, 8, 100, 1),  # at least one sample
    (4 * 4, 8, 3, 3),  # no more than the group holds
], ids=["small-images", "large-images", "huge-images", "small-group"])
def test_reconstruction_minibatch_is_bounded_by_pixels(pixels, batch_size, samples, expected):
    side = int(pixels ** 0.5)
    x, y = torch.empty(samples, 1, side, side), torch.empty(samples, 2, side, side)
    assert _minibatch(batch_size, x, y) == expected


def test_observation_hooks_sum_the_bfloat16_activations_in_full_precision():
    """The moments are the float64 sums of the activations the bfloat16 forward produced (autocast is off inside
    the hooks: a bfloat16 product there would be off by about 1e-3)."""
    model, x = _net(), _images()
    seen = []
    handle = model[3].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(precision.fast_layout(x))
    handle.remove()
    h = seen[0].double().transpose(0, 1).reshape(16, -1)  # (M, pixels): the activations as bfloat16 gave them
    cov = observe(model, {"3": "3"}, [x], dtype=torch.bfloat16).covariances["3"]
    torch.testing.assert_close(cov.channel, h @ h.T / h.shape[1], rtol=1e-6, atol=1e-6)


class _Viewing(nn.Module):
    """Two convs with a ``.view`` of the activation between them that merges channels and rows (which a
    channels-last tensor cannot give without a copy)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        x = self.a(x)
        n, c, h, w = x.shape
        x = x.view(n, c * h, w).relu().view(n, c, h, w)  # the first .view fails on channels-last
        return self.b(x).flatten(1)


@pytest.mark.parametrize("setting", ["float32", "bfloat16"])
def test_a_model_that_views_its_activations_is_calibrated_in_its_own_layout(setting):
    model, x = _Viewing().eval(), _images(24)
    assert not precision.runs_channels_last(model, x[:1]) and precision.runs_channels_last(_net(), x[:1])
    res = separify.convert(model, example_inputs=x[:1], objective="flops", method="pw-dw-pw", flops=0.7,
                           calibration=x, calib_precision=setting)
    assert [r.name for r in res.converted] and all(r.calib_error_after is not None for r in res.converted)


def test_a_bfloat16_model_is_calibrated_in_its_own_precision():
    model, x = _net().to(torch.bfloat16), _images(24).to(torch.bfloat16)
    res = separify.convert(model, example_inputs=x[:1], objective="flops", method="pw-dw-pw", flops=0.6,
                           calibration=x)
    assert res.converted and all(p.dtype == torch.bfloat16 for p in res.model.parameters())


@pytest.mark.parametrize("capability, native", [((7, 5), False), ((8, 0), True), ((9, 0), True)],
                         ids=["turing-emulates", "ampere", "hopper"])
def test_only_gpus_that_compute_bfloat16_count_as_native(monkeypatch, capability, native):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert precision.native_bfloat16(torch.device("cuda", 0)) is native


def test_the_observation_pass_reports_its_progress_in_samples(monkeypatch):
    import separify.calibration.observation as cal

    monkeypatch.setattr(cal, "_OBSERVE_BYTES", 3 * 12 * 12 * 4 * 5)  # five samples per forward
    seen = []
    cal.observe(_net(), {"0": "1", "3": "3"}, [_images(12)], progress=lambda done, total: seen.append((done, total)))
    assert seen == [(5, 12), (10, 12), (12, 12)]


class _Mixed(nn.Module):
    """A conv, an LSTM and a linear layer (kinds :func:`precision.frozen_lowered` casts), a GRU (which it leaves
    alone), one trained replacement, and a flatten by ``.view`` that fails on a channels-last activation."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.sep = PwDwPwConv2d(8, 8, 3, rank=4, padding=1)
        self.lstm = nn.LSTM(8 * 6, 16, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(32, 8, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = self.sep(self.stem(x))  # (B, 8, 6, W)
        b, c, h, w = y.shape
        seq = y.view(b, c * h, w).transpose(1, 2)  # (B, W, 48): .view needs the contiguous layout
        return self.head(self.gru(self.lstm(seq)[0])[0])


def test_frozen_lowered_layers_hold_the_weights_autocast_would_give_them_and_get_them_back():
    model = _Mixed().eval()
    trained = {id(p) for p in model.sep.parameters()}
    frozen_conv, lstm_weight, gru_weight = model.stem[0].weight, model.lstm.weight_ih_l0, model.gru.weight_ih_l0
    before = frozen_conv.detach().clone()
    x = torch.randn(2, 3, 6, 10)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
        with precision.frozen_lowered(torch.bfloat16, [model], trained):
            assert frozen_conv.dtype == lstm_weight.dtype == model.head.weight.dtype == torch.bfloat16
            assert model.sep.conv_dw.weight.dtype == torch.float32  # trained: never cast
            assert gru_weight.dtype == model.stem[1].weight.dtype == torch.float32  # not lowered by CPU autocast
            got = model(x)
    assert torch.equal(got, expected)  # the same rounding, done once
    assert model.stem[0].weight is frozen_conv and frozen_conv.dtype == torch.float32
    assert torch.equal(frozen_conv, before)
    with precision.frozen_lowered(None, [model], trained):  # no autocast: nothing to cast
        assert frozen_conv.dtype == torch.float32


def test_trained_parts_run_channels_last_in_a_model_that_cannot():
    model = _Mixed().eval()
    x = torch.randn(2, 3, 6, 10)
    assert not precision.runs_channels_last(model, x)
    trained = {id(p) for p in model.sep.parameters()}
    seen = []
    probe = model.sep.conv_dw.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        expected = model(x)
        with precision.trained_channels_last(model, trained):
            got = model(x)  # the .view after the replacement still works
        model(x)
    probe.remove()
    assert seen == [False, True, False]  # channels-last inside the block only
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert precision._trained_parts(model, trained) == [model.sep]  # the largest trained part, not its convs
