"""The time budget of a calibrated conversion (``calib_seconds``): the reconstructions' steps stop where it ends and
say how many ran, on both backends; without it every step runs."""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from torch import nn

import separify
from separify.calibration.budget import FIXED_PASSES, LAYER_SHARE, TAIL, Budget, StepTime, cut_note
from separify.calibration.output import SPENT, _steps, fit_output
from separify.calibration.reconstruct import reconstruct
from separify.core.modules import PwDwPwConv2d
from separify.errors import ConfigError
from separify.reporting.data import conversion_doc
from separify.reporting.story import conversion_lines


class Net(nn.Module):
    """Two 3×3 convs, pooled, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 24, 3, padding=1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The network, the same as an ONNX file, and 64 calibration images of 16×16."""
    torch.manual_seed(0)
    net = Net().eval()
    path = tmp_path_factory.mktemp("budget") / "net.onnx"
    torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"])
    data = nn.functional.avg_pool2d(torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1)), 3, 1, 1)
    return net, path, data


def _convert(model, data, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = separify.convert(model, example_inputs=data[:1], objective="flops", method="pw-dw-pw", flops=0.6,
                               calibration=data, calib_steps=20, calib_output_steps=10, **kw)
    return res, [str(w.message) for w in caught]


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_a_spent_budget_stops_every_step_and_says_so(models, backend):
    net, path, data = models
    res, caught = _convert(net if backend == "torch" else path, data, calib_seconds=1e-6)
    assert res.converted
    for rec in res.converted:  # each layer's note: none of its 20 steps ran
        assert cut_note("layer-wise reconstruction", 0, 20) in rec.note, rec.note
    fit = res.output_fit
    assert (fit.steps, fit.planned, fit.kept, fit.note) == (0, 10, False, SPENT)
    assert any(f"time budget (calib_seconds=1e-06) stopped the layer-wise reconstruction of {len(res.converted)} "
               "layer(s) and the output reconstruction" in w for w in caught), caught


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_without_a_budget_every_step_runs(models, backend):
    net, path, data = models
    res, caught = _convert(net if backend == "torch" else path, data, calib_seconds=None)
    assert all(rec.note is None or "time budget" not in rec.note for rec in res.converted)
    assert (res.output_fit.steps, res.output_fit.planned) == (10, 10)
    assert not any("time budget" in w for w in caught)
    doc = conversion_doc(res)
    assert (doc["output_reconstruction"]["steps"], doc["output_reconstruction"]["planned_steps"]) == (10, 10)
    assert any(line.startswith("output reconstruction (10 steps, ") for line in conversion_lines(doc))
    doc["output_reconstruction"]["steps"] = 3  # as where the budget ended the stage after 3 steps
    assert any(line.startswith("output reconstruction (3 of 10 steps, stopped by the time budget, ")
               for line in conversion_lines(doc))


def _layer_data():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    mod = PwDwPwConv2d.from_conv(conv, 6)
    x = torch.randn(16, 8, 10, 10)
    with torch.no_grad():
        y = conv(x)
    return mod, [x], [y]


def test_reconstruct_takes_no_step_past_its_deadline():
    mod, xs, ys = _layer_data()
    start = [p.detach().clone() for p in mod.parameters()]
    assert reconstruct(mod, xs, ys, steps=50, lr=1e-3, batch_size=4, seed=0, until=time.perf_counter() - 1) == 0
    assert all(torch.equal(p, s) for p, s in zip(mod.parameters(), start))  # untouched
    assert reconstruct(mod, xs, ys, steps=5, lr=1e-3, batch_size=4, seed=0, until=time.perf_counter() + 60) == 5
    assert reconstruct(mod, xs, ys, steps=5, lr=1e-3, batch_size=4, seed=0) == 5


def test_output_steps_end_at_the_deadline_with_the_learning_rate_at_zero(monkeypatch):
    """A deadline already reached: one step, after which the cosine over the time has reached its end."""
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    seen = []

    class Spy(torch.optim.Adam):
        def step(self, *a, **k):
            seen.append(self.param_groups[0]["lr"])
            return super().step(*a, **k)

    monkeypatch.setattr(torch.optim, "Adam", Spy)
    kw = dict(batch_size=8, seed=0, fixed_batch=None, dtype=None, channels_last=False, on_step=None)
    taken = _steps(student, list(student.parameters()), teacher, [torch.randn(32, 4)], steps=50, lr=1e-2,
                   end=time.perf_counter() - 1, **kw)
    full = _steps(student, list(student.parameters()), teacher, [torch.randn(32, 4)], steps=4, lr=1e-2, **kw)
    assert taken == 1 and full == 4
    # the first step at the full rate; without a deadline the cosine over the steps: 1, cos² of π/8, π/4, 3π/8
    assert seen[0] == pytest.approx(1e-2) and seen[1:] == pytest.approx([1e-2, 8.536e-3, 5e-3, 1.464e-3], rel=1e-3)


def test_fit_output_skips_a_stage_the_budget_has_no_time_for():
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    fit = fit_output(student, list(student.parameters()), teacher, [torch.randn(64, 4)], steps=30, lr=1e-2,
                     batch_size=8, seed=0, until=time.perf_counter() - 1)
    assert (fit.steps, fit.planned, fit.note, fit.kept) == (0, 30, SPENT, False)


def test_the_budget_shares_out_the_steps_time():
    assert Budget.starting_now(None).layer_steps(5.0).seconds is None and StepTime().until(3) is None
    budget = Budget.starting_now(100.0)
    share = budget.layer_steps(observed=10.0).seconds
    assert share == pytest.approx(LAYER_SHARE * (100.0 - FIXED_PASSES * 10.0), abs=0.1)
    assert budget.output_until() == pytest.approx(budget.end - TAIL)
    assert Budget.starting_now(1.0).layer_steps(observed=10.0).seconds == 0.0  # the fixed work alone is longer
    steps = StepTime(12.0)
    assert steps.until(3) - time.perf_counter() == pytest.approx(4.0, abs=0.1)  # a third of what is left
    steps.spend(9.0)
    assert steps.until(1) - time.perf_counter() == pytest.approx(3.0, abs=0.1)
    assert Budget.starting_now(5.0).extended(10.0).left() == pytest.approx(15.0, abs=0.1)
    assert cut_note("x", 5, 5) is None and cut_note("x", 2, 5) == ("x: 2 of 5 steps, stopped by the time budget "
                                                                  "(calib_seconds)")


@pytest.mark.parametrize("bad", [0, -1.0, True, "30", float("nan")])
def test_calib_seconds_must_be_a_positive_number_or_none(bad):
    with pytest.raises(ConfigError, match="calib_seconds must be a positive number of seconds or None"):
        separify.ConvertConfig(calib_seconds=bad)
    assert separify.ConvertConfig(calib_seconds=None).calibration.seconds is None
    assert separify.ConvertConfig().calibration.seconds is None  # by default every step runs
