"""``separify.convert``: a trained model in, the same model with separable convs out, plus a record per layer.

One driver for every model type: discover the convs → check each (a reason for every refusal) → plan ranks, forms
and layouts → decompose → apply → calibrate → layouts → verify → result. The steps that differ between a PyTorch
model and an ONNX graph are a :class:`~separify.backends.base.Backend`'s; everything else is written here once.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from separify.backends.base import Backend, Found
from separify.config import ConvertConfig
from separify.core import measure
from separify.core.decompose import check_weight, whiten
from separify.core.modules import FORMS, SeparableConv2d
from separify.core.progress import progress_bar
from separify.errors import BadWeightsError, ConfigError, SeparifyError
from separify.planning import latency
from separify.planning.plan import Candidate, choose_ranks, from_conv_options, keep_faster, meet_latency, planned
from separify.records import ConvertResult, LayerRecord, NoteCode, Plan, Reason, Skip, new_record
from separify.calibration import PIXELS_PER_INPUT, LayerFit
from separify.calibration.budget import STOPPED, Budget
from separify.calibration.output import HOLD_EVERY, OutputFit, fit_output, step_dtype, too_few
from separify.search import Memo, check_search, fastest_within

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
    max_drop: float | None = None,
    evaluate: Callable[[Any], float] | None = None,
    metric_name: str = "evaluate(model)",
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
        max_drop: the fastest plan on the target whose ``evaluate(model)`` is at least the original's minus
            ``max_drop`` (:mod:`separify.search`: latency budgets bisected, timings and calibration statistics
            measured once); the tries are in ``result.search``.
        evaluate: ``callable(model) -> float``, higher is better (top-1, mAP, agreement with the original...), on
            held-out data; for ONNX models it gets an :class:`~separify.backends.onnx.OrtModule`.
        metric_name: what ``evaluate`` measures, for the report.

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
    search = dict(max_drop=max_drop, evaluate=evaluate, metric_name=metric_name)
    if not isinstance(model, nn.Module) and _is_onnx(model):
        shapes = tuple(example_inputs.shape) if isinstance(example_inputs, torch.Tensor) else example_inputs
        return convert_onnx(model, cfg, input_shapes=shapes, calibration=calibration, progress=progress, timer=timer,
                            **search)
    if not isinstance(model, nn.Module):
        raise SeparifyError(f"convert() takes an nn.Module or an ONNX model, got {type(model).__name__} (load "
                            "PyTorch files with separify.io.models.load_model)")
    from separify.backends.torch import TorchBackend

    def make(inplace: bool = inplace) -> TorchBackend:
        with _count_bar(progress, "tracing the model, counting FLOPs", None, live=True) as on_calls:
            return TorchBackend(model, cfg, example_inputs, inplace=inplace, timer=timer, progress=on_calls)

    return _run_or_search(make, cfg, calibration=calibration, progress=progress, timer=timer, **search)


def _run_or_search(make, cfg: ConvertConfig, *, max_drop, evaluate, metric_name, **kw) -> ConvertResult:
    """One conversion, or with ``max_drop`` the search over latency budgets (fresh copies of the model)."""
    if max_drop is None and evaluate is None:
        return run(make(), cfg, **kw)
    if max_drop is None:
        raise SeparifyError("evaluate is the metric of the max_drop search; give max_drop too")
    check_search(cfg, max_drop, evaluate)
    return fastest_within(lambda: make(inplace=False), run, cfg, max_drop=max_drop, evaluate=evaluate,
                          metric_name=metric_name, **kw)


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
    max_drop: float | None = None,
    evaluate: Callable[[Any], float] | None = None,
    metric_name: str = "evaluate(model)",
    **options: Any,
) -> ConvertResult:
    """:func:`convert` for an ONNX model (a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model``; never modified).

    Name patterns match node names (or ``Conv:<output name>`` for unnamed nodes). ``input_shapes``: the shape to
    convert at for inputs with dynamic dimensions (one shape, or a dict by name). ``calibration`` runs through
    onnxruntime (single-input models). ``check_samples`` random inputs compare both graphs in onnxruntime at the end
    (0: skip). ``threads``: onnxruntime threads. The latency target is ONNX Runtime on the CPU (``"cpu"`` is read as
    that). The output reconstruction (``calibration.output_steps``) imports both graphs into PyTorch with
    onnx2torch; where that fails it is skipped with a note (``result.output_fit``).
    """
    from separify.backends.onnx import OnnxBackend

    cfg = _config(config, options)

    def make(inplace: bool = False) -> OnnxBackend:
        return OnnxBackend(model, cfg, input_shapes=input_shapes, check_samples=check_samples, threads=threads,
                           timer=timer)

    return _run_or_search(make, cfg, calibration=calibration, progress=progress, timer=timer, max_drop=max_drop,
                          evaluate=evaluate, metric_name=metric_name)


def run(backend: Backend, cfg: ConvertConfig, *, calibration: Any = None,
        progress: bool | Callable[[str], None] = False, timer: latency.Timer | None = None,
        memo: Memo | None = None, keep: Skip | None = None) -> ConvertResult:
    """The conversion of one model through its backend (module docstring). ``memo`` shares measurements between
    conversions of the same model; ``keep`` leaves every candidate dense with that reason."""
    start = time.perf_counter()
    budget = Budget.starting_now(cfg.calibration.seconds)
    memo = memo if memo is not None else Memo()
    samples = backend.set_calibration(calibration, cfg.calibration) if calibration is not None else 0
    records, cands = _check(backend, cfg, keep)
    observing = time.perf_counter()
    with _count_bar(progress if samples else False, f"calibration: the original on {samples} samples",
                    samples) as on_samples:
        covs, whitened, patches = _observe(backend, cfg, cands, memo, on_samples) if samples else ({}, {}, {})
    observed = time.perf_counter() - observing  # the cost of one pass over the data: the budget's yardstick
    msgs: list[str] = []
    if samples and cands:
        _weigh(backend, cfg, cands, memo, msgs, progress)
    clock = Clock(backend, cfg, timer, memo) if cfg.objective == "latency" and cands else None
    planning = time.perf_counter()
    flops_budget, plan_msgs = _plan(backend, cfg, cands, whitened, patches, clock, progress)
    msgs += plan_msgs
    if clock is not None:  # timing layers on the target is not calibration: the time budget does not count it
        budget = budget.extended(time.perf_counter() - planning)
    pixels = backend.output_pixels(planned(cands)) if samples else {}
    replacements = _decompose(cfg, cands, covs, pixels, calibrated=samples > 0, progress=progress)
    by_name = {r.name: r for r in records}
    for c in cands:  # the record of a dense layer names no folded BatchNorm
        if c.name not in replacements:
            c.record.bn_folded = None
    backend.apply(replacements, by_name)
    output_fit = None
    if samples and replacements:
        with _layer_bar(progress, "calibrating", len(replacements), counted=False) as on_layer:
            fits = backend.refit(replacements, by_name, cfg, pixels, on_layer, budget=budget.layer_steps(observed))
        _record_fits(by_name, fits)
        _scarce_warning(records, samples, msgs)
        output_fit = _fit_output(backend, cfg, replacements, samples, progress, budget)
        _budget_warning(cfg, fits, output_fit, msgs)
    _layouts(backend, cands, replacements)
    result = backend.result(records, cfg, flops_budget)
    result.output_fit = output_fit
    if clock is not None:
        with _step_bar(progress, f"checking: timing both whole models on {clock.where}"):
            _check_latency(clock, result, msgs)
        clock.save()
    _warn(result, msgs)
    result.seconds = time.perf_counter() - start
    return result


def _config(config: ConvertConfig | None, options: dict[str, Any]) -> ConvertConfig:
    if config is not None and not isinstance(config, ConvertConfig):
        raise SeparifyError(f"config must be a ConvertConfig, got {type(config).__name__}")
    if options:
        return config.replace(**options) if config is not None else ConvertConfig(**options)
    return config or ConvertConfig()


# --------------------------------------------------------------------------------------------------------------
# discover → check


def _refusal(cfg: ConvertConfig, found: Found, keep: Skip | None):
    """Why this conv stays dense before any planning (``None``: a candidate)."""
    rule = cfg.rule_for(found.spec.name)
    if found.refusal is not None:
        return found.refusal.code, found.refusal.text
    if rule is not None and rule.exclude:
        return Reason.EXCLUDED, f"excluded by pattern {rule.pattern!r}"
    if not found.shapes:
        return Reason.NOT_REACHED, NOT_REACHED
    if keep is not None:
        return keep.code, keep.text
    return None


def _check(backend: Backend, cfg: ConvertConfig, keep: Skip | None = None
           ) -> tuple[list[LayerRecord], list[Candidate]]:
    """A record per conv; the candidates with their kernels (BatchNorm folded) and checked weights."""
    records, cands = [], []
    for found in backend.discover():
        rec = new_record(found.spec, found.flops, found.params)
        records.append(rec)
        refusal = _refusal(cfg, found, keep)
        if refusal is not None:
            rec.skip_with(*refusal)
            continue
        rule = cfg.rule_for(rec.name)
        method = (rule.method if rule and rule.method else None) or cfg.method
        if method == "auto" and rule is not None and (rule.rank is not None or rule.energy is not None):
            raise ConfigError(f"rule {rule.pattern!r} fixes a rank for layer {rec.name!r}, whose form is 'auto': "
                              "name the form in the rule (method='dw-pw' or 'pw-dw-pw')")
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


def _observe(backend: Backend, cfg: ConvertConfig, cands: list[Candidate], memo: Memo, progress=None):
    """Input moments of every candidate (where the whitening or the data-aware allocation uses them) and the
    whitened kernels whose error curves are the predicted output errors the allocation uses; taken from ``memo``
    when another conversion of the same model and data measured them. ``progress(done, total)``: samples seen."""
    if memo.observed is not None:
        observed, covs, whitened, patches = memo.observed
        backend.use_observation(observed)
        return covs, whitened, patches
    cal = cfg.calibration
    need = cal.whiten or (cal.ranks and cfg.selection in ("flops", "latency"))
    auto = frozenset(c.name for c in cands if c.auto)
    covs, patches = backend.observe(cands, moments=need, patches=auto, progress=progress) if cands else ({}, {})
    whitened = {c.name: whiten(c.kernel.weight, covs[c.name], c.method, damp=cal.damp)
                for c in cands if cal.ranks and c.name in covs and not c.auto}
    memo.observed = (backend.observation(), covs, whitened, patches)
    return covs, whitened, patches


def _weigh(backend: Backend, cfg: ConvertConfig, cands: list[Candidate], memo: Memo, msgs: list[str],
           progress=False) -> None:
    """Loss-aware allocation (``calibration.loss_aware``, with a data-aware FLOPs or latency allocation): each
    candidate's weight, from ``memo`` when another conversion of the same model and data measured it (else
    measured under a bar over the passes, ``progress is True``)."""
    cal = cfg.calibration
    if not (cal.loss_aware and cal.ranks and cfg.selection in ("flops", "latency")):
        return
    if memo.weights is None:
        with _count_bar(progress, "calibration: each layer's effect on the output", None, live=True) as on_passes:
            memo.weights = backend.sensitivity(cands, cal, progress=on_passes)
    weights, note = memo.weights
    for c in cands:
        c.weight = weights.get(c.name)
    if note:
        msgs.append(note)


def _plan(backend: Backend, cfg: ConvertConfig, cands: list[Candidate], whitened, patches, clock: "Clock | None",
          progress):
    """Ranks (and, under the latency objective, layouts measured on the target) for every candidate; under the
    latency objective the planned whole model is then checked against the original (:func:`keep_faster`)."""
    if clock is None:
        return choose_ranks(cfg, cands, backend.flops_before, whitened, None, patches)
    with _timing_bar(progress, len(cands), clock.where) as on_layer:
        planner = clock.planner(cfg, on_layer)

        def trial_times(replacements):  # the original and the planned model (untrained factors), timed
            on_layer(None)
            models = ["original", backend.trial(replacements)]
            return tuple(t.median_ms for t in clock.models(models))

        try:
            budget, msgs = choose_ranks(cfg, cands, backend.flops_before, whitened, planner, patches)
            if cfg.selection == "latency":
                budget, msgs = meet_latency(cfg, cands, backend.flops_before, whitened, planner, (budget, msgs),
                                            trial_times, patches=patches)
            return budget, list(msgs) + keep_faster(cands, trial_times, clock.where)
        finally:
            clock.save()


@contextmanager
def _timing_bar(progress, layers: int, where: str):
    """A progress bar with an ETA over the layers whose candidates are timed (``progress is True``), drawn from the
    start; yields ``on_layer(name)``, called before each layer is timed (``None``: a whole-model timing). Redrawn
    only between measurements, never while timing."""
    if progress is not True:
        yield lambda name: None
        return
    bar = progress_bar(total=True)
    with bar:
        task = bar.add_task(f"timing candidates on {where}", total=layers)
        bar.refresh()
        seen: set[str] = set()

        def on_layer(name):
            if name is None:
                bar.update(task, description=f"timing the whole model on {where}")
            elif name not in seen:
                if seen:
                    bar.advance(task)
                seen.add(name)
                bar.update(task, description=f"timing candidates of {name}")
            bar.refresh()

        yield on_layer


@contextmanager
def _step_bar(progress, what: str):
    """One step whose length is not known in advance (``progress is True``): its description, drawn once (no
    redraw while it times)."""
    if progress is not True:
        yield
        return
    with progress_bar(total=False) as bar:
        bar.add_task(what, total=None)
        bar.refresh()
        yield


@contextmanager
def _count_bar(progress, what: str, total: int | None, *, live: bool = False):
    """A progress bar with an ETA over ``total`` steps (calibration samples, passes, module calls) (``progress is
    True``; else yields ``None``); yields ``on_count(done, total)``, which sets both (``done`` clamped to
    ``total``). ``total=None``: the elapsed time only until the first call. ``live``: redrawn by a thread too (a
    step that times nothing), else only at each call."""
    if progress is not True:
        yield None
        return
    with progress_bar(total=True, auto_refresh=live) as bar:
        task = bar.add_task(what, total=total)
        bar.refresh()

        def on_count(done: int, total: int) -> None:
            bar.update(task, completed=min(done, total), total=total)
            bar.refresh()

        yield on_count


@contextmanager
def _layer_bar(progress, what: str, layers: int, *, counted: bool = True):
    """A progress bar with an ETA over ``layers`` layers (``progress is True``); yields ``on_layer(name)``, called as
    each layer starts (``progress`` itself when it is a callable). ``counted=False``: the total (and so the ETA)
    only from the first reported layer on, the elapsed time until then (a backend may report none)."""
    if progress is not True:
        yield progress if callable(progress) else (lambda name: None)
        return
    with progress_bar(total=True) as bar:
        task = bar.add_task(f"{what} {layers} layers", total=layers if counted else None)
        bar.refresh()
        seen: set[str] = set()

        def on_layer(name: str) -> None:
            if name in seen:
                return
            if seen:
                bar.advance(task)
            elif not counted:
                bar.update(task, total=layers)
            seen.add(name)
            bar.update(task, description=f"{what} {name}")
            bar.refresh()

        yield on_layer


class Clock:
    """Timing on the latency target, through one cache: layer candidates (:class:`~latency.LayerTimer`) and whole
    models (keyed by :meth:`Backend.fingerprint`, so a model timed once on this machine is not timed again)."""

    def __init__(self, backend: Backend, cfg: ConvertConfig, timer: latency.Timer | None, memo: Memo) -> None:
        self.backend, self.timer = backend, timer
        self.target = backend.latency_target(cfg)
        if timer is None:
            self.target.check_available()
        if memo.cache is None:
            cache = cfg.latency.cache
            memo.cache = latency.LatencyCache(latency.default_cache_path() if cache is True else (cache or None))
        self.cache = memo.cache
        self.where = self.target.describe(backend.example_batch)

    def planner(self, cfg: ConvertConfig, on_layer) -> latency.LatencyPlanner:
        """The layer timer; with a latency budget, the original model's time on the target is measured first."""
        layer_timer = latency.LayerTimer(self.target, cache=self.cache, timer=self.timer)
        original_ms = None
        if cfg.selection == "latency":
            on_layer(None)
            original_ms = self.models(["original"])[0].median_ms
        return latency.LatencyPlanner(layer_timer, cfg.latency.margin, original_ms=original_ms,
                                      batch_size=self.backend.example_batch, on_layer=on_layer)

    def models(self, which: Sequence[Any], *, scale: float = 1.0) -> list[measure.Timing]:
        """Whole models (``"original"``, ``"converted"`` or models) timed together (interleaved), unless the same
        models were timed together before on this machine (then their readings of that run)."""
        if self.timer is not None:
            return self.backend.time_models(which, self.target, self.timer, scale=scale)
        key = self.cache.models_key(self.target, [self.backend.fingerprint(w) for w in which],
                                    self.backend.input_shapes, scale)
        cached = self.cache.get_timings(key)
        if cached is not None:
            return cached
        timings = self.backend.time_models(which, self.target, None, scale=scale)
        self.cache.put_timings(key, timings)
        return timings

    def save(self) -> None:
        self.cache.save()


