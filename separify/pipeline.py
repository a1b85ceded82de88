"""``separify.convert``: a trained model in, the same model with separable convs out, plus a record per layer.

One driver for every model type: discover the convs → check each (a reason for every refusal) → plan ranks, forms
and layouts → decompose → apply → calibrate → layouts → verify → result. The steps that differ between a PyTorch
model and an ONNX graph are a :class:`~separify.backends.base.Backend`'s; everything else is written here once.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from separify.backends.base import Backend, Found
from separify.config import ConvertConfig
from separify.core import measure
from separify.core.decompose import check_weight, whiten
from separify.core.modules import FORMS, SeparableConv2d
from separify.errors import BadWeightsError, SeparifyError
from separify.planning import latency
from separify.planning.plan import Candidate, choose_ranks, from_conv_options, meet_latency
from separify.records import ConvertResult, LayerRecord, NoteCode, Plan, Reason, new_record
from separify.calibration import PIXELS_PER_INPUT, LayerFit

__all__ = ["convert", "convert_onnx", "run", "ConvertResult", "LayerRecord"]

NOT_REACHED = "not reached on the example input (no input shape to plan at)"


def convert(
    model: Any,
    config: ConvertConfig | None = None,
    *,
    example_inputs: Any = None,
    inplace: bool = False,
    calibration: Any = None,
    progress: bool | Callable[[str], None] = False,
    timer: latency.Timer | None = None,
    **options: Any,
) -> ConvertResult:
    """Replace the dense convs of ``model`` with depthwise-separable approximations.

    Every plain 2-D conv with ``groups == 1`` and a kernel larger than 1×1 is decomposed (after folding a following
    BatchNorm2d in eval mode, on the fx path) and replaced by :class:`~separify.DwPwConv2d` or
    :class:`~separify.PwDwPwConv2d` at a rank chosen by ``config``. Everything else is kept, with the reason.

    Args:
        model: an ``nn.Module`` (put it in eval mode first if its BatchNorms should be folded), or an ONNX model (a
            path, an ``onnx.ModelProto`` or an ``onnx_ir.Model``; see :func:`convert_onnx`).
        config: a :class:`~separify.ConvertConfig`; or pass its sections or flat fields as keyword ``options``
            (they override ``config``), e.g. ``method="pw-dw-pw", flops=0.5, exclude=("layer4.*",)``.
        example_inputs: a tensor or tuple of tensors the model accepts; FLOPs are counted and layers planned at
            their shapes. For ONNX models, only the shape is used (a tensor, or a dict of shapes by input name).
        inplace: skip the defensive deep copy of a PyTorch model. The input may then be modified (module-tree path)
            or share submodules with the result; use the returned model either way. Default: never touched.
        calibration: input data: a tensor ``(N, ...)`` or an iterable of batches / ``(input, label)`` tuples, at
            most ``calibration.limit`` samples used. Each layer's input moments are measured on it; a FLOPs or
            latency target is then allocated by predicted output error and, with ``calibration.whiten``, kernels are
            decomposed whitened by them; then every replacement is refitted to the original layer's outputs.
        progress: ``True`` shows a progress bar over layers; a callable is called with each layer name.
        timer: with ``objective="latency"``, a function ``timer(modules, input_shape, target) -> [ms, ...]`` used
            instead of real timing (and instead of the cache), e.g. to plan for a device you are not on.

    Returns:
        :class:`~separify.ConvertResult` with the new model and one record per conv
        (:class:`~separify.backends.onnx.OnnxConvertResult` for ONNX models).

    Example::

        >>> import torch, torchvision, separify
        >>> net = torchvision.models.resnet18().eval()
        >>> res = separify.convert(net, example_inputs=torch.randn(1, 3, 224, 224), flops=0.5)
        >>> res.flops_after / res.flops_before  # doctest: +SKIP
        0.49...
    """
    cfg = _config(config, options)
    if not isinstance(model, nn.Module) and _is_onnx(model):
        shapes = tuple(example_inputs.shape) if isinstance(example_inputs, torch.Tensor) else example_inputs
        return convert_onnx(model, cfg, input_shapes=shapes, calibration=calibration, progress=progress, timer=timer)
    if not isinstance(model, nn.Module):
        raise SeparifyError(f"convert() takes an nn.Module or an ONNX model, got {type(model).__name__} (load "
                            "PyTorch files with separify.io.models.load_model)")
    from separify.backends.torch import TorchBackend

    return run(TorchBackend(model, cfg, example_inputs, inplace=inplace, timer=timer), cfg, calibration=calibration,
               progress=progress, timer=timer)


def convert_onnx(
    model: Any,
    config: ConvertConfig | None = None,
    *,
    input_shapes: Mapping[str, Sequence[int]] | Sequence[int] | None = None,
    calibration: Any = None,
    check_samples: int = 8,
    threads: int | None = None,
    progress: bool | Callable[[str], None] = False,
    timer: latency.Timer | None = None,
    **options: Any,
) -> ConvertResult:
    """:func:`convert` for an ONNX model (a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model``; never modified).

    Name patterns match node names (or ``Conv:<output name>`` for unnamed nodes). ``input_shapes``: the shape to
    convert at for inputs with dynamic dimensions (one shape, or a dict by name). ``calibration`` runs through
    onnxruntime (single-input models). ``check_samples`` random inputs compare both graphs in onnxruntime at the end
    (0: skip). ``threads``: onnxruntime threads. The latency target is ONNX Runtime on the CPU (``"cpu"`` is read as
    that). Layer-wise reconstruction (``calibration.steps``) needs PyTorch and is refused.
    """
    from separify.backends.onnx import OnnxBackend

    cfg = _config(config, options)
    backend = OnnxBackend(model, cfg, input_shapes=input_shapes, check_samples=check_samples, threads=threads,
                          timer=timer)
    return run(backend, cfg, calibration=calibration, progress=progress, timer=timer)


def run(backend: Backend, cfg: ConvertConfig, *, calibration: Any = None,
        progress: bool | Callable[[str], None] = False, timer: latency.Timer | None = None) -> ConvertResult:
    """The conversion of one model through its backend (module docstring)."""
    samples = backend.set_calibration(calibration, cfg.calibration.limit) if calibration is not None else 0
    records, cands = _check(backend, cfg)
    covs, whitened = _observe(backend, cfg, cands) if samples else ({}, {})
    budget, msgs = _plan(backend, cfg, cands, whitened, timer)
    pixels = backend.output_pixels([c for c in cands if c.record.plan is not None and c.plan.rank is not None]) \
        if samples else {}
    replacements = _decompose(cfg, cands, covs, pixels, calibrated=samples > 0, progress=progress)
    by_name = {r.name: r for r in records}
    for c in cands:  # a folded BatchNorm whose conv stays dense stays in the model
        if c.name not in replacements:
            c.record.bn_folded = None
    backend.apply(replacements, by_name)
    if samples and replacements:
        fits = backend.refit(replacements, by_name, cfg, pixels, progress if callable(progress) else None)
        _record_fits(by_name, fits)
        _scarce_warning(records, samples, msgs)
    _layouts(backend, cands, replacements)
    result = backend.result(records, cfg, budget)
    if cfg.objective == "latency" and cands:
        _check_latency(backend, result, timer, msgs)
    _warn(result, msgs)
    return result


def _config(config: ConvertConfig | None, options: dict[str, Any]) -> ConvertConfig:
    if config is not None and not isinstance(config, ConvertConfig):
        raise SeparifyError(f"config must be a ConvertConfig, got {type(config).__name__}")
    if options:
        return config.replace(**options) if config is not None else ConvertConfig(**options)
    return config or ConvertConfig()


# --------------------------------------------------------------------------------------------------------------
# discover → check


def _refusal(cfg: ConvertConfig, found: Found):
    """Why this conv stays dense before any planning (``None``: a candidate)."""
    rule = cfg.rule_for(found.spec.name)
    if found.refusal is not None:
        return found.refusal.code, found.refusal.text
    if rule is not None and rule.exclude:
        return Reason.EXCLUDED, f"excluded by pattern {rule.pattern!r}"
    if not found.shapes:
        return Reason.NOT_REACHED, NOT_REACHED
    return None


def _check(backend: Backend, cfg: ConvertConfig) -> tuple[list[LayerRecord], list[Candidate]]:
    """A record per conv; the candidates with their kernels (BatchNorm folded) and checked weights."""
    records, cands = [], []
    for found in backend.discover():
        rec = new_record(found.spec, found.flops, found.params)
        records.append(rec)
        refusal = _refusal(cfg, found)
        if refusal is not None:
            rec.skip_with(*refusal)
            continue
        rule = cfg.rule_for(rec.name)
        method = (rule.method if rule and rule.method else None) or cfg.method
        kernel = backend.kernel(rec.name, cfg)
        if kernel.bn_note:
            rec.add_note(NoteCode.BN_NOT_FOLDED, kernel.bn_note)
        rec.bn_folded = kernel.bn_folded
        try:
            check_weight(kernel.conv.weight)
        except BadWeightsError as exc:
            raise BadWeightsError(f"layer {rec.name!r}: {exc}") from None
        rec.plan = Plan(method)
        cands.append(Candidate(rec, rule, method, kernel.conv, found.shapes))
    return records, cands


# --------------------------------------------------------------------------------------------------------------
# calibration statistics → plan


def _observe(backend: Backend, cfg: ConvertConfig, cands: list[Candidate]):
    """Input moments of every candidate (where the whitening or the data-aware allocation uses them) and the
    whitened kernels whose error curves are the predicted output errors the allocation uses."""
    cal = cfg.calibration
    need = cal.whiten or (cal.ranks and cfg.selection in ("flops", "latency"))
    covs = backend.observe(cands, moments=need) if cands else {}
    whitened = {c.name: whiten(c.kernel.weight, covs[c.name], c.method, damp=cal.damp)
                for c in cands if cal.ranks and c.name in covs}
    return covs, whitened


def _plan(backend: Backend, cfg: ConvertConfig, cands: list[Candidate], whitened, timer):
    """Ranks (and, under the latency objective, layouts measured on the target) for every candidate."""
    planner = _planner(backend, cfg, timer) if cfg.objective == "latency" and cands else None
    try:
        first = choose_ranks(cfg, cands, backend.flops_before, whitened, planner)
        if planner is None or cfg.selection != "latency":
            return first

        def trial_times(replacements):  # the original and the planned model (untrained factors), timed
            models = ["original", backend.trial(replacements)]
            return tuple(t.median_ms for t in backend.time_models(models, planner.timer.target, timer))

        return meet_latency(cfg, cands, backend.flops_before, whitened, planner, first, trial_times)
    finally:
        if planner is not None:
            planner.save()


def _planner(backend: Backend, cfg: ConvertConfig, timer) -> latency.LatencyPlanner:
    """The layer timer for the target (through the disk cache unless a timing function is injected); with a
    latency budget, the original model's time on the target is measured first."""
    target = backend.latency_target(cfg)
    if timer is None:
        target.check_available()
    cache = cfg.latency.cache
    path = latency.default_cache_path() if cache is True else (cache or None)
    layer_timer = latency.LayerTimer(target, cache=latency.LatencyCache(path), timer=timer)
    original_ms = None
    if cfg.selection == "latency":
        original_ms = backend.time_models(["original"], target, timer)[0].median_ms
    return latency.LatencyPlanner(layer_timer, cfg.latency.margin, original_ms=original_ms,
                                  batch_size=backend.example_batch)


