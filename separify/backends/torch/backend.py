"""The PyTorch backend: convs found through torch.fx (or the module tree when tracing fails), swapped as modules."""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from separify.backends.base import Backend, Found, Kernel, OutputModels
from separify.backends.torch import fx_pass
from separify.calibration import (LayerFit, Observation, as_batches, observe, refit_pointwise, sensitivity,
                                  shape_groups)
from separify.calibration.budget import StepTime
from separify.calibration.data import first_samples
from separify.calibration.precision import pass_dtype, runs_channels_last
from separify.calibration.sensitivity import SAMPLES, unweighted_note
from separify.config import Calibration, ConvertConfig, LatencyTarget
from separify.core import measure
from separify.core.modules import SeparableConv2d, why_not_convertible
from separify.errors import SeparifyError, first_line
from separify.planning import latency
from separify.records import ConvertResult, LayerRecord, LayerSpec, Reason, Skip

__all__ = ["TorchBackend"]


def _call_counter(progress: Callable[[int, int], None] | None, total: int) -> Callable[[], None] | None:
    """``on_call()`` that reports ``progress(calls so far, total)``, clamped, at each hundredth of ``total`` (a
    redraw per call would cost more than the trace); ``None`` without ``progress``."""
    if progress is None:
        return None
    calls = [0]
    progress(0, total)

    def on_call() -> None:
        calls[0] += 1
        if calls[0] * 100 // total != (calls[0] - 1) * 100 // total:
            progress(min(calls[0], total), total)

    return on_call


