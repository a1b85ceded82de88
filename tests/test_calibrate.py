"""Calibration-aware initialisation: the least-squares refit of the last 1×1 conv."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import separify
from separify.calibrate import as_batches
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
    assert res.converted[0].calib_error_after < 1e-6  # from accumulated statistics: √(float64 cancellation) ≈ 1e-8
    x = torch.randn(4, 6, 10, 10, dtype=torch.float64)
    torch.testing.assert_close(res.model(x), model(x), rtol=1e-8, atol=1e-8)


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
    assert [len(b) for b in batches] == [5, 2]
    assert [len(b) for b in as_batches(torch.randn(300, 2))] == [128, 128, 44]
