"""``separify.convert``: a trained model in, the same model with separable convs out, plus a record per layer."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from separify.backends.torch import fx_pass
from separify.planning import latency
from separify.core import measure
from separify.planning import ranks
from separify.calibration import PIXELS_PER_INPUT, als_runs, as_batches, observe, refit_pointwise, scarce
from separify.config import ConvertConfig, LayerRule
from separify.core.decompose import check_weight, whiten
from separify.errors import BadWeightsError, SeparifyError, first_line
from separify.core.modules import FORMS, why_not_convertible

__all__ = ["convert", "ConvertResult", "LayerRecord"]


@dataclass
class LayerRecord:
    """What happened to one conv.

    ``status`` is ``"converted"`` or ``"skipped"``; a skipped layer always has a ``reason``. FLOPs are counted by
    ``FlopCounterMode`` at the layer's real input shape(s) on the example input (FLOPs = 2 × MACs); ``rel_error`` is
    ``‖W − Ŵ‖ / ‖W‖`` of the (BatchNorm-folded) kernel. With calibration data, ``calib_error_before``/``after`` are
    the layer's relative output error on that data (in the converted model, with every earlier layer already
    refitted) before and after the least-squares refit; ``rank_source`` says whether ranks were allocated by weight
    error or by the predicted output error on the data. ``output_error`` (ONNX pass) is the relative error of the
    layer's output in the converted model against the original, both run in onnxruntime on random inputs.

    With ``objective="latency"``, ``time_before_ms``/``time_after_ms`` are the dense conv's and the chosen
    replacement's measured times on the target (milliseconds per call at the target's batch size), ``layout`` the
    replacement's equivalent layout (:meth:`~separify.modules.SeparableConv2d.set_layout`), and a layer kept dense
    for its time says so in ``reason``.
    """

    name: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    groups: int
    input_shape: tuple[int, ...] | None
    status: str = "skipped"
    reason: str | None = None
    method: str | None = None
    rank: int | None = None
    exact_rank: int | None = None
    rank_source: str | None = None
    flops_before: int = 0
    flops_after: int = 0
    params_before: int = 0
    params_after: int = 0
    rel_error: float | None = None
    bn_folded: str | None = None
    calib_error_before: float | None = None
    calib_error_after: float | None = None
    output_error: float | None = None
    layout: str | None = None
    time_before_ms: float | None = None
    time_after_ms: float | None = None
    note: str | None = None

    @property
    def converted(self) -> bool:
        return self.status == "converted"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ConvertResult:
    """The converted model and what was done.

    Attributes:
        model: the converted model (a ``torch.fx.GraphModule`` on the fx path, the model's own class otherwise).
        layers: one :class:`LayerRecord` per conv module, in graph (or module-tree) order.
        path: ``"fx"`` or ``"module-tree"``.
        trace_error: why torch.fx tracing failed when the module-tree path was used.
        flops_before, flops_after: whole-model FLOPs on the example input (FlopCounterMode; FLOPs = 2 × MACs).
        params_before, params_after: parameter counts.
        flops_budget: the FLOPs the target allowed (``flops`` selection only).
        warnings: messages worth showing the user (also issued with ``warnings.warn``).
        latency_before, latency_after: with ``objective="latency"``, both whole models timed on the target in the
            same run (:class:`~separify.measure.Timing`); ``latency_predicted`` is the ratio the sum of the measured
            layer times predicted; ``latency_target`` describes the target.
    """

    model: nn.Module
    layers: list[LayerRecord]
    path: str
    config: ConvertConfig
    trace_error: str | None = None
    flops_before: int = 0
    flops_after: int = 0
    params_before: int = 0
    params_after: int = 0
    flops_budget: int | None = None
    warnings: list[str] = field(default_factory=list)
    latency_before: measure.Timing | None = None
    latency_after: measure.Timing | None = None
    latency_predicted: float | None = None
    latency_target: str | None = None

    @property
    def converted(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.converted]

    @property
    def skipped(self) -> list[LayerRecord]:
        return [r for r in self.layers if not r.converted]

    @property
    def flops_ratio(self) -> float:
        return self.flops_after / self.flops_before if self.flops_before else 1.0

    @property
    def latency_ratio(self) -> float | None:
        """Converted / original whole-model time on the latency target (``objective="latency"`` only)."""
        if self.latency_before is None or self.latency_after is None or not self.latency_before.median_ms > 0:
            return None
        return self.latency_after.median_ms / self.latency_before.median_ms

    def feature_pairs(self) -> dict[str, str]:
        """Converted layer name → name of the original module its output reproduces (the conv, or its folded
        BatchNorm): the ``features`` argument of :func:`separify.finetune` for a feature-distillation term."""
        return {r.name: r.bn_folded or r.name for r in self.converted}

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready) without the model."""
        return {
            "path": self.path,
            "trace_error": self.trace_error,
            "config": dataclasses.asdict(self.config),
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "flops_budget": self.flops_budget,
            "latency_target": self.latency_target,
            "latency_before": dataclasses.asdict(self.latency_before) if self.latency_before else None,
            "latency_after": dataclasses.asdict(self.latency_after) if self.latency_after else None,
            "latency_predicted": self.latency_predicted,
            "warnings": list(self.warnings),
            "layers": [r.to_dict() for r in self.layers],
        }


def _as_inputs(example_inputs) -> tuple:
    if example_inputs is None:
        raise SeparifyError("convert() needs example_inputs (e.g. torch.randn(1, 3, 224, 224)) to count FLOPs")
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def convert(
    model: nn.Module,
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

    Every plain ``nn.Conv2d`` with ``groups == 1`` and a kernel larger than 1×1 is decomposed (after folding a
    following BatchNorm2d in eval mode, on the fx path) and replaced by :class:`~separify.DwPwConv2d` or
    :class:`~separify.PwDwPwConv2d` at a rank chosen by ``config``. Everything else is kept, with the reason.

    Args:
        model: a trained model. Put it in eval mode first if its BatchNorms should be folded.
        config: a :class:`ConvertConfig`; or pass its fields as keyword ``options`` (they override ``config``).
        example_inputs: a tensor or tuple of tensors the model accepts; used to count FLOPs at the real shapes.
        inplace: skip the defensive deep copy. The input model may then be modified (module-tree path) or share
            submodules with the result; use the returned model either way. Default: the input is never touched.
        calibration: optional input data (a tensor ``(N, ...)`` or an iterable of batches / ``(input, label)``
            tuples, at most ``config.calib_limit`` samples used). The input moments of every layer are measured on
            it; a FLOPs target is then allocated by predicted output error (``calib_ranks``, on by default) and,
            with ``calib_whiten=True``, the kernels are decomposed whitened by them; then the last 1×1 conv of every
            replacement is refitted by least squares to the original layer's outputs on this data
            (:mod:`separify.calibrate`).
        progress: ``True`` shows a progress bar over layers; a callable is called with each layer name.
        timer: with ``objective="latency"``, a function ``timer(modules, input_shape, target) -> [ms, ...]`` used
            instead of real timing (and instead of the cache), e.g. to plan for a device you are not on.
        options: ``ConvertConfig`` fields, e.g. ``method="pw-dw-pw", flops=0.5, exclude=("layer4.*",)``.

    An ONNX model (a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model``) goes to the ONNX pass,
    :func:`separify.onnx_pass.convert_onnx` (``example_inputs`` then only gives the input shape).

    Returns:
        :class:`ConvertResult` with the new model and one :class:`LayerRecord` per conv
        (:class:`~separify.onnx_pass.OnnxConvertResult` for ONNX models).

    Example::

        >>> import torch, torchvision, separify
        >>> net = torchvision.models.resnet18().eval()
        >>> res = separify.convert(net, example_inputs=torch.randn(1, 3, 224, 224), flops=0.5)
        >>> res.flops_after / res.flops_before  # doctest: +SKIP
        0.49...
    """
    if options:
        if "rules" in options and isinstance(options["rules"], dict):
            options["rules"] = tuple(LayerRule(p, **dict(s)) for p, s in options["rules"].items())
        config = (config or ConvertConfig()).replace(**options) if config else ConvertConfig(**options)
    cfg = config or ConvertConfig()
    if not isinstance(model, nn.Module) and _is_onnx(model):
        from separify.backends.onnx.onnx_pass import convert_onnx

        shape = tuple(example_inputs.shape) if isinstance(example_inputs, torch.Tensor) else None
        return convert_onnx(model, cfg, input_shapes=shape, calibration=calibration, progress=progress is True,
                            timer=timer)
    if not isinstance(model, nn.Module):
        raise SeparifyError(f"convert() takes an nn.Module or an ONNX model, got {type(model).__name__} (load "
                            "PyTorch files with separify.model_io.load_model)")
    inputs = _as_inputs(example_inputs)
    batches = None
    if calibration is not None:
        batches = as_batches(calibration, limit=cfg.calib_limit)
        _check_fits(model, batches[0])
    work = model if inplace else copy.deepcopy(model)

    # Trace (or fall back to the module tree) and find the convs.
    trace_error = None
    gm: fx.GraphModule | None = None
    if cfg.tracer != "module":
        try:
            gm = fx_pass.trace(work)
        except fx_pass.TraceFailed as exc:
            if cfg.tracer == "fx":
                raise SeparifyError(f"torch.fx could not trace the model: {exc}") from exc
            trace_error = str(exc)
    root = gm if gm is not None else work
    sites = fx_pass.match_fx(gm) if gm is not None else fx_pass.match_modules(work)
    path = "fx" if gm is not None else "module-tree"

    # One forward pass for the whole-model FLOPs and every conv's input shape(s).
    flops_before = measure.count_flops(root, inputs)
    params_before = measure.count_params(root)
    shapes = measure.conv_input_shapes(root, inputs, [s.name for s in sites])

    records: list[LayerRecord] = []
    todo: list[tuple[fx_pass.ConvSite, LayerRecord, nn.Conv2d, LayerRule | None]] = []
    for site in sites:
        conv = site.module
        rec = LayerRecord(
            site.name, conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
            conv.groups, shapes[site.name][0] if shapes[site.name] else None,
        )
        records.append(rec)
        if shapes[site.name]:
            rec.flops_before = rec.flops_after = measure.module_flops(conv, shapes[site.name])
        rec.params_before = rec.params_after = measure.count_params(conv)
        rule = cfg.rule_for(site.name)
        reason = _check(site, rule, shapes[site.name])
        if reason is not None:
            rec.reason = reason
            continue
        rec.method = (rule.method if rule and rule.method else None) or cfg.method
        todo.append((site, rec, conv, rule))

    # Fold BatchNorms (fx path) and check the kernels.
    modules = dict(root.named_modules())
    folded: dict[str, str] = {}
    kernels: dict[str, nn.Conv2d] = {}
    for site, rec, conv, _ in todo:
        source = conv
        if site.bn_name is not None and cfg.fold_bn:
            bn = modules[site.bn_name]
            why = fx_pass.bn_fold_reason(bn)
            if why is None:
                source = copy.deepcopy(conv)
                source.weight, source.bias = fuse_conv_bn_weights(
                    conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
                )
                folded[site.name] = site.bn_name
                rec.bn_folded = site.bn_name
            else:
                rec.note = f"BatchNorm {site.bn_name} not folded: {why}"
        elif path == "module-tree" and cfg.fold_bn:
            rec.note = "no BatchNorm folding on the module-tree path"
        try:
            check_weight(source.weight)
        except BadWeightsError as exc:
            raise BadWeightsError(f"layer {site.name!r}: {exc}") from None
        kernels[site.name] = source

    # Calibration pass over the original model: input moments and target outputs of every candidate.
    obs = None
    if batches is not None:
        targets = {site.name: folded.get(site.name, site.name) for site, _, _, _ in todo}
        # the input moments are only needed by the whitening and the data-aware FLOPs allocation
        need_moments = cfg.calib_whiten or (cfg.calib_ranks and cfg.selection in ("flops", "latency"))
        obs = observe(model, targets, batches, memory_gb=cfg.calib_memory_gb,  # before any rewrite: inplace is safe
                      moments=need_moments)
    covs = obs.covariances if obs is not None else {}
    # kernels whitened by their inputs: their error curves are the predicted output errors used by the allocation
    whitened = {}
    if cfg.calib_ranks:
        for _, rec, _, _ in todo:
            if rec.name in covs:
                whitened[rec.name] = whiten(kernels[rec.name].weight, covs[rec.name], rec.method, damp=cfg.calib_damp)

    # Ranks (with objective="latency": measured on the target).
    if cfg.objective == "latency" and not (isinstance(inputs[0], torch.Tensor) and inputs[0].dim() > 0):
        raise SeparifyError("objective='latency' needs a tensor with a batch dimension as the first example input")
    planner = _planner(cfg, root, inputs, timer) if cfg.objective == "latency" and todo else None
    reference = (copy.deepcopy(model) if inplace else model) if planner is not None else None  # timed at the end
    try:
        budget, rank_warnings = choose_ranks(cfg, [(rec, rule) for _, rec, _, rule in todo], kernels, shapes,
                                             flops_before, whitened, planner)
        if planner is not None and cfg.selection == "latency":
            def trial_times(replacements):  # the original and the planned model (untrained factors), timed
                if gm is not None:
                    trial = fx_pass.rewrite_fx(copy.deepcopy(gm), replacements,
                                               {c: b for c, b in folded.items() if c in replacements})
                else:  # the module tree: swap in a copy of the model
                    trial = fx_pass.rewrite_modules(copy.deepcopy(work), replacements,
                                                    {s.name: s.aliases for s in sites})
                return _model_times([gm if gm is not None else work, trial], inputs, planner.timer.target, timer)

            budget, rank_warnings = meet_latency(cfg, [(rec, rule) for _, rec, _, rule in todo], kernels, shapes,
                                                 flops_before, whitened, planner, (budget, rank_warnings), trial_times)
    finally:
        if planner is not None:
            planner.save()

    # Build the replacements.
    replacements: dict[str, nn.Module] = {}
    items = [(site, rec) for site, rec, _, _ in todo if rec.rank is not None]
    iterator = items
    if progress is True:
        from rich.progress import track

        iterator = track(items, description="decomposing", transient=True)
    for site, rec in iterator:
        if callable(progress):
            progress(site.name)
        cls = FORMS[rec.method]
        new = cls.from_conv(kernels[site.name], rec.rank,
                            **from_conv_options(cfg, rec, kernels[site.name], batches is not None, covs,
                                                _output_pixels(obs, site.name)))
        new.train(site.module.training)
        replacements[site.name] = new
        rec.status = "converted"
        rec.rel_error = new.decomposition_error
        rec.flops_after = measure.module_flops(new, shapes[site.name])
        rec.params_after = measure.count_params(new)

    # Folded BNs whose conv was kept dense stay in the graph.
    folded = {c: b for c, b in folded.items() if c in replacements}
    for rec in records:
        if rec.bn_folded and rec.name not in replacements:
            rec.bn_folded = None

    if gm is not None:
        training = work.training
        new_model: nn.Module = fx_pass.rewrite_fx(gm, replacements, folded)
        new_model.training = training
    else:
        new_model = fx_pass.rewrite_modules(work, replacements, {s.name: s.aliases for s in sites})

    if obs is not None:
        fits = refit_pointwise(new_model, [r.name for r in records if r.converted], obs.outputs,
                               torch.cat(batches), ridge=cfg.calib_ridge, steps=cfg.calib_steps, lr=cfg.calib_lr,
                               als=cfg.calib_als, seed=cfg.seed, progress=progress if callable(progress) else None)
        by_name = {r.name: r for r in records}
        for fit in fits:
            by_name[fit.name].calib_error_before = fit.error_before
            by_name[fit.name].calib_error_after = fit.error_after
            if fit.note:
                by_name[fit.name].note = _join(by_name[fit.name].note, fit.note)
        scarce_warning(records, sum(len(b) for b in batches), rank_warnings)

    # The fastest equivalent layout of each replacement (exactly the same function; after the refit, which fits
    # the last 1×1 conv in whatever channel order it has).
    for rec in records:
        if rec.converted and rec.layout is not None:
            new = replacements[rec.name].set_layout(rec.layout)
            if new.rank != rec.rank:
                rec.note = _join(rec.note, f"rank {rec.rank} padded to {new.rank} channels by zero terms (faster)")
            rec.flops_after = measure.module_flops(new, shapes[rec.name])
            rec.params_after = measure.count_params(new)

    result = ConvertResult(
        new_model, records, path, cfg, trace_error, flops_before, measure.count_flops(new_model, inputs),
        params_before, measure.count_params(new_model), budget,
    )
    if planner is not None:
        _check_latency(result, reference, inputs, planner, timer, rank_warnings)
    _warn(result, rank_warnings)
    return result


def meet_latency(cfg, todo, kernels, shapes, flops_before, whitened, planner, first, trial_times, *,
                 attempts: int = 3, tolerance: float = 0.02):
    """Check a latency plan on the whole model and re-plan until the measured time meets the budget.

    The layer times are measured one layer at a time; inside the model the separable layers may gain less (on 2
    cores in ONNX Runtime, a plan predicted at 0.41 of ResNet-18's time measured 0.60). So the planned model is
    built with untrained factors at the chosen ranks and layouts (speed does not depend on the weights; no
    decomposition yet) and ``trial_times(replacements)`` times it against the original, ``(ms original, ms
    planned)``; the layer-time budget is scaled by target / measured before planning again (the layer times are
    cached). The plan that met the budget, or else the fastest, is kept. Shared by the torch and the ONNX pass;
    ``todo`` is ``[(record, rule)]``, the rest as for :func:`choose_ranks`, ``first`` its first answer.
    """
    plans = []
    result = first
    for _ in range(attempts):
        replacements = {rec.name: FORMS[rec.method].like(kernels[rec.name], rec.rank).set_layout(rec.layout)
                        for rec, _ in todo if rec.rank is not None}
        if not replacements:
            break
        before, after = trial_times(replacements)
        ratio = after / before
        saved = {rec.name: (rec.rank, rec.layout, rec.time_after_ms, rec.reason) for rec, _ in todo}
        plans.append((ratio, saved, result))
        if ratio <= cfg.latency * (1 + tolerance) or len(plans) == attempts:
            break
        planner.budget_scale *= cfg.latency / ratio
        for rec, _ in todo:
            rec.rank = rec.layout = rec.time_after_ms = rec.reason = None
        result = choose_ranks(cfg, todo, kernels, shapes, flops_before, whitened, planner)
    if not plans:
        return result
    met = [p for p in plans if p[0] <= cfg.latency * (1 + tolerance)]
    ratio, saved, result = met[0] if met else min(plans, key=lambda p: p[0])
    for rec, _ in todo:
        rec.rank, rec.layout, rec.time_after_ms, rec.reason = saved[rec.name]
    budget, msgs = result
    msgs = list(msgs)
    if not met:
        msgs.append(f"the latency target {cfg.latency:g} was not met on {planner.where}: the fastest plan measured "
                    f"{ratio:.3f} of the original's time after {len(plans)} attempts")
    return budget, msgs


def _planner(cfg: ConvertConfig, model: nn.Module, inputs: tuple, timer) -> latency.LatencyPlanner:
    """The layer timer for ``cfg.target`` (through the disk cache unless a timing function is injected); with a
    latency budget, the original model's time on the target is measured first."""
    target = cfg.target
    if timer is None:
        target.check_available()
    path = latency.default_cache_path() if cfg.latency_cache is True else (cfg.latency_cache or None)
    layer_timer = latency.LayerTimer(target, cache=latency.LatencyCache(path), timer=timer)
    original_ms = None
    if cfg.selection == "latency":
        original_ms = _model_times([model], inputs, target, timer)[0]
    return latency.LatencyPlanner(layer_timer, cfg.margin, original_ms=original_ms, batch_size=int(inputs[0].shape[0]))


def _model_times(models, inputs: tuple, target, timer) -> list[float]:
    """Whole-model times in ms (measured, or from an injected timer) on the target."""
    if timer is not None:
        shape = (target.batch_size or inputs[0].shape[0], *inputs[0].shape[1:])
        ms = list(timer(list(models), shape, target))
        if len(ms) != len(models) or not all(isinstance(v, (int, float)) and v > 0 and v < float("inf") for v in ms):
            raise SeparifyError(f"the timing function returned {ms!r} for {len(models)} whole models; expected that "
                                "many positive milliseconds")
        return [float(v) for v in ms]
    return [t.median_ms for t in _model_timings(models, inputs, target)]


def injected_timings(models, inputs: tuple, target, timer, backend: str) -> list[measure.Timing]:
    """:func:`_model_times` from an injected timer, as :class:`~separify.measure.Timing` (one exact reading each)."""
    return [measure.Timing(backend, ms, 0.0, 1, 1, target.threads, target.batch_size)
            for ms in _model_times(models, inputs, target, timer)]


def _model_timings(models, inputs: tuple, target, *, scale: float = 1.0) -> list:
    try:
        return list(latency.time_model(list(models), inputs, target, scale=scale))
    except Exception as exc:  # noqa: BLE001 - e.g. an export failure for the onnxruntime target
        raise SeparifyError(f"could not time the whole model on {target.describe()}: {first_line(exc)}") from None


def _check_latency(result: ConvertResult, original: nn.Module, inputs: tuple, planner, timer, msgs: list) -> None:
    """Time both whole models on the target (see :func:`record_latency`)."""
    target = planner.timer.target

    def timings(scale: float) -> list[measure.Timing]:
        if timer is not None:
            return injected_timings([original, result.model], inputs, target, timer, target.backend)
        return _model_timings([original, result.model], inputs, target, scale=scale)

    record_latency(result, planner, timings, msgs, measured=timer is None)


def record_latency(result: ConvertResult, planner, timings: Callable[[float], Sequence[measure.Timing]], msgs: list,
                   *, measured: bool = True) -> None:
    """Time both whole models with ``timings(scale)`` (original, converted; ``scale`` × the usual run time) and keep
    the times on the target in ``result``, with what the layer times predicted; warn if the converted model was not
    faster. A real measurement that reads slower is repeated three times as long first: on a shared machine the speed
    of a small model can switch between levels mid-run (``benchmarks/results/ort_repeat.md``). Shared by the torch
    and the ONNX pass."""
    before, after = timings(1.0)
    if measured and result.converted and after.median_ms >= before.median_ms:
        before, after = timings(3.0)
    result.latency_target = planner.where
    result.latency_before, result.latency_after = before, after
    saved = sum(r.time_before_ms - r.time_after_ms for r in result.converted if r.time_after_ms is not None)
    base = before.median_ms
    result.latency_predicted = (base - saved) / base if base > 0 else None
    ratio = result.latency_ratio
    if ratio is not None and ratio >= 1.0 and result.converted:
        msgs.append(f"on {planner.where} the converted model measured {ratio:.2f}× the original's time although "
                    f"every replacement was measured faster alone; convert with a larger margin, or keep the "
                    "original")


def _is_onnx(model: Any) -> bool:
    """An ONNX file (by content), an ``onnx.ModelProto`` or an ``onnx_ir.Model``."""
    if isinstance(model, (str, os.PathLike)):
        from separify.io.models import is_onnx

        return is_onnx(model)
    import onnx
    import onnx_ir

    return isinstance(model, (onnx.ModelProto, onnx_ir.Model))


def _check_fits(model: nn.Module, batch: torch.Tensor) -> None:
    try:
        with torch.no_grad(), measure.frozen_mode(model):
            model(batch[:1])
    except Exception as exc:  # the model's own error says what does not fit
        raise SeparifyError(f"calibration data of shape {tuple(batch.shape[1:])} per sample does not fit the model "
                            f"({type(exc).__name__}: {first_line(exc)})") from None


def _check(site: fx_pass.ConvSite, rule: LayerRule | None, shapes: list) -> str | None:
    """Why this conv is not converted, or ``None``."""
    reason = why_not_convertible(site.module)
    if reason is not None:
        return reason
    if rule is not None and rule.exclude:
        return f"excluded by pattern {rule.pattern!r}"
    if site.blocker is not None:
        return site.blocker
    if not shapes:
        return "not called by the model's forward on the example input"
    return None


def choose_ranks(cfg: ConvertConfig, todo: list[tuple[LayerRecord, LayerRule | None]], kernels: dict[str, nn.Conv2d],
                 shapes: dict[str, list], flops_before: int, whitened: dict[str, torch.Tensor],
                 planner: "latency.LatencyPlanner | None" = None) -> tuple[int | None, list[str]]:
    """Set ``rec.rank`` (or ``rec.reason``) on every record in ``todo``; returns the FLOPs budget and warnings.

    Shared by the torch and the ONNX pass. ``kernels`` maps layer names to the (BatchNorm-folded) conv to decompose,
    ``shapes`` to the input shape(s) the layer is called with, ``flops_before`` is the whole model's FLOPs.
    ``whitened`` maps layer names to kernels whitened by their calibration inputs; the FLOPs allocation then uses
    their error curves (predicted relative output error) instead of the weight error.

    With a ``planner`` (``objective="latency"``), every candidate is timed on the target: a fixed rank not measured
    faster than the dense conv (by the margin) is dropped, and the allocation (FLOPs or time budget) only chooses
    among ranks of :func:`~separify.latency.rank_grid` measured faster; ``rec.layout`` and the times are set.
    """
    costs: dict[str, ranks.LayerCost] = {}
    for rec, rule in todo:
        kernel = kernels[rec.name]
        cls = FORMS[rec.method]

        def build(rank, _cls=cls, _k=kernel):
            return _cls.like(_k, rank, device="meta")

        rec.exact_rank = cls.max_rank(kernel)
        costs[rec.name] = ranks.LayerCost(
            rec.name, rec.flops_before, measure.affine_flops(build, shapes[rec.name]), rec.exact_rank,
            lambda r, _m=rec.method, _w=whitened.get(rec.name, kernel.weight): ranks.error_curve(_m, _w, r),
        )

    planned = []
    for rec, rule in todo:
        fixed, source = None, cfg.selection
        if rule is not None and rule.rank is not None:
            fixed, source = rule.rank, f"rule {rule.pattern!r}"
        elif rule is not None and rule.energy is not None:
            fixed = ranks.rank_for_energy(rec.method, kernels[rec.name].weight, rule.energy)
            source = f"rule {rule.pattern!r}"
        elif cfg.rank is not None:
            fixed = cfg.rank
        elif cfg.energy is not None:
            fixed = ranks.rank_for_energy(rec.method, kernels[rec.name].weight, cfg.energy)
        rec.rank_source = source
        if fixed is None:
            rec.rank_source = f"{cfg.selection} (output error on calibration data)" if rec.name in whitened \
                else cfg.selection
            planned.append(rec)
            continue
        if fixed > rec.exact_rank:
            rec.note = _join(rec.note, f"rank {fixed} clamped to the exact rank {rec.exact_rank}")
            fixed = rec.exact_rank
        cost = costs[rec.name].flops(fixed)
        if cost >= rec.flops_before and cfg.require_saving:
            rec.reason = f"no FLOPs saved at rank {fixed} ({cost:,} ≥ {rec.flops_before:,} dense)"
        elif planner is None:
            rec.rank = fixed
        else:
            allowed = planner.options(rec, kernels[rec.name], shapes[rec.name], [fixed], _width_ok(cfg, rec, costs))
            if fixed in allowed:
                rec.rank = fixed
                rec.layout, rec.time_after_ms = allowed[fixed]

    if not planned:
        return None, []
    # With a planner, each layer's options are the grid ranks measured faster than the dense conv, costed in
    # FLOPs or in measured ms; a layer with none stays dense (planner.options set the reason).
    options: dict[str, tuple[list, list, np.ndarray]] = {}
    timed: dict[str, dict[int, tuple[str, float]]] = {}  # name -> {rank: (layout, ms)}
    in_alloc = []
    for rec in planned:
        if planner is None:
            in_alloc.append(rec)
            continue
        grid = latency.rank_grid(rec.method, costs[rec.name].saving_ranks())
        allowed = planner.options(rec, kernels[rec.name], shapes[rec.name], grid, _width_ok(cfg, rec, costs)) \
            if grid else {}
        if not grid:
            rec.reason = "no FLOPs saved at any rank"
        if not allowed:
            continue
        in_alloc.append(rec)
        timed[rec.name] = allowed
        choices = sorted(allowed)
        if cfg.selection == "latency":
            cost_of = [allowed[r][1] for r in choices] + [rec.time_before_ms]
        else:
            cost_of = [costs[rec.name].flops(r) for r in choices] + [rec.flops_before]
        err2 = np.concatenate([costs[rec.name].errors(np.array(choices)) ** 2, [0.0]])
        options[rec.name] = (choices + [None], cost_of, err2)
    converted_fixed = [r for r, _ in todo if r.rank is not None]
    msgs = []
    if not in_alloc:  # nothing left to allocate (e.g. no replacement measured faster): the reasons are set
        return None, msgs
    if cfg.selection == "latency":
        # time outside the allocation: the model's other ops, dense layers, and the fixed-rank layers' dense time
        layers_ms = sum(r.time_before_ms for r in in_alloc) + sum(r.time_before_ms for r in converted_fixed)
        if layers_ms > 1.05 * planner.original_ms:  # isolated layers timed slower than inside the model
            msgs.append(f"the measured layer times add up to more than the whole model's time "
                        f"({planner.original_ms:.3g} ms); the latency budget is applied to the layer times alone")
        total = max(planner.original_ms, layers_ms)  # in the layer times' unit
        rest = total - layers_ms
        fixed_after = sum(r.time_after_ms for r in converted_fixed)
        total_budget = cfg.latency * total * planner.budget_scale
        alloc = ranks.allocate_options(options, total_budget - rest - fixed_after)
        kept_by = "the latency allocation"
    else:
        fixed_after = sum(costs[r.name].flops(r.rank) for r in converted_fixed)
        # FLOPs outside the allocation: non-conv ops, skipped convs, and fixed-rank layers' dense cost they replace
        rest = flops_before - sum(r.flops_before for r in in_alloc) - sum(r.flops_before for r in converted_fixed)
        total_budget = int(cfg.flops * flops_before)
        if planner is None:
            alloc = ranks.allocate([costs[r.name] for r in in_alloc], total_budget - rest - fixed_after)
        else:
            alloc = ranks.allocate_options(options, total_budget - rest - fixed_after)
        kept_by = "the global FLOPs allocation"
    for rec in in_alloc:
        rank = alloc.ranks.get(rec.name)
        if rank is not None:
            rec.rank = rank
            if rec.name in timed:
                rec.layout, rec.time_after_ms = timed[rec.name][rank]
        elif len(costs[rec.name].saving_ranks()) == 0:
            rec.reason = "no FLOPs saved at any rank"
        else:
            rec.reason = f"kept dense by {kept_by}"
    if not alloc.feasible:
        if cfg.selection == "latency":
            lowest = (rest + fixed_after + alloc.flops) / total
            msgs.append(f"the latency target {cfg.latency:g} cannot be reached: with every layer at its fastest "
                        f"measured replacement the layer times add up to {lowest:.3f} of the original's")
        else:
            lowest = (rest + fixed_after + alloc.flops) / flops_before
            msgs.append(f"the FLOPs target {cfg.flops:g} cannot be reached: with every convertible layer at "
                        f"{'its cheapest allowed rank' if planner else 'rank 1'} the model keeps {lowest:.3f} of its "
                        "FLOPs")
    return (int(total_budget) if cfg.selection == "flops" else None), msgs


def from_conv_options(cfg: ConvertConfig, rec: LayerRecord, kernel: nn.Conv2d, calibrated: bool,
                      covs: dict, pixels: int | None = None) -> dict[str, Any]:
    """Keyword arguments of ``from_conv`` for one layer (both passes): for pw-dw-pw the CP solver's controls, with
    the fewer sweeps where calibration's alternating least squares will refit the layer (its depthwise conv reads
    ``R·kh·kw`` values per pixel, and the layer's ``pixels`` calibration pixels are not scarce for the ``R``
    inputs of its last 1×1 conv); with ``calib_whiten``, the layer's input moments."""
    extra: dict[str, Any] = {}
    if rec.method == "pw-dw-pw":
        refitted = (calibrated and als_runs(rec.rank * math.prod(kernel.kernel_size))
                    and not (pixels is not None and scarce(pixels, rec.rank)))
        extra.update(max_iter=cfg.cp_sweeps(refitted), tol=cfg.cp_tol, seed=cfg.seed)
    if cfg.calib_whiten and rec.name in covs:
        extra.update(cov=covs[rec.name], damp=cfg.calib_damp)
    return extra


def _output_pixels(obs, name: str) -> int | None:
    """Pixels of a layer's output over the whole calibration set (``None`` without calibration)."""
    if obs is None or name not in obs.outputs:
        return None
    y = obs.outputs[name]  # (n, N, H, W)
    return y.shape[0] * y[0, 0].numel()


def _width_ok(cfg: ConvertConfig, rec: LayerRecord, costs: dict[str, ranks.LayerCost]):
    """Which padded widths a layer may run at: none beyond its rank under a FLOPs target (the target counts the
    rank's FLOPs), and, with ``require_saving``, none that costs the dense conv's FLOPs or more."""
    if cfg.selection == "flops":
        return lambda width: False
    if cfg.require_saving:
        return lambda width: costs[rec.name].flops(width) < rec.flops_before
    return None


def _join(a: str | None, b: str) -> str:
    return b if not a else a if b in a.split("; ") else f"{a}; {b}"


def scarce_warning(records: Sequence[LayerRecord], samples: int, msgs: list[str]) -> None:
    """Add a warning when calibration data was scarce for some layers (their notes say how it was handled)."""
    names = [r.name for r in records if r.note and "scarce calibration data" in r.note]
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
        warnings.warn(m, stacklevel=3)
    result.warnings.extend(msgs)
