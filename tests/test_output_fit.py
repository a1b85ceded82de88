"""The output reconstruction: Adam steps on all replacements against the original model's outputs, checked on
held-out calibration samples and undone where it did not help; both backends."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import separify
from separify.calibration.output import (CHECK_VALUES, HOLD_EVERY, MIN_HELD, _crop_size, _partition, _split,
                                        fit_output, output_error, step_dtype)
from separify.errors import SeparifyError


class SmallNet(nn.Module):
    """Three 3×3 convs with ReLUs, global pooling and a linear head: errors of the convs add up at the output."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 32, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return SmallNet().eval()


def _images(n: int, seed: int, size: int = 12) -> torch.Tensor:
    """Smooth images (correlated pixels, as real ones)."""
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return nn.functional.avg_pool2d(x, 3, stride=1, padding=1)


def _convert(model, data, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return separify.convert(model, example_inputs=_images(1, 99), objective="flops", method="dw-pw", rank=1,
                                calibration=data, **kw)


def _error(model, reference, x):
    with torch.no_grad():
        return float((model(x) - reference(x)).norm() / reference(x).norm())


def test_output_reconstruction_lowers_the_error_on_unseen_inputs_and_is_deterministic(net):
    calib, test = _images(128, 1), _images(64, 2)
    off = _convert(net, calib, calib_output_steps=0)
    on = _convert(net, calib, calib_output_steps=100)
    again = _convert(net, calib, calib_output_steps=100)
    fit = on.output_fit
    assert off.output_fit is None
    assert fit.kept and fit.steps == 100 and fit.held == 128 // HOLD_EVERY
    assert fit.error_after < fit.error_before
    assert _error(on.model, net, test) < 0.9 * _error(off.model, net, test)  # inputs it never saw
    torch.testing.assert_close(on.model(test), again.model(test), rtol=0, atol=0)
    assert all(p.grad is None for p in on.model.parameters())
    assert all(p.requires_grad for p in on.model.parameters())  # flags as they were


def test_only_the_replacements_move(net):
    res = _convert(net, _images(64, 1), calib_output_steps=50)
    assert res.output_fit.kept
    torch.testing.assert_close(res.model.head.weight, net.head.weight, rtol=0, atol=0)


def test_steps_that_do_not_help_are_undone(net):
    """A learning rate far too large ruins the factors: the held-out error says so and the refitted state stays."""
    calib, test = _images(64, 1), _images(16, 2)
    off = _convert(net, calib, calib_output_steps=0)
    wild = _convert(net, calib, calib_output_steps=20, calib_output_lr=10.0)
    assert not wild.output_fit.kept
    assert wild.output_fit.error_after == wild.output_fit.error_before
    with torch.no_grad():
        torch.testing.assert_close(wild.model(test), off.model(test), rtol=0, atol=0)


def test_too_few_samples_to_hold_out_skip_it_with_a_note(net):
    few = HOLD_EVERY * MIN_HELD - 1
    off = _convert(net, _images(few, 1), calib_output_steps=0)
    res = _convert(net, _images(few, 1))
    assert res.output_fit.steps == 0 and not res.output_fit.kept
    assert "fewer than" in res.output_fit.note
    x = _images(4, 2)
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), off.model(x), rtol=0, atol=0)


def test_inplace_conversion_reconstructs_against_the_original_as_it_was():
    torch.manual_seed(0)
    model, copy = SmallNet().eval(), SmallNet().eval()
    copy.load_state_dict(model.state_dict())
    calib, test = _images(64, 1), _images(8, 2)
    apart = _convert(copy, calib)
    inplace = _convert(model, calib, inplace=True)
    assert inplace.output_fit.kept
    with torch.no_grad():
        torch.testing.assert_close(inplace.model(test), apart.model(test), rtol=1e-5, atol=1e-6)


def test_held_out_samples_are_spread_over_shape_groups():
    groups = [torch.zeros(5, 1, 2, 3), torch.ones(2, 1, 2, 4), torch.full((10, 1, 2, 5), 2.0)]
    train, held = _split(groups)
    assert sum(len(h) for h in held) == 17 // HOLD_EVERY
    assert sum(len(t) for t in train) + sum(len(h) for h in held) == 17
    assert [tuple(t.shape[1:]) for t in train] == [(1, 2, 3), (1, 2, 4), (1, 2, 5)]