class TorchBackend(Backend):
    """An ``nn.Module`` and example inputs. Works on a deep copy unless ``inplace``. ``progress(done, total)``: the
    module calls of the trace and of the FLOP-counting forward, about one per module each (a shared module called
    again counts again, so ``done`` is clamped to ``total``; a trace that fails part-way leaves the rest out)."""

    def __init__(self, model: nn.Module, cfg: ConvertConfig, example_inputs: Any, *, inplace: bool = False,
                 timer: latency.Timer | None = None, progress: Callable[[int, int], None] | None = None) -> None:
        if example_inputs is None:
            raise SeparifyError("convert() needs example_inputs (e.g. torch.randn(1, 3, 224, 224)) to count FLOPs")
        self.inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        self.original = model
        # the original as it was, for the final timing: with inplace the working model is the input itself
        self.reference = copy.deepcopy(model) if inplace and cfg.objective == "latency" else model
        self.work = model if inplace else copy.deepcopy(model)
        on_call = _call_counter(progress, (1 if cfg.tracer == "module" else 2) * sum(1 for _ in model.modules()))
        self.gm = self._trace(cfg.tracer, on_call)
        self.root = self.gm if self.gm is not None else self.work
        self.path = "fx" if self.gm is not None else "module-tree"
        self.sites = fx_pass.match_fx(self.gm) if self.gm is not None else fx_pass.match_modules(self.work)
        self.memory_gb = cfg.calibration.memory_gb
        self.fold_bn = cfg.fold_bn
        self._original_fp: str | None = None
        self.flops_before = measure.count_flops(self.root, self.inputs, on_call)
        self.params_before = measure.count_params(self.root)
        self.batches: list[torch.Tensor] | None = None
        self.dtype: torch.dtype | None = None  # autocast of the calibration passes (set_calibration)
        self.channels_last = False  # the passes run images channels-last (set_calibration)
        self.obs: Observation | None = None
        self.folded: dict[str, str] = {}
        self.converted: nn.Module | None = None

    def _trace(self, tracer: str, on_call: Callable[[], None] | None = None) -> fx.GraphModule | None:
        if tracer == "module":
            return None
        try:
            return fx_pass.trace(self.work, on_call)
        except fx_pass.TraceFailed as exc:
            if tracer == "fx":
                raise SeparifyError(f"torch.fx could not trace the model: {exc}") from exc
            self.trace_error = str(exc)
            return None

    # --- discover and check

    def discover(self) -> list[Found]:
        shapes = measure.conv_input_shapes(self.root, self.inputs, [s.name for s in self.sites])
        found = []
        for site in self.sites:
            conv, calls = site.module, shapes[site.name]
            spec = LayerSpec(site.name, conv.in_channels, conv.out_channels, tuple(conv.kernel_size),
                             tuple(conv.stride), conv.groups, calls[0] if calls else None)
            found.append(Found(spec, measure.module_flops(conv, calls) if calls else 0, measure.count_params(conv),
                               calls, _refusal(site)))
        return found

    def kernel(self, name: str, cfg: ConvertConfig) -> Kernel:
        """The conv, with the BatchNorm that only follows it folded in (fx path, eval mode)."""
        site = next(s for s in self.sites if s.name == name)
        conv = site.module
        if not cfg.fold_bn:
            return Kernel(conv)
        if site.bn_name is None:
            return Kernel(conv, bn_note="no BatchNorm folding on the module-tree path" if self.gm is None else None)
        bn = self.root.get_submodule(site.bn_name)
        why = fx_pass.bn_fold_reason(bn)
        if why is not None:
            return Kernel(conv, bn_note=f"BatchNorm {site.bn_name} not folded: {why}")
        folded = copy.deepcopy(conv)
        folded.weight, folded.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                          bn.eps, bn.weight, bn.bias)
        self.folded[name] = site.bn_name
        return Kernel(folded, bn_folded=site.bn_name)

    # --- calibration

    def set_calibration(self, data: Any, cal: Calibration) -> int:
        ndim = self.inputs[0].dim() if isinstance(self.inputs[0], torch.Tensor) else None
        self.batches = as_batches(data, limit=cal.limit, ndim=ndim, input_key=cal.input_key,
                                  max_bytes=int(cal.memory_gb * 2**30))
        for group in shape_groups([b[:1] for b in self.batches]):  # one sample of each shape
            _check_fits(self.original, group[:1])
        device = self.batches[0].device if self.batches else torch.device("cpu")
        self.dtype = pass_dtype(cal.precision, self.original, device, self._pass_flops())
        with measure.frozen_mode(self.original):
            self.channels_last = bool(self.batches) and runs_channels_last(self.original, self.batches[0][:2])
        if self.work is self.original and self.reference is self.original and cal.output_steps > 0:
            self.reference = copy.deepcopy(self.original)  # inplace: the output reconstruction's teacher
        return sum(len(b) for b in self.batches)

    def _pass_flops(self) -> float:
        """The FLOPs of one forward of the original over the calibration data: the example's count per input value
        times the calibration data's input values (exact for a fully convolutional model)."""
        return self._flops_per_value() * sum(b.numel() for b in self.batches)

    def _flops_per_value(self) -> float:
        """The original's forward FLOPs on the example per input value (0 for an example that is not a tensor)."""
        example = self.inputs[0]
        if not (isinstance(example, torch.Tensor) and example.numel()):
            return 0.0
        return self.flops_before / example.numel()

    def observe(self, cands, moments: bool, patches=frozenset(), progress=None):
        targets = {c.name: c.record.bn_folded or c.name for c in cands}
        # on the input model, before any rewrite (so inplace is safe); the outputs are the refit's targets
        self.obs = observe(self.original, targets, self.batches, memory_gb=self.memory_gb, moments=moments,
                           patches=patches, dtype=self.dtype, channels_last=self.channels_last, progress=progress)
        return self.obs.covariances, self.obs.patches

    def sensitivity(self, cands, cal: Calibration, progress=None):
        targets = {c.name: c.record.bn_folded or c.name for c in cands}
        weights = sensitivity(self.original, targets, first_samples(self.batches, SAMPLES), loss=cal.loss,
                              class_dim=cal.class_dim, dtype=self.dtype, channels_last=self.channels_last,
                              progress=progress)
        return weights, unweighted_note(list(targets), weights)

    def output_pixels(self, cands) -> dict[str, int]:
        obs = self.obs
        return {c.name: obs.pixels(c.name) for c in cands if obs is not None and c.name in obs.outputs}

    def refit(self, replacements, records, cfg: ConvertConfig, pixels, progress=None,
              budget: StepTime | None = None) -> list[LayerFit]:
        cal = cfg.calibration
        return refit_pointwise(self.converted, list(replacements), self.obs.outputs, shape_groups(self.batches),
                               ridge=cal.ridge, steps=cal.steps, lr=cal.lr, batch_size=cal.batch_size, als=cal.als,
                               seed=cfg.seed, progress=progress, dtype=self.dtype,
                               channels_last=self.channels_last, budget=budget)

    def output_models(self, replacements: dict[str, SeparableConv2d]) -> OutputModels:
        params = [p for mod in replacements.values() for p in mod.parameters()]
        return OutputModels(self.converted, params, self.reference, shape_groups(self.batches),
                            flops_per_value=self._flops_per_value(), channels_last=self.channels_last)

    # --- latency

    def latency_target(self, cfg: ConvertConfig) -> LatencyTarget:
        if not (isinstance(self.inputs[0], torch.Tensor) and self.inputs[0].dim() > 0):
            raise SeparifyError("objective='latency' needs a tensor with a batch dimension as the first example input")
        return cfg.target

    @property
    def example_batch(self) -> int:
        return int(self.inputs[0].shape[0])

    def time_models(self, models: Sequence[Any], target: LatencyTarget, timer, *, scale: float = 1.0):
        original = [isinstance(m, str) and m == "original" for m in models]
        models = [self._model(m) for m in models]
        if timer is not None:
            shape = (target.batch_size or self.inputs[0].shape[0], *self.inputs[0].shape[1:])
            return latency.injected_timings(models, shape, target, timer, target.backend)
        try:
            return list(latency.time_model(models, self.inputs, target, scale=scale, either_format=original))
        except Exception as exc:  # noqa: BLE001 - e.g. an export failure for the onnxruntime target
            raise SeparifyError(f"could not time the whole model on {target.describe()}: {first_line(exc)}") from None

    def _model(self, which: Any) -> nn.Module:
        if isinstance(which, str) and which == "original":
            return self.root if self.converted is None else self.reference
        if isinstance(which, str) and which == "converted":
            return self.converted
        return which

    def fingerprint(self, model: Any) -> str:
        if isinstance(model, str) and model == "original":  # the traced original, before it is rewritten
            if self._original_fp is None:
                self._original_fp = fx_pass.fingerprint(self.root if self.converted is None else self.reference)
            return self._original_fp
        return fx_pass.fingerprint(self._model(model))

    @property
    def input_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(t.shape) for t in self.inputs if isinstance(t, torch.Tensor)]

    def runnable(self, model: Any) -> nn.Module:
        return self._model(model)

    def observation(self) -> Any:
        return self.obs

    def use_observation(self, observed: Any) -> None:
        self.obs = observed

    def trial(self, replacements: dict[str, SeparableConv2d]) -> nn.Module:
        if self.gm is not None:
            return self._fold(fx_pass.rewrite_fx(copy.deepcopy(self.gm), replacements, self._folded(replacements)))
        return fx_pass.rewrite_modules(copy.deepcopy(self.work), replacements, self._aliases())

    def _fold(self, gm: fx.GraphModule) -> fx.GraphModule:
        """Every remaining conv → BatchNorm pair folded too (eval mode, ``fold_bn``): the converted model as it
        runs fastest, and as the original is timed (:func:`separify.planning.latency.fold_batchnorms`)."""
        return latency.fold_batchnorms(gm) if self.fold_bn else gm

    # --- apply and finish

    def _folded(self, replacements) -> dict[str, str]:
        """conv → BatchNorm folded into its replacement (a folded BatchNorm whose conv stays dense stays)."""
        return {c: b for c, b in self.folded.items() if c in replacements}

    def _aliases(self) -> dict[str, list[str]]:
        return {s.name: s.aliases for s in self.sites}

    def apply(self, replacements, records: dict[str, LayerRecord]) -> None:
        if self.gm is not None:
            training = self.work.training
            self.converted = self._fold(fx_pass.rewrite_fx(self.gm, replacements, self._folded(replacements)))
            self.converted.training = training
        else:
            self.converted = fx_pass.rewrite_modules(self.work, replacements, self._aliases())

    def write_layout(self, name: str, module: SeparableConv2d) -> None:
        pass  # the module in the model is the one whose layout changed

    def result(self, records, cfg: ConvertConfig, flops_budget) -> ConvertResult:
        model = self.converted
        if cfg.objective == "latency" and cfg.target.runs_channels_last and any(r.converted for r in records):
            # as it was timed: 4-D weights channels-last, so the convs run channels-last on any input (same values)
            model = model.to(memory_format=torch.channels_last)
        return ConvertResult(model, records, self.path, cfg, self.trace_error, self.flops_before,
                             measure.count_flops(model, self.inputs), self.params_before,
                             measure.count_params(model), flops_budget)


def _refusal(site: fx_pass.ConvSite) -> Skip | None:
    reason = why_not_convertible(site.module)
    if reason is not None:
        return Skip(Reason.UNSUPPORTED, reason)
    if site.blocker is not None:
        return Skip(Reason.BLOCKED, site.blocker)
    return None


def _check_fits(model: nn.Module, batch: torch.Tensor) -> None:
    try:
        with torch.no_grad(), measure.frozen_mode(model):
            model(batch[:1])
    except Exception as exc:  # the model's own error says what does not fit
        raise SeparifyError(f"calibration data of shape {tuple(batch.shape[1:])} per sample does not fit the model "
                            f"({type(exc).__name__}: {first_line(exc)})") from None