# --------------------------------------------------------------------------------------------------------------
# decompose → calibrate → layouts


def _decompose(cfg: ConvertConfig, cands: list[Candidate], covs, pixels, *, calibrated: bool,
               progress) -> dict[str, SeparableConv2d]:
    """The replacement module of every planned candidate, in graph order."""
    items = [c for c in cands if c.record.plan is not None and c.plan.rank is not None]
    iterator = items
    if progress is True:
        from rich.progress import track

        iterator = track(items, description="decomposing", transient=True)
    replacements = {}
    for c in iterator:
        if callable(progress):
            progress(c.name)
        new = FORMS[c.plan.method].from_conv(c.kernel, c.plan.rank,
                                             **from_conv_options(cfg, c, calibrated, covs, pixels.get(c.name)))
        new.train(c.kernel.training)
        replacements[c.name] = new
        rec = c.record
        rec.status = "converted"
        rec.rel_error = new.decomposition_error
        _count(rec, new, c.shapes)
    return replacements


def _count(rec: LayerRecord, module: nn.Module, shapes) -> None:
    rec.flops_after = measure.module_flops(module, shapes)
    rec.params_after = measure.count_params(module)


def _record_fits(records: dict[str, LayerRecord], fits: list[LayerFit]) -> None:
    for fit in fits:
        rec = records[fit.name]
        rec.calib_error_before, rec.calib_error_after = fit.error_before, fit.error_after
        if fit.note:
            rec.add_note(NoteCode.SCARCE if fit.scarce else NoteCode.CALIBRATION, fit.note)


