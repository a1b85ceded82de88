"""Latency-aware conversion: equivalent layouts are exact, the selector follows the (injected) timings, the cache
round-trips. No assertion here depends on how fast this machine is."""

import copy
import json
import warnings

from separify.records import Reason
import pytest
import torch
import torchvision
from torch import nn

import separify
from separify.config import ConvertConfig
from separify.errors import ConfigError
from separify.planning.latency import LatencyCache, LatencyTarget, LayerTimer, measure_modules, module_spec, rank_grid
from separify.core.modules import DwPwConv2d, PwDwPwConv2d, SeparableConv2d
from timers import flops_timer as _flops_timer

# (in, out, kernel, stride, padding, dilation, padding_mode, bias)
CONFIGS = {
    "3x3": (6, 10, 3, 1, 1, 1, "zeros", True),
    "3x5-stride2-dil": (5, 7, (3, 5), 2, (1, 2), (2, 1), "zeros", False),
    "same-reflect": (4, 9, 3, 1, "same", 1, "reflect", True),
    "valid-7x7": (3, 8, 7, 1, 0, 1, "zeros", True),
    "circular-stride2": (6, 4, (5, 3), (2, 1), 2, 1, "circular", True),
    "replicate-dil2": (5, 12, 3, 1, 2, 2, "replicate", False),
}


def _conv(cfg):
    m, n, k, s, p, d, mode, bias = cfg
    return nn.Conv2d(m, n, k, stride=s, padding=p, dilation=d, padding_mode=mode, bias=bias).double()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("rank", [2, 3, "exact"])
