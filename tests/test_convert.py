"""Whole-model conversion: real torchvision architectures (random weights), the module-tree fallback, what is skipped
and why, rank selection, and that the input model is never touched."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import fx, nn

import separify
from separify import ConvertConfig, DwPwConv2d, LayerRule, PwDwPwConv2d
from separify.errors import BadWeightsError, ConfigError, SeparifyError
from separify.core.modules import SeparableConv2d


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that folding is really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def _eligible_dense(model: nn.Module) -> list[str]:
    """Names of plain k×k (k > 1), groups == 1 Conv2d modules still in ``model`` (outside separable blocks, where a
    rank-1 depthwise conv has a single channel and so also groups == 1)."""
    inside = {f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, SeparableConv2d)
              for c, _ in m.named_children()}
    return [n for n, m in model.named_modules() if type(m) is nn.Conv2d and m.groups == 1
            and tuple(m.kernel_size) != (1, 1) and n not in inside]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


ARCHS = {
    "resnet18": (lambda: torchvision.models.resnet18(), (1, 3, 48, 48)),
    "vgg11_bn": (lambda: torchvision.models.vgg11_bn(), (1, 3, 32, 32)),
    "googlenet": (lambda: torchvision.models.googlenet(aux_logits=False, init_weights=False), (1, 3, 48, 48)),
}


@pytest.mark.parametrize("method", ["dw-pw", "pw-dw-pw"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_full_rank_model_is_exact(arch, method):
    build, shape = ARCHS[arch]
    torch.manual_seed(0)
    model = _randomise_bn(build()).eval().double()
    x = torch.randn(shape, dtype=torch.float64)
    before = _state(model)
    res = separify.convert(model, example_inputs=x, method=method, rank=10_000, require_saving=False)
    assert res.path == "fx"
    torch.testing.assert_close(res.model(x), model(x), rtol=1e-8, atol=1e-8)
    assert _eligible_dense(res.model) == []
    n_eligible = len(_eligible_dense(model))
    assert len(res.converted) == n_eligible
    for rec in res.converted:
        assert rec.rank == rec.exact_rank and rec.rel_error < 1e-10
    # the input is untouched
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, SeparableConv2d) for m in model.modules())


def test_batchnorm_is_folded_and_removed():
    model = _randomise_bn(torchvision.models.resnet18()).eval()
    res = separify.convert(model, example_inputs=torch.randn(1, 3, 32, 32), rank=2)
    folded = {r.bn_folded for r in res.converted}
    assert "bn1" in folded and "layer1.0.bn1" in folded
    names = dict(res.model.named_modules())
    assert "layer1.0.bn1" not in names and "layer2.0.downsample.1" in names  # BN after a skipped 1×1 stays
    assert isinstance(res.model, fx.GraphModule)
    res.model.graph.lint()


@pytest.mark.parametrize("method", ["dw-pw", "pw-dw-pw"])
def test_low_rank_leaves_no_eligible_dense_conv(method):
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    res = separify.convert(model, example_inputs=x, method=method, rank=1)
    assert _eligible_dense(res.model) == []
    assert res.flops_after < res.flops_before
    kinds = {DwPwConv2d: "dw-pw", PwDwPwConv2d: "pw-dw-pw"}
    assert {kinds[type(m)] for m in res.model.modules() if isinstance(m, SeparableConv2d)} == {method}
    assert res.model(x).shape == (1, 1000)
    skipped = {r.name: r.reason for r in res.skipped}
    assert set(skipped) == {"layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"}
    assert all("1×1" in reason for reason in skipped.values())


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, (3, 5), padding="same", padding_mode="reflect")
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.bn(self.conv1(x))
        if y.sum() > 0:
            y = torch.relu(y)
        return self.head(self.conv2(y))

    def extra_method(self):
        return "kept"


@pytest.mark.parametrize("method", ["dw-pw", "pw-dw-pw"])
def test_untraceable_model_uses_module_tree(method):
    torch.manual_seed(0)
    model = _randomise_bn(Untraceable()).eval().double()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    res = separify.convert(model, example_inputs=x, method=method, rank=10_000, require_saving=False)
    assert res.path == "module-tree" and res.trace_error
    assert isinstance(res.model, Untraceable) and res.model.extra_method() == "kept"
    torch.testing.assert_close(res.model(x), model(x), rtol=1e-9, atol=1e-9)
    assert _eligible_dense(res.model) == []
    assert {r.name for r in res.converted} == {"conv1", "conv2"}
    assert all(r.bn_folded is None for r in res.layers)
    assert isinstance(model.conv1, nn.Conv2d)  # input untouched


def test_tracer_fx_refuses_untraceable():
    with pytest.raises(SeparifyError, match="could not trace"):
        separify.convert(Untraceable().eval(), example_inputs=torch.randn(1, 3, 8, 8), tracer="fx", rank=1)


def test_grouped_and_depthwise_convs_are_skipped_with_reason():
    model = torchvision.models.mobilenet_v2().eval()
    res = separify.convert(model, example_inputs=torch.randn(1, 3, 32, 32), rank=1)
    reasons = {r.name: r.reason for r in res.skipped}
    assert reasons["features.1.conv.0.0"] == "already depthwise (groups=32)"
    assert all(r.reason for r in res.skipped)
    assert [r.name for r in res.converted] == ["features.0.0"]  # the only dense 3×3 conv

    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Conv2d(8, 16, 3, groups=4)
            self.c1 = nn.Conv1d(16, 16, 3)

        def forward(self, x):
            y = self.g(x)
            return self.c1(y.flatten(2))

    res = separify.convert(Grouped(), example_inputs=torch.randn(1, 8, 9, 9), rank=1)
    reasons = {r.name: r.reason for r in res.layers}
    assert reasons == {"g": "grouped conv (groups=4)", "c1": "Conv1d is not a 2-D convolution"}
    assert res.warnings and "no layer was converted" in res.warnings[0]


class _StdConv(nn.Conv2d):
    """A conv subclass from outside torch.nn, as timm's ScaledStdConv2d: its forward standardises the weight and calls
    F.conv2d itself, with its padding computed from the input's shape (control flow the tracer cannot follow)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        pad = 1 if x.shape[-1] % 2 == 0 else 1  # a shape read: tracing through it would fail
        return nn.functional.conv2d(x, w, self.bias, padding=pad)