def test_held_out_samples_stop_at_the_check_values():
    """Large samples: the check reads at most CHECK_VALUES input values (at least MIN_HELD samples, whole fixed
    batches); the every-8th samples past them train."""
    big = torch.zeros(256, 3, 224, 224, dtype=torch.uint8)  # (the values count, not their type)
    train, held = _split([big])
    assert sum(len(h) for h in held) == CHECK_VALUES // big[0].numel() == 16 and sum(len(t) for t in train) == 240
    huge = torch.zeros(64, 3, 460, 460, dtype=torch.uint8)  # 3 of them would exceed CHECK_VALUES
    assert sum(len(h) for h in _split([huge])[1]) == MIN_HELD and sum(len(h) for h in _split([huge], 3)[1]) == 6
    assert sum(len(h) for h in _split([torch.zeros(256, 1, 64, 192)])[1]) == 256 // HOLD_EVERY  # OCR words: all


@pytest.mark.parametrize("cache, calls", [(2**28, 7), (0, 20)], ids=["outputs-kept", "outputs-too-large"])
def test_the_original_runs_once_per_fixed_minibatch_while_its_outputs_fit(monkeypatch, cache, calls):
    """56 training samples cut into 7 minibatches of 8: over 20 steps the original runs once on each of them (its
    outputs kept), or at every step where they would take more than ``CACHE_BYTES``; plus once on the held out."""
    import separify.calibration.output as output

    monkeypatch.setattr(output, "CACHE_BYTES", cache)
    teacher, seen = nn.Linear(3, 3), []

    def counted(x):
        seen.append(x.shape[0])
        return teacher(x)

    student = nn.Linear(3, 3)
    fit = fit_output(student, list(student.parameters()), counted, [torch.randn(64, 3)], steps=20, lr=1e-2,
                     batch_size=8, seed=0)
    assert fit.steps == 20 and seen == [8] + [8] * calls


def test_fixed_minibatches_cover_every_sample_and_fill_up_within_their_group():
    groups = [torch.zeros(10, 2), torch.zeros(3, 4)]
    batches = _partition(groups, 4, None, torch.Generator().manual_seed(0))
    assert [(g, len(idx)) for g, idx in batches] == [(0, 4)] * 3 + [(1, 4)]
    assert sorted({i for g, idx in batches if g == 0 for i in idx}) == list(range(10))
    assert sorted(set(batches[3][1])) == [0, 1, 2]


def test_every_floating_point_output_counts():
    """Models whose output is a dict or tuple: the error sums over every floating-point tensor in it."""

    class Two(nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.scale = scale

        def forward(self, x):
            return {"a": x * self.scale, "b": (x, torch.ones(1, dtype=torch.long))}

    x = [torch.ones(2, 3)]
    target = [Two(1.0)(x[0])]
    # ‖2x − x‖² + ‖x − x‖² over ‖x‖² + ‖x‖²: one half
    assert output_error(Two(2.0), x, target) == pytest.approx(0.5)
    student = nn.Linear(3, 3)
    teacher = nn.Linear(3, 3)
    fit = fit_output(student, list(student.parameters()), teacher, [torch.randn(64, 3)], steps=200, lr=1e-2,
                     batch_size=8, seed=0)
    assert fit.kept and fit.error_after < 0.1 * fit.error_before


def test_output_settings_are_checked():
    with pytest.raises(SeparifyError, match="calib_output_steps"):
        separify.ConvertConfig(calib_output_steps=-1)
    with pytest.raises(SeparifyError, match="calib_output_lr"):
        separify.ConvertConfig(calib_output_lr=0)


def test_the_report_says_what_it_did(net):
    from separify.reporting.data import conversion_doc
    from separify.reporting.story import conversion_lines

    doc = conversion_doc(_convert(net, _images(64, 1)))
    fit = doc["output_reconstruction"]
    assert (fit["steps"], fit["held_out_samples"], fit["precision"]) == (100, 8, "float32") and fit["seconds"] > 0
    assert any(line.startswith("output reconstruction (100 steps, ") for line in conversion_lines(doc))
    few = conversion_doc(_convert(net, _images(16, 1)))
    assert any(line.startswith("no output reconstruction: 16 calibration samples") for line in conversion_lines(few))
    assert "output_reconstruction" not in conversion_doc(_convert(net, _images(64, 1), calib_output_steps=0))


def test_too_few_samples_skip_the_stage_before_any_model_is_built(net, monkeypatch):
    """16 samples hold out 2: the stage is skipped with its note before the backend builds the models (for an ONNX
    graph, an import into PyTorch that takes seconds)."""
    from separify.backends.torch.backend import TorchBackend

    def unexpected(self, replacements):
        raise AssertionError("output_models called")

    monkeypatch.setattr(TorchBackend, "output_models", unexpected)
    fit = _convert(net, _images(16, 1)).output_fit
    assert (fit.steps, fit.held, fit.kept) == (0, 2, False)
    assert fit.note == "no output reconstruction: 16 calibration samples hold out fewer than 4 to check it on"


def test_a_model_the_steps_cannot_train_is_left_as_refitted_with_a_note():
    """An output detached from the factors: the backward raises; the stage is skipped with the error in its note."""

    class Detached(SmallNet):
        def forward(self, x):
            return super().forward(x).detach()

    torch.manual_seed(0)
    model = Detached().eval()
    calib, x = _images(64, 1), _images(4, 2)
    off = _convert(model, calib, calib_output_steps=0)
    res = _convert(model, calib)
    assert res.output_fit.steps == 0 and not res.output_fit.kept
    assert res.output_fit.note.startswith("no output reconstruction: the steps failed (RuntimeError: ")
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), off.model(x), rtol=0, atol=0)


