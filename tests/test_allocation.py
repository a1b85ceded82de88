"""The global allocation's new choices: the form per layer (``method="auto"``) and loss-aware weights (a layer's
error weighted by its effect on the model's output)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import separify
from separify.calibration import sensitivity
from separify.errors import ConfigError

C, P = 16, 9  # channels, 3×3 taps


def _per_channel_rank_one(g: torch.Generator) -> torch.Tensor:
    """W[n, m] = a[n, m] · f_m: every input channel's N×9 matrix has rank 1 (dw-pw exact at K = 1), while the CP
    rank is M (pw-dw-pw needs R = M = 16 for it)."""
    a, f = torch.randn(C, C, generator=g), torch.randn(C, 3, 3, generator=g)
    return a[:, :, None, None] * f[None]


def _cp_rank_two(g: torch.Generator) -> torch.Tensor:
    """W = Σ_{r<2} b_r ⊗ a_r ⊗ d_r: pw-dw-pw exact at R = 2 (82 multiply-adds per pixel), dw-pw only at K = 2
    (800)."""
    b, a, d = torch.randn(2, C, generator=g), torch.randn(2, C, generator=g), torch.randn(2, 3, 3, generator=g)
    return torch.einsum("rn,rm,rhw->nmhw", b, a, d)


class TwoStructures(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.b = nn.Conv2d(C, C, 3, padding=1, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(_per_channel_rank_one(g))
            self.b.weight.copy_(_cp_rank_two(g))

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _convert(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return separify.convert(model, example_inputs=torch.randn(1, C, 16, 16), objective="flops", **kw)


@pytest.mark.parametrize("calibrated", [False, True], ids=["weight-error", "calibrated"])
def test_auto_gives_each_layer_the_form_that_is_exact_for_it(calibrated):
    """At 0.12 of the FLOPs (553 of 2·2304 multiply-adds per pixel) only dw-pw K=1 on ``a`` (400) and pw-dw-pw
    R≥2 on ``b`` (82 at R=2) fit the budget exactly: a single form for both layers loses one of them."""
    torch.manual_seed(0)
    model = TwoStructures().eval()
    data = torch.randn(64, C, 16, 16) if calibrated else None
    res = _convert(model, method="auto", flops=0.12, calibration=data)
    forms = {r.name: (r.method, r.rank) for r in res.converted}
    assert forms["a"] == ("dw-pw", 1) and forms["b"][0] == "pw-dw-pw" and forms["b"][1] >= 2  # the rest of the
    # budget may go to b's rank
    assert all("form chosen by method='auto'" in r.rank_source for r in res.converted)
    x = torch.randn(4, C, 16, 16)
    with torch.no_grad():
        want, got = model(x), res.model(x)
    assert (got - want).norm() / want.norm() < 1e-3
    for method in ("dw-pw", "pw-dw-pw"):  # each single form is worse at the same FLOPs
        single = _convert(model, method=method, flops=0.12, calibration=data)
        with torch.no_grad():
            assert (single.model(x) - want).norm() / want.norm() > 0.05


def test_auto_predicts_by_als_only_at_ranks_the_refit_fits(monkeypatch):
    """pw-dw-pw's predicted error is measured only at ranks whose depthwise conv the refit's ALS fits (here bounded
    at R·P ≤ 72: R ≤ 8 of the 56 saving ranks); above, the curve goes on from there with the weight-space curve's
    shape: continuous, non-increasing, its ratios those of the weight-space curve."""
    from separify.calibration import als
    from separify.planning import forms, ranks

    monkeypatch.setattr(als, "_ALS_MAX_CP", 8 * P)
    conv = nn.Conv2d(C, C, 3, padding=1).double()
    predicted = []
    plain = forms.predicted_error
    monkeypatch.setattr(forms, "predicted_error",
                        lambda mod, *a, **k: predicted.append(mod.rank) or plain(mod, *a, **k))
    saving = np.arange(1, 57)
    curve = forms.form_curve(conv, "pw-dw-pw", saving, None, options=lambda m, r: {"seed": 0}, iters=4, ridge=1e-6)
    assert max(predicted) == 8 and len(predicted) == forms.SAMPLE_RANKS
    errors = curve(saving)
    assert np.all(np.diff(errors) <= 1e-12) and np.all(errors > 0)
    weight_space = ranks.error_curve("pw-dw-pw", conv.weight, saving[7:])
    np.testing.assert_allclose(errors[7:] / errors[7], weight_space / weight_space[0], rtol=1e-9)
    assert forms.measured_ranks(conv, "dw-pw", np.arange(1, 10)).tolist() == list(range(1, 10))


def test_auto_refuses_a_rule_that_fixes_a_rank():
    with pytest.raises(ConfigError, match="name the form in the rule"):
        _convert(TwoStructures().eval(), method="auto", rules=[{"pattern": "a", "rank": 2}])


class Scaled(nn.Module):
    """Two alike convs whose outputs reach the model's output scaled by 10 and 0.1: an error in ``loud`` moves
    the output 10,000 times as much (in squared norm) as the same relative error in ``quiet``."""

    def __init__(self):
        super().__init__()
        self.loud = nn.Conv2d(C, C, 3, padding=1)
        self.quiet = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x):
        return 10.0 * self.loud(x) + 0.1 * self.quiet(x)


def test_sensitivity_weighs_layers_by_their_effect_on_the_output():
    torch.manual_seed(0)
    model = Scaled().eval()
    w = sensitivity(model, {"loud": "loud", "quiet": "quiet"}, [torch.randn(8, C, 12, 12)], probes=4, loss="mse")
    assert w["loud"] + w["quiet"] == pytest.approx(2.0)
    assert 5e3 < w["loud"] / w["quiet"] < 2e4
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_sensitivity_is_the_same_in_the_channels_last_layout():
    """The loss-aware weights do not depend on the layout the samples run in (float64: equal to rounding)."""
    torch.manual_seed(0)
    model = Scaled().double().eval()
    x = [torch.randn(8, C, 12, 12, dtype=torch.float64)]
    targets = {"loud": "loud", "quiet": "quiet"}
    plain = sensitivity(model, targets, x, probes=2, loss="mse")
    fast = sensitivity(model, targets, x, probes=2, loss="mse", channels_last=True)
    assert fast == pytest.approx(plain, rel=1e-9)


def test_loss_aware_allocation_lowers_the_output_error():
    """Same FLOPs: the loss-aware allocation gives the rank to ``loud`` and the model's output error drops."""
    torch.manual_seed(0)
    model = Scaled().eval()
    data, x = torch.randn(128, C, 12, 12), torch.randn(8, C, 12, 12)
    errors, ranks = {}, {}
    for aware in (False, True):
        res = _convert(model, method="dw-pw", flops=0.4, calibration=data, calib_loss_aware=aware, calib_loss="mse")
        ranks[aware] = {r.name: r.rank for r in res.converted}
        with torch.no_grad():
            want = model(x)
            errors[aware] = float((res.model(x) - want).norm() / want.norm())
        assert res.flops_ratio <= 0.4
    assert ranks[True]["loud"] > ranks[False]["loud"] and ranks[True]["quiet"] < ranks[False]["quiet"]
    assert errors[True] < 0.9 * errors[False]
    res = _convert(model, method="dw-pw", flops=0.4, calibration=data)
    assert "its effect on the model's output" in res.layers[0].rank_source