def test_conv_subclasses_are_listed_with_their_reason_and_kept():
    """The tracer keeps every conv module whole: a subclass neither breaks the trace nor vanishes into functional
    calls; it is listed, left alone with its reason, and the plain convs around it are converted on the fx path."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), _StdConv(8, 8, 3), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(2, 3, 10, 10)
    res = separify.convert(model, example_inputs=x[:1], method="dw-pw", rank=10_000, require_saving=False)
    assert res.path == "fx"
    reasons = {r.name: r.reason for r in res.layers}
    assert reasons["2"] == "_StdConv subclasses nn.Conv2d and may change its forward; only plain nn.Conv2d is converted"
    assert [r.name for r in res.converted] == ["0", "4"]
    torch.testing.assert_close(res.model(x), model(x), rtol=1e-4, atol=1e-5)


def test_exclusions_rules_and_records():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    cfg = ConvertConfig(method="dw-pw", rank=2, exclude=("layer4.*",), rules=(LayerRule("layer3.*", method="pw-dw-pw", rank=64),))
    res = separify.convert(model, cfg, example_inputs=x)
    by = {r.name: r for r in res.layers}
    assert by["layer4.1.conv2"].reason == "excluded by pattern 'layer4.*'"
    assert by["layer3.1.conv1"].method == "pw-dw-pw" and by["layer3.1.conv1"].rank == 64
    assert by["layer3.1.conv1"].rank_source == "rule 'layer3.*'"
    assert by["layer1.0.conv1"].method == "dw-pw" and by["layer1.0.conv1"].rank == 2
    assert isinstance(res.model.get_submodule("layer3.1.conv1"), PwDwPwConv2d)
    assert type(res.model.get_submodule("layer4.1.conv2")) is nn.Conv2d
    rec = by["layer1.0.conv1"]
    assert rec.flops_before == 2 * 64 * 64 * 9 * 8 * 8  # 2·MACs at 8×8 output
    assert rec.flops_after == 2 * (64 * 2 * 9 + 64 * 2 * 64) * 8 * 8
    assert 0 < rec.rel_error < 1
    assert res.to_dict()["layers"][0]["name"] == "conv1"


def test_exclusions_that_leave_nothing_warn():
    model = torchvision.models.resnet18().eval()
    with pytest.warns(UserWarning, match="no layer was converted"):
        res = separify.convert(model, example_inputs=torch.randn(1, 3, 32, 32), rank=1, exclude=("*",))
    assert res.converted == [] and res.flops_after == res.flops_before


@pytest.mark.parametrize("method, target", [("dw-pw", 0.25), ("dw-pw", 0.5), ("dw-pw", 0.75), ("pw-dw-pw", 0.25),
                                            ("pw-dw-pw", 0.5)])
def test_flops_target_is_met(method, target):
    model = torchvision.models.resnet18().eval()
    # the ranks are allocated before any CP-ALS runs: 3 sweeps instead of 25 leave them as they are
    res = separify.convert(model, example_inputs=torch.randn(1, 3, 32, 32), method=method, flops=target,
                           cp_max_iter=3)
    assert res.flops_ratio <= target + 1e-9
    assert res.flops_ratio > target - 0.05  # the budget is used, not wasted
    assert not res.warnings


def test_unreachable_flops_target_warns():
    model = torchvision.models.resnet18().eval()
    with pytest.warns(UserWarning, match="cannot be reached"):
        res = separify.convert(model, example_inputs=torch.randn(1, 3, 32, 32), flops=0.01)
    assert all(r.rank == 1 for r in res.converted)


def test_energy_selection_and_no_saving_skip():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    res = separify.convert(model, example_inputs=x, method="dw-pw", energy=0.5)
    assert len(res.converted) == 17
    for r in res.converted:
        assert r.rank_source == "energy" and 1 - r.rel_error ** 2 >= 0.5 - 1e-9
    # nearly all the energy needs ranks that cost more than the dense conv: those layers are skipped, with the reason
    res = separify.convert(model, example_inputs=x, method="dw-pw", energy=0.999)
    assert res.converted == []
    assert all(r.reason.startswith(("no FLOPs saved at rank", "1×1")) for r in res.skipped)


def test_shared_conv_is_replaced_everywhere():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(torch.relu(self.conv(x)))

    model = Shared().double()
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    res = separify.convert(model, example_inputs=x, method="dw-pw", rank=9, require_saving=False)
    torch.testing.assert_close(res.model(x), model(x), rtol=1e-10, atol=1e-10)
    assert res.layers[0].flops_before == 2 * 2 * 4 * 4 * 9 * 64  # two calls


def test_inplace_and_default_copy():
    model = Untraceable().eval()
    x = torch.randn(1, 3, 8, 8)
    res = separify.convert(model, example_inputs=x, rank=1)
    assert type(model.conv1) is nn.Conv2d and res.model is not model
    res = separify.convert(model, example_inputs=x, method="dw-pw", rank=1, inplace=True)
    assert res.model is model and isinstance(model.conv1, DwPwConv2d)


def test_training_mode_bn_is_not_folded():
    model = torchvision.models.resnet18().train()
    res = separify.convert(model, example_inputs=torch.randn(2, 3, 32, 32), rank=2)
    rec = next(r for r in res.converted if r.name == "layer1.0.conv1")
    assert rec.bn_folded is None and "training mode" in rec.note
    assert res.model.training


def test_nan_weights_raise_with_layer_name():
    model = torchvision.models.resnet18().eval()
    with torch.no_grad():
        model.layer2[0].conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(BadWeightsError, match="layer2.0.conv1"):
        separify.convert(model, example_inputs=torch.randn(1, 3, 32, 32), rank=1)


@pytest.mark.parametrize("kwargs, match", [
    ({"rank": 0}, "positive integer"), ({"rank": 2.5}, "positive integer"), ({"energy": 0.0}, r"\(0, 1\]"),
    ({"energy": 1.5}, r"\(0, 1\]"), ({"flops": 2.0}, r"\(0, 1\]"), ({"rank": 2, "flops": 0.5}, "only one"),
    ({"method": "tucker"}, "unknown method"),
], ids=["rank0", "rank-float", "energy0", "energy>1", "flops>1", "two-selections", "method"])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ConvertConfig(**kwargs)


def test_config_from_dict():
    cfg = ConvertConfig.from_dict({"method": "pw-dw-pw", "flops": 0.4, "exclude": ["fc*"],
                                   "rules": {"layer1.*": {"rank": 8}}})
    assert cfg.rules[0] == LayerRule("layer1.*", rank=8) and cfg.exclude == ("fc*",)
    with pytest.raises(ConfigError, match="unknown config key"):
        ConvertConfig.from_dict({"rnak": 2})


def test_embedded_default_model_converts_and_stays_accurate():
    from separify.io.embedded import load_default_model, load_eval_data
    from separify.core.measure import accuracy

    model = load_default_model()
    images, labels = load_eval_data(limit=300)
    base = accuracy(model, images, labels)
    assert base > 0.85
    res = separify.convert(model, example_inputs=images[:1], flops=0.5, method="pw-dw-pw")
    assert len(res.converted) >= 3 and res.flops_ratio <= 0.5
    assert accuracy(res.model, images, labels) > base - 0.03
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = separify.convert(copy.deepcopy(model).double(), example_inputs=images[:4].double(), method="dw-pw",
                                 rank=9, require_saving=False)
    torch.testing.assert_close(exact.model(images[:4].double()), model.double()(images[:4].double()))


def test_converting_a_training_mode_model_leaves_its_batchnorm_statistics_alone():
    model = torchvision.models.resnet18().train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    res = separify.convert(model, example_inputs=torch.randn(1, 3, 32, 32), rank=2, inplace=True)
    assert res.model.training
    for k, v in res.model.state_dict().items():
        if k in stats:
            assert torch.equal(v, stats[k]), k