def test_bfloat16_steps_still_lower_the_held_out_error_and_say_so(net):
    """Under bfloat16 autocast (emulated where the CPU has no native bfloat16) and on channels-last inputs, the
    steps still fit; the held-out check runs in float32 and the result names the number format."""
    res = _convert(net, _images(64, 1), calib_output_steps=0)
    student = res.model
    params = [p for m in student.modules() if isinstance(m, separify.SeparableConv2d) for p in m.parameters()]
    fit = fit_output(student, params, net, [_images(64, 1)], steps=60, lr=6e-4, batch_size=8, seed=0,
                     dtype=torch.bfloat16, channels_last=True)
    assert fit.kept and fit.error_after < fit.error_before and fit.precision == "bfloat16"
    assert all(p.dtype == torch.float32 for p in params)  # the factors stay float32


class _Flattening(nn.Module):
    """Cannot run channels-last (``.view`` across channels and pixels); a linear head after the flatten."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                  nn.ReLU())
        self.head = nn.Linear(16 * 12 * 12, 10)

    def forward(self, x):
        y = self.body(x)
        return self.head(y.view(len(y), -1))


def test_bfloat16_steps_leave_the_frozen_weights_as_they_were_and_no_hooks():
    """The stage casts the frozen layers' weights once for its bfloat16 steps, and runs the replacements of a model
    that cannot run channels-last in that layout: both undone after it, the teacher's weights included."""
    teacher = _Flattening().eval()
    res = _convert(teacher, _images(64, 1), calib_output_steps=0)
    student = res.model
    params = [p for m in student.modules() if isinstance(m, separify.SeparableConv2d) for p in m.parameters()]
    chosen = {id(p) for p in params}
    everything = [*student.parameters(), *teacher.parameters()]
    frozen = {id(p): p.detach().clone() for p in everything if id(p) not in chosen}
    fit = fit_output(student, params, teacher, [_images(64, 1)], steps=30, lr=6e-4, batch_size=8, seed=0,
                     dtype=torch.bfloat16, channels_last=False)
    assert fit.kept and fit.error_after < fit.error_before
    assert all(p.dtype == torch.float32 for p in everything)
    assert all(torch.equal(p, frozen[id(p)]) for p in everything if id(p) not in chosen)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in student.modules())


@pytest.mark.parametrize("precision, native, flops_per_value, expected", [
    ("float32", True, 1e9, None),
    ("bfloat16", False, 1.0, torch.bfloat16),
    ("auto", True, 1e9, torch.bfloat16),
    ("auto", True, 1.0, None),  # too small a stage to pay
    ("auto", False, 1e9, None),  # no native bfloat16
], ids=["float32", "bfloat16-forced", "auto-large", "auto-small", "auto-emulated"])
def test_the_steps_number_format_follows_the_calibration_precision(monkeypatch, precision, native, flops_per_value,
                                                                  expected):
    import separify.calibration.precision as prec

    monkeypatch.setattr(prec, "native_bfloat16", lambda device: native)
    # 100 steps of 8 samples of 3×64×64: 9.8e6 input values; at 1e9 FLOPs per value, 3.9e16 FLOPs
    dtype = step_dtype(precision, nn.Linear(2, 2), [torch.zeros(64, 3, 64, 64)], steps=100, batch_size=8,
                       fixed_batch=None, flops_per_value=flops_per_value)
    assert dtype == expected
    double = step_dtype(precision, nn.Linear(2, 2).double(), [torch.zeros(64, 3, 64, 64)], steps=100, batch_size=8,
                        fixed_batch=None, flops_per_value=flops_per_value)
    assert double is None  # only a float32 model is cast