def test_dwpw_layouts_are_exact(name, rank):
    torch.manual_seed(0)
    conv = _conv(CONFIGS[name])
    x = torch.randn(2, conv.in_channels, 11, 13, dtype=torch.float64)
    ref = DwPwConv2d.from_conv(conv, None if rank == "exact" else min(rank, DwPwConv2d.max_rank(conv)))
    assert ref.layouts() == ["multiplier", "split", "repeat", "branches"]
    y = ref(x)
    for layout in ref.layouts():
        mod = copy.deepcopy(ref).set_layout(layout)
        assert mod.layout == layout and mod.rank == ref.rank
        torch.testing.assert_close(mod(x), y, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mod.dense_weight(), ref.dense_weight(), rtol=1e-12, atol=1e-12)
        for back in DwPwConv2d.LAYOUTS:  # any layout to any other
            torch.testing.assert_close(copy.deepcopy(mod).set_layout(back)(x), y, rtol=1e-12, atol=1e-12)
    if rank == "exact":
        torch.testing.assert_close(copy.deepcopy(ref).set_layout("split")(x), conv(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("layout", ["repeat", "split"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_dwpw_layouts_in_their_exported_form_are_exact(name, layout, monkeypatch):
    """Under ONNX export the repeat layout tiles the input, the split layout concatenates the K depthwise outputs,
    and both permute the factors to that channel order (what the ONNX pass writes)."""
    torch.manual_seed(0)
    conv = _conv(CONFIGS[name])
    x = torch.randn(2, conv.in_channels, 11, 13, dtype=torch.float64)
    mod = DwPwConv2d.from_conv(conv, min(3, DwPwConv2d.max_rank(conv))).set_layout(layout)
    eager = mod(x)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    torch.testing.assert_close(mod(x), eager, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout, op, convs", [("repeat", "Tile", 2), ("split", "Concat", 3)])
def test_dwpw_layouts_export_as_the_onnx_pass_writes_them(tmp_path, layout, op, convs):
    import numpy as np
    import onnx
    import onnxruntime as ort

    conv = nn.Conv2d(4, 6, 3, padding=1)
    mod = DwPwConv2d.from_conv(conv, 2).set_layout(layout).eval()
    x = torch.randn(1, 4, 8, 8)
    path = str(tmp_path / "m.onnx")
    torch.onnx.export(mod, (x,), path, dynamo=False, input_names=["x"])
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert op in ops and ops.count("Conv") == convs
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    np.testing.assert_allclose(got[0], mod(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_dwpw_rank1_has_one_layout():
    mod = DwPwConv2d.from_conv(_conv(CONFIGS["3x3"]), 1)
    assert mod.layouts() == ["multiplier"]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("rank", [5, 13, 16])
def test_pwdwpw_padded_layouts_are_exact(name, rank):
    torch.manual_seed(1)
    conv = _conv(CONFIGS[name])
    ref = PwDwPwConv2d.from_conv(conv, rank, max_iter=3)
    x = torch.randn(2, conv.in_channels, 11, 13, dtype=torch.float64)
    expected = {5: ["plain", "pad8", "pad16"], 13: ["plain", "pad8"], 16: ["plain"]}[rank]
    assert ref.layouts() == expected
    for layout in ref.layouts():
        mod = copy.deepcopy(ref).set_layout(layout)
        multiple = int(layout[3:]) if layout != "plain" else 1
        assert mod.rank % multiple == 0 and mod.rank >= rank
        assert mod.conv_pw_in.out_channels == mod.conv_dw.in_channels == mod.conv_pw_out.in_channels == mod.rank
        torch.testing.assert_close(mod(x), ref(x), rtol=1e-12, atol=1e-12)
        assert (mod.bias is None) == (conv.bias is None)


def test_layouts_train_and_export():
    """A split-layout module is an ordinary module: gradients reach its factors, torch.export traces it."""
    conv = nn.Conv2d(4, 6, 3, padding=1)
    mod = DwPwConv2d.from_conv(conv, 2).set_layout("split")
    x = torch.randn(1, 4, 8, 8)
    mod(x).sum().backward()
    assert mod.conv_dw.weight.grad is not None and mod.conv_pw.weight.grad.abs().sum() > 0
    program = torch.export.export(mod.eval(), (x,))
    torch.testing.assert_close(program.module()(x), mod(x))


def test_layouts_share_one_state_dict_and_calibration():
    """Every layout stores the same factors the same way: a state dict loads into any layout, and the
    least-squares refit (which hooks the last 1×1 conv) works on a model in any layout and keeps it."""
    from separify.calibration import refit_pointwise

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    ref = DwPwConv2d.from_conv(conv, 2)
    x = torch.randn(3, 4, 9, 9)
    for layout in DwPwConv2d.LAYOUTS:
        other = DwPwConv2d.like(conv, 2).set_layout(layout)
        other.load_state_dict(copy.deepcopy(ref).set_layout("branches").state_dict())
        torch.testing.assert_close(other(x), ref(x), rtol=1e-5, atol=1e-5)
        model = nn.Sequential(copy.deepcopy(ref).set_layout(layout))
        fits = refit_pointwise(model, ["0"], {"0": conv(x).detach()}, x)
        assert len(fits) == 1 and fits[0].error_after < fits[0].error_before and model[0].layout == layout


def test_padding_keeps_the_modules_and_their_flags():
    mod = PwDwPwConv2d.from_conv(nn.Conv2d(4, 6, 3), 5, max_iter=1)
    inner = mod.conv_dw
    mod.conv_pw_in.weight.requires_grad_(False)
    mod.set_layout("pad8")
    assert mod.conv_dw is inner and mod.rank == 8 and mod.conv_dw.weight.shape == (8, 1, 3, 3)
    assert not mod.conv_pw_in.weight.requires_grad and mod.conv_pw_out.weight.requires_grad


def test_unknown_layout_is_refused():
    mod = DwPwConv2d.from_conv(nn.Conv2d(4, 6, 3), 2)
    with pytest.raises(ConfigError, match="unknown dw-pw layout"):
        mod.set_layout("pad8")
    with pytest.raises(ConfigError, match="unknown pw-dw-pw layout"):
        PwDwPwConv2d.from_conv(nn.Conv2d(4, 6, 3), 3, max_iter=1).set_layout("split")


def test_rank_grid():
    assert rank_grid("dw-pw", range(1, 8)) == list(range(1, 8))
    grid = rank_grid("pw-dw-pw", range(1, 2000))
    assert all(r % 16 == 0 for r in grid) and grid[0] == 16 and grid[-1] == 1984 and len(grid) <= 12
    assert rank_grid("pw-dw-pw", range(1, 15)) == [8]  # no multiple of 16 saves: multiples of 8
    assert rank_grid("pw-dw-pw", range(1, 6)) == [1, 2, 3, 5]  # too small for a multiple of 8
    assert rank_grid("pw-dw-pw", []) == []


# --------------------------------------------------------------------------------------------------------------
# The selector, with injected timing functions


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 32, 3, padding=1)
        self.c = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Conv2d(32, 10, 1)

    def forward(self, x):
        return self.head(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


def _net():
    torch.manual_seed(0)
    return Net().eval(), torch.randn(1, 3, 16, 16)


def test_selector_keeps_the_original_when_every_candidate_is_slower():
    net, x = _net()
    res = separify.convert(net, example_inputs=x, objective="latency", latency_cache=False,
                           timer=_flops_timer(slow_factor=50.0))
    assert not res.converted
    for name in ("a", "b", "c"):
        rec = next(r for r in res.layers if r.name == name)
        assert rec.reason.startswith("no replacement measured faster than the dense conv by 5%"), rec.reason
        assert rec.time_before_ms > 0 and rec.time_after_ms is None
    assert not any(isinstance(m, SeparableConv2d) for m in res.model.modules())
    torch.testing.assert_close(res.model(x), net(x))


def test_selector_converts_when_faster_and_picks_the_fastest_layout():
    net, x = _net()
    res = separify.convert(net, example_inputs=x, method="dw-pw", rank=2, objective="latency", latency_cache=False,
                           timer=_flops_timer(slow_factor=0.9, favour="repeat"))
    assert {r.name for r in res.converted} == {"a", "b", "c"}
    for rec in res.converted:
        assert rec.layout == "repeat" and rec.time_after_ms < rec.time_before_ms
        assert dict(res.model.named_modules())[rec.name].layout == "repeat"
    # the layout changes nothing but speed: same outputs as the plain FLOPs conversion at the same ranks
    plain = separify.convert(net, example_inputs=x, method="dw-pw", rank=2)
    torch.testing.assert_close(res.model(x), plain.model(x), rtol=1e-5, atol=1e-5)
    assert res.latency_ratio < 1.0 and res.latency_predicted < 1.0


def test_margin_keeps_a_layer_that_is_only_slightly_faster():
    net, x = _net()
    res = separify.convert(net, example_inputs=x, rank=8, objective="latency", latency_cache=False, margin=0.5,
                           timer=_flops_timer(slow_factor=1.0))
    # layer a (3 → 16): pw-dw-pw at R = 8 costs 52% of its FLOPs (timed in proportion), faster but not by 50%
    rec_a = next(r for r in res.layers if r.name == "a")
    assert not rec_a.converted and "faster than the dense conv by 50%" in rec_a.reason
    ok = separify.convert(net, example_inputs=x, rank=8, objective="latency", latency_cache=False, margin=0.0,
                          timer=_flops_timer(slow_factor=1.0))
    assert "a" in {r.name for r in ok.converted}


def test_padded_layouts_never_break_the_flops_target():
    """A timer that makes padded layouts fastest: under a FLOPs target they are not used (the target counts the
    rank's FLOPs); with a fixed rank they are, only at widths that still save FLOPs."""
    net, x = _net()
    res = separify.convert(net, example_inputs=x, flops=0.5, objective="latency", latency_cache=False,
                           timer=_flops_timer(slow_factor=0.9, favour="pad16"))
    assert res.converted and res.flops_ratio <= 0.5 + 1e-6
    assert all(not r.layout.startswith("pad") for r in res.converted)
    fixed = separify.convert(net, example_inputs=x, rank=5, objective="latency", latency_cache=False,
                             timer=_flops_timer(slow_factor=0.9, favour="pad16"))
    for rec in fixed.converted:
        assert rec.flops_after < rec.flops_before
    assert any(r.layout == "pad16" for r in fixed.converted)


def test_latency_budget_is_allocated_by_measured_time():
    net, x = _net()
    tight = separify.convert(net, example_inputs=x, latency=0.4, latency_cache=False, timer=_flops_timer())
    loose = separify.convert(net, example_inputs=x, latency=0.9, latency_cache=False, timer=_flops_timer())
    for res, budget in ((tight, 0.4), (loose, 0.9)):
        assert res.config.selection == "latency" and res.config.objective == "latency"
        assert res.latency_predicted <= budget + 1e-9
        assert all(r.rank % 8 == 0 for r in res.converted)  # the pw-dw-pw grid: multiples of 16, or 8 if small
    err = lambda res: sum((r.rel_error or 0) ** 2 for r in res.converted)  # noqa: E731
    assert tight.latency_predicted < loose.latency_predicted and err(tight) > err(loose)


def test_report_shows_the_selection_times(tmp_path):
    import jsonschema

    from separify.reporting import layer_table, schema

    net, x = _net()
    res = separify.convert(net, example_inputs=x, method="dw-pw", rank=2, objective="latency", latency_cache=False,
                           timer=_flops_timer(slow_factor=0.9, favour="split"))
    rep = separify.report(net, res, example_inputs=x, latency=False, onnx=False, per_layer=False)
    doc = rep.to_dict()
    jsonschema.validate(doc, schema())
    rows = {r["name"]: r for r in doc["layers"]}
    for rec in res.converted:
        row = rows[rec.name]
        assert row["layout"] == "split"
        assert row["selected_ms_before"]["value"] == pytest.approx(rec.time_before_ms)
        assert row["selected_ms_after"]["value"] == pytest.approx(rec.time_after_ms)
        assert "selected on torch-cpu" in row["note"]
    sel = doc["conversion"]["latency_selection"]
    assert sel["ratio"]["value"] == pytest.approx(res.latency_ratio) and doc["conversion"]["objective"] == "latency"
    assert layer_table(rep).row_count == len(doc["layers"])


def test_latency_budget_is_checked_on_the_whole_model():
    """Inside a model, separable layers gain less than alone (here: 0.3 ms more per separable layer): the plan
    is made again, aiming lower, until the whole model meets the budget."""
    net, x = _net()
    layers = _flops_timer()

    def timer(modules, shape, target):
        out = []
        for m in modules:
            if isinstance(m, (nn.Conv2d, SeparableConv2d)):
                out += layers([m], shape, target)
            else:  # a whole model
                extra = 0.3 * sum(isinstance(s, SeparableConv2d) for s in m.modules())
                out.append(separify.core.measure.count_flops(m, torch.zeros(shape)) / 1e6 + extra)
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "target not met" warning
        res = separify.convert(net, example_inputs=x, latency=0.5, latency_cache=False, timer=timer)
    assert res.converted and res.latency_ratio <= 0.5 * 1.02
    assert res.latency_predicted < 0.5 - 0.05  # the layer times alone had to aim lower
    one_shot = separify.convert(net, example_inputs=x, latency=0.5, latency_cache=False, timer=layers)
    assert one_shot.latency_predicted == pytest.approx(one_shot.latency_ratio)  # no hidden cost: planned once


def test_cache_round_trip(tmp_path, monkeypatch):
    conv = nn.Conv2d(8, 16, 3, padding=1)
    target = LatencyTarget("cpu", threads=1)
    path = tmp_path / "cache" / "latency.json"
    calls = []

    def fake_measure(modules, shape, tgt):
        calls.append([module_spec(m)["op"] for m in modules])
        return [1.0 + i for i in range(len(modules))]

    monkeypatch.setattr("separify.planning.latency.measure_modules", fake_measure)
    timer = LayerTimer(target, cache=LatencyCache(path))
    first = timer.time(conv, PwDwPwConv2d, [8, 16], (1, 8, 12, 12))
    assert len(calls) == 1 and not path.exists()  # written on save only
    timer.cache.save()
    data = json.loads(path.read_text())
    # dense, R=8 plain, R=8 padded to 16, R=16 plain
    assert data["version"] == LatencyCache.VERSION and len(data["times_ms"]) == 4
    again = LayerTimer(target, cache=LatencyCache(path))
    second = again.time(conv, PwDwPwConv2d, [8, 16], (1, 8, 12, 12))
    assert len(calls) == 1 and again.cache.hits == 4 and again.cache.misses == 0
    assert second.dense_ms == first.dense_ms and second.best == first.best
    # another batch size, dtype or thread count is another key
    for other in (LatencyTarget("cpu", threads=1, batch_size=4), LatencyTarget("cpu", threads=1, dtype="bfloat16"),
                  LatencyTarget("cpu", threads=2), LatencyTarget("cpu", threads=1, channels_last=False),
                  LatencyTarget("onnxruntime", threads=1)):
        LayerTimer(other, cache=LatencyCache(path)).time(conv, PwDwPwConv2d, [8], (1, 8, 12, 12))
    assert len(calls) == 6


def test_damaged_cache_is_ignored_with_a_warning(tmp_path):
    path = tmp_path / "latency.json"
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="ignoring the latency cache"):
        cache = LatencyCache(path)
    cache.put("k", 1.5)
    cache.save()
    assert LatencyCache(path).get("k") == 1.5


def test_convert_uses_the_cache_on_the_second_run(tmp_path, monkeypatch):
    net, x = _net()
    calls = []
    real = _flops_timer()

    def fake_measure(modules, shape, target):
        calls.append(len(modules))
        return real(modules, shape, target)

    monkeypatch.setattr("separify.planning.latency.measure_modules", fake_measure)
    monkeypatch.setattr("separify.planning.latency.time_model", lambda models, inputs, target, scale=1.0, **kw: [
        separify.core.measure.Timing("torch-cpu", 1.0, 0.0, 1, 1, 1, 1) for _ in models])
    path = tmp_path / "latency.json"
    first = separify.convert(net, example_inputs=x, objective="latency", latency_cache=str(path))
    n = len(calls)
    assert n >= 3 and path.exists()
    second = separify.convert(net, example_inputs=x, objective="latency", latency_cache=str(path))
    assert len(calls) == n  # every layer time came from the cache
    assert [(r.rank, r.layout) for r in second.layers] == [(r.rank, r.layout) for r in first.layers]


def test_the_final_check_reuses_the_reading_of_the_planned_model(monkeypatch):
    """The planned whole model (untrained factors) and the converted one have the same structure: the final check
    is the plan's own reading, one speed figure per model and target, not a second timing."""
    net, x = _net()
    monkeypatch.setattr("separify.planning.latency.measure_modules", _flops_timer())
    calls = []

    def fake_time_model(models, inputs, target, scale=1.0, **kw):
        calls.append(scale)
        return [separify.core.measure.Timing("torch-cpu", ms, 0.0, 1, 1, 1, 1) for ms in (1.0, 0.8)]

    monkeypatch.setattr("separify.planning.latency.time_model", fake_time_model)
    res = separify.convert(net, example_inputs=x, objective="latency", latency_cache=False)
    assert res.converted and calls == [1.0]
    assert res.latency_ratio == pytest.approx(0.8)


def test_a_plan_that_reads_slower_whole_is_not_kept(monkeypatch):
    """Never slower: a planned model that reads slower than the original loses replacements until it is not."""
    net, x = _net()
    monkeypatch.setattr("separify.planning.latency.measure_modules", _flops_timer())

    def fake_time_model(models, inputs, target, scale=1.0, **kw):
        return [separify.core.measure.Timing("torch-cpu", ms, 0.0, 1, 1, 1, 1) for ms in (1.0, 1.2)]

    monkeypatch.setattr("separify.planning.latency.time_model", fake_time_model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = separify.convert(net, example_inputs=x, objective="latency", latency_cache=False)
    assert not res.converted
    assert any(r.reason_code == Reason.NOT_FASTER for r in res.layers)
    assert any("the original is kept" in str(w.message) for w in caught)


# --------------------------------------------------------------------------------------------------------------
# Real timing plumbing (what is measured is not asserted, only that it is measured)


@pytest.mark.parametrize("backend", ["cpu", "onnxruntime"])
def test_measure_modules_times_every_candidate(backend):
    conv = nn.Conv2d(8, 8, 3, padding=1)
    mods = [conv, DwPwConv2d.like(conv, 2).set_layout("split"), PwDwPwConv2d.like(conv, 8)]
    ms = measure_modules(mods, (1, 8, 10, 10), LatencyTarget(backend, threads=1, min_run_time=0.01))
    assert len(ms) == 3 and all(v > 0 for v in ms)


def test_onnxruntime_target_times_float64_layers():
    conv = nn.Conv2d(4, 4, 3, padding=1).double()
    times = LayerTimer(LatencyTarget("onnxruntime", threads=1, min_run_time=0.01)).time(conv, DwPwConv2d, [1],
                                                                                         (1, 4, 8, 8))
    assert times.dense_ms > 0 and times.best[1][1] > 0


def test_report_of_a_reloaded_pt2_with_layouts(tmp_path):
    """A .pt2 of a model in non-default layouts loads and reports (its layers' FLOPs may be unmeasurable)."""
    from separify.io.models import load_model, save_model

    net, x = _net()
    res = separify.convert(net, example_inputs=x, method="dw-pw", rank=2, objective="latency", latency_cache=False,
                           timer=_flops_timer(slow_factor=0.9, favour="split"))
    path = tmp_path / "m.pt2"
    save_model(res.model, path, (x,))
    loaded = load_model(path).model
    torch.testing.assert_close(loaded(x), res.model(x), rtol=1e-5, atol=1e-5)
    rep = separify.report(net, loaded, example_inputs=x, latency=False, onnx=False, per_layer=False)
    assert rep.flops_ratio < 1.0 and {r.name for r in rep.layers} >= {"a", "b", "c"}


def test_real_latency_conversion_of_resnet18_is_consistent(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    res = separify.convert(net, example_inputs=x, method="dw-pw", rank=1, objective="latency",
                           target=LatencyTarget("cpu", threads=1, min_run_time=0.01), latency_cache=str(tmp_path / "c"))
    assert res.converted  # K = 1 has about 1/9 of a 3×3 conv's FLOPs: some layer is measured faster
    timed = [r for r in res.layers if r.time_before_ms is not None]
    assert len(timed) == 17  # the stem and 16 3×3 convs; the 1×1 downsamples are never candidates
    for rec in timed:
        if rec.converted:
            assert rec.layout in DwPwConv2d.LAYOUTS and rec.time_after_ms < 0.95 * rec.time_before_ms
        else:
            assert rec.reason
    assert res.latency_before.median_ms > 0 and res.latency_after.median_ms > 0
    ref = separify.convert(net, example_inputs=x, method="dw-pw", rank=1,
                           exclude=tuple(r.name for r in res.layers if not r.converted))
    torch.testing.assert_close(res.model(x), ref.model(x), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# Bad settings


def test_bad_latency_settings():
    with pytest.raises(ConfigError, match="unknown latency target"):
        ConvertConfig(objective="latency", target="tpu")
    with pytest.raises(ConfigError, match="float16"):
        LatencyTarget("cpu", dtype="float16")
    with pytest.raises(ConfigError, match="onnxruntime target"):
        LatencyTarget("onnxruntime", channels_last=True)
    with pytest.raises(ConfigError, match="only one of"):
        ConvertConfig(latency=0.5, flops=0.5)
    with pytest.raises(ConfigError, match="needs objective='latency'"):
        ConvertConfig(objective="flops", target="cpu")
    with pytest.raises(ConfigError, match="margin"):
        ConvertConfig(objective="latency", margin=1.5)
    assert ConvertConfig(latency=0.6).objective == "latency"
    assert ConvertConfig(objective="latency").target == LatencyTarget("cpu")
    back = ConvertConfig(latency=0.6, target="onnxruntime").replace(objective="flops")
    assert back.objective == "flops" and back.target is None and back.selection == "flops"
    with pytest.raises(ConfigError, match="bad latency target"):
        ConvertConfig(objective="latency", target={"backend": "cpu", "thread": 2})
    net, x = _net()
    with pytest.raises(separify.SeparifyError, match="timing function returned"):
        separify.convert(net, example_inputs=x, latency=0.5, latency_cache=False,
                         timer=lambda mods, shape, target: [0.0] * len(mods))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_target_without_gpu_says_so():
    net, x = _net()
    with pytest.raises(separify.SeparifyError, match="no CUDA device"):
        separify.convert(net, example_inputs=x, objective="latency", target="cuda", latency_cache=False)


def test_onnx_input_takes_the_latency_objective_through_convert(tmp_path):
    """separify.convert hands an ONNX file to the ONNX pass with the timing function; the layers are timed as
    modules, the whole graphs as OrtModule (here: 1 ms for the original, 0.8 ms for the planned and the converted
    one; an injected timer is not cached, so both are timed)."""
    from separify.backends.onnx import OrtModule

    net, x = _net()
    path = tmp_path / "m.onnx"
    torch.onnx.export(net, (x,), str(path), dynamo=False)
    layers = _flops_timer(slow_factor=0.9)
    whole = []

    def timer(modules, shape, target):
        out = []
        for m in modules:
            if isinstance(m, OrtModule):
                out.append(1.0 if len(whole) % 2 == 0 else 0.8)  # (original, planned or converted)
                whole.append(m)
            else:
                out += layers([m], shape, target)
        return out

    res = separify.convert(str(path), example_inputs=x, objective="latency", rank=8, latency_cache=False,
                           timer=timer)
    assert res.path == "onnx" and res.converted and len(whole) == 4  # the plan checked whole, then the result
    assert res.latency_ratio == pytest.approx(0.8) and res.latency_target.startswith("onnxruntime-cpu")
    assert all(r.time_after_ms < r.time_before_ms for r in res.converted)


def test_cli_latency_options(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from separify.cli import app

    monkeypatch.setenv("SEPARIFY_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "out.pt2"
    runner = CliRunner()
    res = runner.invoke(app, ["convert", "-o", str(out), "--objective", "latency", "--rank", "8", "--no-onnx",
                              "--no-layers", "--no-timing", "--threads", "1", "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    assert "latency objective on torch-cpu float32 channels-last, batch 2, 1 threads" in res.stdout
    assert (tmp_path / "cache" / "latency.json").exists() and out.exists()
    bad = runner.invoke(app, ["convert", "-o", str(tmp_path / "x.pt2"), "--dtype", "bfloat16"])
    assert bad.exit_code == 1 and "--dtype apply to --objective latency" in bad.stderr
    assert bad.exception is None or isinstance(bad.exception, SystemExit)
    # the spelling (--latency L, --batch-size B) and the longer names are the same options
    for budget in ("--latency", "--latency-budget"):
        both = runner.invoke(app, ["convert", "-o", str(tmp_path / "y.pt2"), budget, "0.5", "--flops", "0.5"])
        assert both.exit_code == 1 and "only one of" in both.stderr
    tune_batch = runner.invoke(app, ["convert", "-o", str(tmp_path / "z.pt2"), "--batch-size", "8"])
    assert tune_batch.exit_code == 1 and "--batch-size apply to --objective latency" in tune_batch.stderr
    assert "--finetune-batch-size" in tune_batch.stderr and not (tmp_path / "z.pt2").exists()