# --------------------------------------------------------------------------------------------------------------
# decompose → calibrate → layouts


def _decompose(cfg: ConvertConfig, cands: list[Candidate], covs, pixels, *, calibrated: bool,
               progress) -> dict[str, SeparableConv2d]:
    """The replacement module of every planned candidate, in graph order."""
    items = [c for c in cands if c.record.plan is not None and c.plan.rank is not None]
    replacements = {}
    with _layer_bar(progress, "decomposing", len(items)) as on_layer:
        for c in items:
            on_layer(c.name)
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


def _fit_output(backend: Backend, cfg: ConvertConfig, replacements: dict[str, SeparableConv2d], samples: int,
                progress, budget: Budget) -> OutputFit | None:
    """The output reconstruction (:mod:`separify.calibration.output`) after the layer pass, on ``samples``
    calibration samples, within what is left of the time ``budget``; ``None`` when off."""
    cal = cfg.calibration
    if cal.output_steps == 0:
        return None
    note = too_few(samples)  # decided before any model is built (an ONNX graph's import takes seconds)
    if note:
        return OutputFit(0, samples // HOLD_EVERY, note=note)
    models = backend.output_models(replacements)
    if isinstance(models, str):
        return OutputFit(0, 0, note=f"no output reconstruction: {models}")
    frozen = [m for m in (models.student, models.teacher) if isinstance(m, nn.Module)]
    start = time.perf_counter()
    with _count_bar(progress, "calibrating: the model's output", cal.output_steps) as on_step, \
            measure.frozen_mode(*frozen):
        dtype = step_dtype(cal.precision, models.student, models.groups, steps=cal.output_steps,
                           batch_size=cal.batch_size, fixed_batch=models.fixed_batch,
                           flops_per_value=models.flops_per_value)
        fit = fit_output(models.student, models.params, models.teacher, models.groups, steps=cal.output_steps,
                         lr=cal.output_lr, batch_size=cal.batch_size, seed=cfg.seed, fixed_batch=models.fixed_batch,
                         dtype=dtype, channels_last=models.channels_last, on_step=on_step, until=budget.output_until())
    if fit.kept:
        models.write_back()
    return dataclasses.replace(fit, seconds=time.perf_counter() - start)


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


def _check_latency(clock: Clock, result: ConvertResult, msgs: list[str]) -> None:
    """Time both whole models on the target (from the cache when the planned model was timed) and keep the times
    in ``result``, with what the layer times predicted; warn if the converted model was not faster. A fresh
    measurement that reads slower is repeated three times as long first: on a shared machine the speed of a small
    model can switch between levels mid-run."""
    where = clock.where
    before, after = clock.models(["original", "converted"])
    if clock.timer is None and result.converted and after.median_ms >= before.median_ms:
        before, after = clock.models(["original", "converted"], scale=3.0)
    result.latency_target, result.latency_spec = where, clock.target
    result.latency_before, result.latency_after = before, after
    saved = sum(r.time_before_ms - r.time_after_ms for r in result.converted if r.time_after_ms is not None)
    base = before.median_ms
    result.latency_predicted = (base - saved) / base if base > 0 else None
    ratio = result.latency_ratio
    if ratio is not None and ratio >= 1.0 and result.converted:
        msgs.append(f"on {where} the converted model measured {ratio:.2f}× the original's time although its plan "
                    "measured faster; time it again on an idle machine, or convert with a larger --margin")


def _budget_warning(cfg: ConvertConfig, fits: Sequence[LayerFit], output_fit: OutputFit | None,
                    msgs: list[str]) -> None:
    """Warn when the time budget stopped reconstruction steps (each layer's note and the output reconstruction's
    line say how many ran)."""
    layers = [f.name for f in fits if f.note and STOPPED in f.note]
    output = output_fit is not None and output_fit.steps < output_fit.planned
    if layers or output:
        what = [f"the layer-wise reconstruction of {len(layers)} layer(s)"] if layers else []
        what += ["the output reconstruction"] if output else []
        msgs.append(f"the time budget (calib_seconds={cfg.calibration.seconds:g}) stopped {' and '.join(what)} "
                    "before all steps; a larger budget (calib_seconds, --calib-seconds) or none runs them all")


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