class Classifier(nn.Module):
    """Two-class logits ``(a + b, a − b)``: ``shift``'s output ``a`` moves both logits alike, which the softmax does
    not see; ``decisive``'s output ``b`` decides between the classes."""

    def __init__(self):
        super().__init__()
        self.shift = nn.Conv2d(C, 4, 3, padding=1)
        self.decisive = nn.Conv2d(C, 4, 3, padding=1)

    def forward(self, x):
        a, b = self.shift(x).mean((2, 3)).sum(1), self.decisive(x).mean((2, 3)).sum(1)  # (N,) each
        return torch.stack([a + b, a - b], 1)


def test_fisher_weights_follow_the_predicted_distribution_not_the_logits():
    """Both layers move the logits alike (same weights), so ``mse`` weighs them alike; the Fisher weights see that
    ``shift`` leaves the predicted distribution as it is."""
    torch.manual_seed(0)
    model, x = Classifier().eval(), [torch.randn(16, C, 8, 8)]
    with torch.no_grad():
        model.decisive.weight.copy_(model.shift.weight)
        model.decisive.bias.copy_(model.shift.bias)
    targets = {"shift": "shift", "decisive": "decisive"}
    mse = sensitivity(model, targets, x, loss="mse", probes=8)
    fisher = sensitivity(model, targets, x, loss="fisher", probes=8)
    assert 0.3 < mse["shift"] / mse["decisive"] < 3
    assert fisher["shift"] / fisher["decisive"] < 1e-6


def test_both_backends_measure_the_same_sensitivity(tmp_path):
    torch.manual_seed(0)
    model = Scaled().eval()
    path = tmp_path / "scaled.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, C, 12, 12),), str(path), input_names=["x"], output_names=["y"],
                          dynamo=False)
    from separify.backends.onnx import OnnxBackend
    from separify.backends.torch import TorchBackend
    from separify.config import ConvertConfig
    from separify.pipeline import _check

    cfg = ConvertConfig(objective="flops")
    data = torch.randn(16, C, 12, 12)
    weights = []
    for backend in (TorchBackend(model, cfg, torch.randn(1, C, 12, 12)), OnnxBackend(str(path), cfg)):
        backend.set_calibration(data, cfg.calibration)
        _, cands = _check(backend, cfg)
        w, note = backend.sensitivity(cands, cfg.calibration)
        assert note is None and len(w) == 2
        weights.append(sorted(w.values()))
    assert weights[0] == pytest.approx(weights[1], rel=1e-3)