def _recorded(model: nn.Module, shapes: list) -> nn.Module:
    model.register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape[2:])))
    return model


@pytest.fixture
def small_crops(monkeypatch):
    """12² RGB images count as large (one fills a minibatch); their crops are 6²."""
    import separify.calibration.output as output

    monkeypatch.setattr(output, "MINIBATCH_VALUES", 3 * 12 * 12 - 1)
    monkeypatch.setattr(output, "CROP_VALUES", 3 * 6 * 6)


def test_large_images_train_on_the_same_crops_in_both_models_and_check_on_whole_ones(net, small_crops):
    import copy

    calib = _images(64, 1)
    student = copy.deepcopy(_convert(net, calib, calib_output_steps=0).model)
    seen_t, seen_s = [], []
    teacher, student = _recorded(copy.deepcopy(net), seen_t), _recorded(student, seen_s)
    params = [p for m in student.modules() if isinstance(m, separify.SeparableConv2d) for p in m.parameters()]
    fit = fit_output(student, params, teacher, [calib], steps=30, lr=1e-3, batch_size=8, seed=0)
    assert fit.steps == 30
    # the teacher: the held-out targets (whole), the crop probe, then one crop per fixed minibatch it first sees
    assert seen_t[0] == (12, 12) and set(seen_t[1:]) == {(6, 6)}
    # the student: the check before (whole), 30 steps on crops, the check after (whole)
    assert seen_s[0] == seen_s[-1] == (12, 12) and seen_s[1:-1] == [(6, 6)] * 30


def test_crops_lower_the_whole_images_error_through_the_pipeline(net, small_crops):
    calib, test = _images(128, 1), _images(64, 2)
    off = _convert(net, calib, calib_output_steps=0)
    on = _convert(net, calib, calib_output_steps=100)
    assert on.output_fit.kept and _error(on.model, net, test) < _error(off.model, net, test)


def test_a_model_of_one_input_size_trains_on_whole_images(small_crops):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 12 * 12, 5))
    seen: list = []
    student = _recorded(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 12 * 12, 5)), seen)
    fit = fit_output(student, list(student[0].parameters()), teacher, [_images(64, 1)], steps=10, lr=1e-3,
                     batch_size=8, seed=0)
    assert fit.steps == 10 and set(seen) == {(12, 12)}


@pytest.mark.parametrize("shape, expected", [
    ((3, 224, 224), (128, 128)),  # ResNet-50's input: a third of the values
    ((1, 448, 448), (222, 222)),
    ((3, 100, 400), None),  # fits a minibatch: whole
    ((1, 64, 192), None),  # OCR words: whole
    ((200_000,), None),  # not an image
], ids=["rgb-224", "gray-448", "fits", "ocr-word", "vector"])
def test_crop_size(shape, expected):
    assert _crop_size(torch.empty(shape, dtype=torch.uint8)) == expected


def test_the_steps_number_format_counts_the_crops(monkeypatch):
    """224² images at 3e4 FLOPs per input value: 1.8e12 FLOPs for 100 steps on whole images, bfloat16; on their
    128² crops 5.9e11, below AUTO_FLOPS: float32."""
    import separify.calibration.precision as prec

    monkeypatch.setattr(prec, "native_bfloat16", lambda device: True)
    big = [torch.zeros(4, 3, 224, 224, dtype=torch.uint8)]
    assert step_dtype("auto", nn.Linear(2, 2), big, steps=100, batch_size=8, fixed_batch=None,
                      flops_per_value=3e4) is None
    assert step_dtype("auto", nn.Linear(2, 2), big, steps=100, batch_size=8, fixed_batch=1,
                      flops_per_value=3e4) == torch.bfloat16  # a fixed batch: whole images