def _layouts(backend: Backend, cands: list[Candidate], replacements: dict[str, SeparableConv2d]) -> None:
    """The fastest equivalent layout of each replacement (exactly the same function), after the refit, which fits
    the last 1×1 conv in whatever channel order it has."""
    for c in cands:
        mod = replacements.get(c.name)
        if mod is None or c.plan.layout is None or c.plan.layout == mod.LAYOUTS[0]:
            continue
        mod.set_layout(c.plan.layout)
        if mod.rank != c.plan.rank:
            c.record.add_note(NoteCode.RANK_PADDED,
                              f"rank {c.plan.rank} padded to {mod.rank} channels by zero terms (faster)")
        backend.write_layout(c.name, mod)
        _count(c.record, mod, c.shapes)


# --------------------------------------------------------------------------------------------------------------
# verify → warnings


def _check_latency(backend: Backend, result: ConvertResult, timer, msgs: list[str]) -> None:
    """Time both whole models on the target and keep the times in ``result``, with what the layer times
    predicted; warn if the converted model was not faster. A real measurement that reads slower is repeated three
    times as long first: on a shared machine the speed of a small model can switch between levels mid-run."""
    target = backend.latency_target(result.config)
    where = target.describe(backend.example_batch)
    before, after = backend.time_models(["original", "converted"], target, timer)
    if timer is None and result.converted and after.median_ms >= before.median_ms:
        before, after = backend.time_models(["original", "converted"], target, timer, scale=3.0)
    result.latency_target = where
    result.latency_before, result.latency_after = before, after
    saved = sum(r.time_before_ms - r.time_after_ms for r in result.converted if r.time_after_ms is not None)
    base = before.median_ms
    result.latency_predicted = (base - saved) / base if base > 0 else None
    ratio = result.latency_ratio
    if ratio is not None and ratio >= 1.0 and result.converted:
        msgs.append(f"on {where} the converted model measured {ratio:.2f}× the original's time although every "
                    "replacement was measured faster alone; convert with a larger margin, or keep the original")


