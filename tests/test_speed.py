"""Faster, not just fewer FLOPs: the default objective times on the target and is never slower; whole-model timings
are cached so that a second conversion times nothing; ``max_drop`` finds the fastest plan within a metric drop."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import separify
from separify.config import ConvertConfig
from separify.errors import ConfigError, SeparifyError
from separify.planning import latency
from separify.records import Reason
from timers import flops_timer

pytestmark = pytest.mark.default_objective


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10)).eval()


X = torch.randn(1, 3, 16, 16)


@pytest.mark.default_objective
def test_default_objective_is_latency_on_the_target():
    cfg = ConvertConfig()
    assert cfg.objective == "latency" and cfg.target.backend == "cpu"
    assert ConvertConfig(objective="flops").target is None
    assert ConvertConfig(target="onnxruntime").objective == "latency"


def _whole_model_slower(hidden_ms: float):
    """Layers by FLOPs (replacements faster alone), but every separable module costs ``hidden_ms`` more inside a
    whole model: the plan must be checked whole."""
    layers = flops_timer()

    def timer(modules, shape, target):
        out = layers(modules, shape, target)
        for i, m in enumerate(modules):
            if isinstance(m, (torch.fx.GraphModule, nn.Sequential)):  # a whole model
                out[i] += hidden_ms * sum(isinstance(s, separify.SeparableConv2d) for s in m.modules())
        return out

    return timer


@pytest.mark.default_objective
def test_never_slower_drops_replacements_until_the_whole_model_is_faster():
    fine = separify.convert(_net(), example_inputs=X, timer=_whole_model_slower(0.0), latency_cache=False)
    assert fine.converted and fine.latency_ratio < 1
    slow = separify.convert(_net(), example_inputs=X, timer=_whole_model_slower(1e3), latency_cache=False)
    assert not slow.converted
    assert {r.reason_code for r in slow.layers if r.name != "0"} <= {Reason.NOT_FASTER, Reason.NO_SAVING}
    assert any("the original is kept" in w for w in slow.warnings)
    torch.testing.assert_close(slow.model(X), _net()(X), rtol=1e-4, atol=1e-5)


@pytest.mark.default_objective
def test_converted_model_has_every_batchnorm_folded():
    res = separify.convert(_net(), example_inputs=X, timer=flops_timer(), latency_cache=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in res.model.modules())


@pytest.mark.default_objective
def test_second_conversion_times_nothing(tmp_path, monkeypatch):
    cache = tmp_path / "latency.json"
    first = separify.convert(_net(), example_inputs=X, latency_cache=str(cache))
    assert first.latency_ratio is not None and first.latency_ratio < 1.0 or not first.converted

    def boom(*args, **kwargs):
        raise AssertionError("timed although the cache holds every timing")

    monkeypatch.setattr(latency, "measure_modules", boom)
    monkeypatch.setattr(latency, "time_model", boom)
    second = separify.convert(_net(), example_inputs=X, latency_cache=str(cache))
    assert [r.status for r in second.layers] == [r.status for r in first.layers]
    assert second.latency_ratio == first.latency_ratio  # the same readings of one run


def test_damaged_cache_is_ignored_with_a_warning_and_replaced(tmp_path):
    cache = tmp_path / "latency.json"
    cache.write_text("{not json")
    with pytest.warns(UserWarning, match="ignoring the latency cache"):
        res = separify.convert(_net(), example_inputs=X, objective="latency", latency_cache=str(cache))
    assert res.latency_ratio is not None
    assert json.loads(cache.read_text())["times_ms"]  # rewritten whole, atomically


def test_models_timed_together_are_cached_together(tmp_path):
    from separify.core.measure import Timing

    cache = latency.LatencyCache(tmp_path / "c.json")
    target = separify.LatencyTarget("cpu", threads=1)
    key = cache.models_key(target, ["a", "b"], [(1, 3, 8, 8)], 1.0)
    cache.put_timings(key, [Timing("torch-cpu", 2.0, 0.1, 10, 7, 1, 1), Timing("torch-cpu", 1.0, 0.1, 10, 7, 1, 1)])
    cache.save()
    again = latency.LatencyCache(tmp_path / "c.json")
    assert [t.median_ms for t in again.get_timings(key)] == [2.0, 1.0]
    assert again.get_timings(cache.models_key(target, ["a", "c"], [(1, 3, 8, 8)], 1.0)) is None
    assert json.loads((tmp_path / "c.json").read_text())["version"] == latency.LatencyCache.VERSION


def test_unknown_target_is_one_clear_error():
    with pytest.raises(ConfigError, match="unknown latency target 'tpu'"):
        separify.convert(_net(), example_inputs=X, target="tpu")


def test_unreachable_latency_budget_names_the_best_ratio():
    res = separify.convert(_net(), example_inputs=X, latency=0.01, timer=flops_timer(), latency_cache=False)
    assert any("cannot be reached" in w or "was not met" in w for w in res.warnings)
    assert res.latency_ratio is not None and res.latency_ratio < 1


# --- max_drop


def _agreement(reference):
    data = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def evaluate(model) -> float:
        top1, _ = separify.core.measure.agreement(reference, model, data)
        return top1

    return evaluate


def test_max_drop_returns_the_fastest_try_within_the_drop():
    net = _net()
    res = separify.convert(net, example_inputs=X, timer=flops_timer(), latency_cache=False, max_drop=0.1,
                           evaluate=_agreement(net), metric_name="agreement")
    s = res.search
    assert s.original == 1.0 and s.tries and s.metric == "agreement"
    chosen = s.chosen
    within = [t for t in s.tries if t.within]
    if chosen is None:
        assert not within and not res.converted
        assert {r.reason_code for r in res.layers if r.reason_code == Reason.ACCURACY}
    else:
        assert chosen.within and chosen.metric >= 1.0 - 0.1
        assert chosen.time_ratio == min(t.time_ratio for t in within)
        assert res.latency_ratio == pytest.approx(chosen.time_ratio)
    assert res.to_dict()["search"]["tries"]


def test_max_drop_zero_tolerance_keeps_the_original_when_every_plan_drops():
    net = _net()
    drop = {"n": 0}

    def evaluate(model) -> float:  # the original scores 1, every converted plan 0.5
        drop["n"] += 1
        return 1.0 if not any(isinstance(m, separify.SeparableConv2d) for m in model.modules()) else 0.5

    res = separify.convert(net, example_inputs=X, timer=flops_timer(), latency_cache=False, max_drop=0.0,
                           evaluate=evaluate)
    assert not res.converted and all(not t.within for t in res.search.tries)
    assert any(r.reason_code == Reason.ACCURACY for r in res.layers)
    assert any("the original is kept" in w for w in res.warnings)


@pytest.mark.parametrize("evaluate, match", [
    (lambda m: float("nan"), "returned nan"),
    (lambda m: 1 / 0, "raised on the original model: ZeroDivisionError"),
    (lambda m: "good", "expected a number"),
], ids=["nan", "raises", "not-a-number"])
def test_bad_metric_is_one_clear_error(evaluate, match):
    with pytest.raises(SeparifyError, match=match):
        separify.convert(_net(), example_inputs=X, timer=flops_timer(), latency_cache=False, max_drop=0.01,
                         evaluate=evaluate)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_drop=0.01), "needs evaluation data"),
    (dict(max_drop=1.5, evaluate=lambda m: 1.0), r"max_drop must be a number in \[0, 1\)"),
    (dict(max_drop=0.01, evaluate=lambda m: 1.0, objective="flops"), "needs objective='latency'"),
    (dict(evaluate=lambda m: 1.0), "give max_drop too"),
], ids=["no-data", "bad-drop", "flops-objective", "evaluate-alone"])
def test_bad_search_settings(kwargs, match):
    with pytest.raises(SeparifyError, match=match):
        separify.convert(_net(), example_inputs=X, timer=flops_timer(), latency_cache=False, **kwargs)


def test_cli_max_drop_without_data_is_refused(tmp_path):
    from typer.testing import CliRunner

    from separify.cli import app

    net = _net()
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(net, (X,)), path)
    res = CliRunner().invoke(app, ["convert", str(path), "-o", str(tmp_path / "o.pt2"), "--max-drop", "0.01",
                                   "--no-timing"])
    assert res.exit_code != 0 and "--max-drop needs evaluation data" in res.output
    assert not (tmp_path / "o.pt2").exists()


def test_the_cpu_target_runs_channels_last_by_default():
    import dataclasses

    assert separify.LatencyTarget().runs_channels_last and separify.LatencyTarget("cpu").channels_last is None
    assert not separify.LatencyTarget("cuda").runs_channels_last
    assert not separify.LatencyTarget("cpu", channels_last=False).runs_channels_last
    assert "channels-last" in separify.LatencyTarget("cpu", threads=1).describe()
    ort = dataclasses.replace(separify.LatencyTarget(), backend="onnxruntime")  # the default follows the backend
    assert not ort.runs_channels_last
    with pytest.raises(ConfigError, match="--channels-last apply to the cpu and cuda targets"):
        separify.LatencyTarget("onnxruntime", channels_last=True)


@pytest.mark.default_objective
@pytest.mark.parametrize("channels_last", [None, False], ids=["default", "contiguous"])
def test_the_converted_model_is_handed_back_as_it_was_timed(channels_last):
    target = separify.LatencyTarget("cpu", channels_last=channels_last)
    res = separify.convert(_net(), example_inputs=X, target=target, timer=flops_timer(), latency_cache=False)
    assert res.converted
    weights = [p for p in res.model.parameters() if p.dim() == 4]
    cl = [p.is_contiguous(memory_format=torch.channels_last) for p in weights]
    nchw = [p.is_contiguous() for p in weights]  # 1×1 and depthwise weights can be both
    assert (all(cl) and not all(nchw)) if channels_last is None else (all(nchw) and not all(cl))
    with torch.no_grad():  # the memory format changes strides, not values
        dense = res.model.to(memory_format=torch.contiguous_format)(X)
    torch.testing.assert_close(res.model(X), dense)


def test_the_original_is_timed_at_its_best_memory_format(monkeypatch):
    """The baseline is the faster of the original's contiguous and channels-last readings, taken in one run."""
    from separify.core import measure
    from separify.core.measure import Timing

    seen = []

    def fake_time_torch(models, inputs, **kw):  # contiguous weights read 2 ms, channels-last 3 ms (the original's)
        formats = [next(p for p in m.parameters() if p.dim() == 4).is_contiguous() for m in models]
        seen.append(formats)
        return [Timing("torch-cpu", 2.0 if f else 3.0, 0.1, 10, 7, 1, 1) for f in formats]

    monkeypatch.setattr(measure, "time_torch", fake_time_torch)
    net = _net()
    target = separify.LatencyTarget("cpu", threads=1)
    before, after = latency.time_model([net, net], (X,), target, run_time=0.01, either_format=[True, False])
    assert seen == [[False, True, False]]  # original channels-last and contiguous, the other channels-last
    assert (before.median_ms, after.median_ms) == (2.0, 3.0)
    contiguous = separify.LatencyTarget("cpu", threads=1, channels_last=False)
    latency.time_model([net, net], (X,), contiguous, run_time=0.01, either_format=[True, False])
    assert seen[-1] == [True, True]  # one format: nothing to choose


def test_cli_channels_last_and_contiguous_together_are_refused(tmp_path):
    from typer.testing import CliRunner

    from separify.cli import app

    res = CliRunner().invoke(app, ["convert", "-o", str(tmp_path / "o.pt2"), "--channels-last", "--contiguous"])
    assert res.exit_code != 0 and "give --channels-last or --contiguous, not both" in res.output
    assert not (tmp_path / "o.pt2").exists()