def _scarce_warning(records: Sequence[LayerRecord], samples: int, msgs: list[str]) -> None:
    """Warn when calibration data was scarce for some layers (their notes say how it was handled)."""
    names = [r.name for r in records if r.has_note(NoteCode.SCARCE)]
    if names:
        msgs.append(f"the {samples} calibration sample(s) are few for {len(names)} layer(s) "
                    f"({', '.join(names[:3])}{' ...' if len(names) > 3 else ''}): fewer than {PIXELS_PER_INPUT} "
                    "output pixels per input channel of their last 1×1 conv. Their refit was regularised by "
                    "cross-validation or skipped, as each layer's note says; more samples give better factors")


def _warn(result: ConvertResult, msgs: list[str]) -> None:
    msgs = list(msgs)
    if not result.layers:
        msgs.append("the model has no conv layers; nothing was converted")
    elif not result.converted:
        reasons = sorted({r.reason for r in result.layers if r.reason})
        msgs.append("no layer was converted (" + "; ".join(reasons[:3]) + (" ..." if len(reasons) > 3 else "") + ")")
    for m in msgs:
        warnings.warn(m, stacklevel=4)
    result.warnings.extend(msgs)


def _is_onnx(model: Any) -> bool:
    """An ONNX file (by content), an ``onnx.ModelProto`` or an ``onnx_ir.Model``."""
    if isinstance(model, (str, os.PathLike)):
        from separify.io.files import is_onnx

        return is_onnx(model)
    import onnx
    import onnx_ir

    return isinstance(model, (onnx.ModelProto, onnx_ir.Model))
