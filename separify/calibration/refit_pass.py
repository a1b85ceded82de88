"""The calibration pass over the converted model: fit every replacement to the original outputs in one forward.

:func:`refit_pointwise` runs the converted model once over all calibration samples: one batch per sample shape, the
batches side by side in lockstep (:mod:`~separify.calibration.lockstep`). A pre-hook on each replacement fires when
the forward reaches it; with ``als > 0`` its depthwise conv and last 1×1 conv are fitted jointly to the kept
original output ``y (n, N, H, W)`` (:func:`~separify.calibration.als_fit`, statistics over every shape group), then
with ``steps > 0`` all its factors are reconstructed by Adam steps
(:func:`~separify.calibration.reconstruct.reconstruct`). A pre-hook on its last 1×1 conv then refits that conv by
least squares (:mod:`~separify.calibration.refit`) on the input ``z`` it really gets. The weights are replaced
before the conv runs, so the forward continues with the refitted layer: every later layer sees, and corrects, the
error left upstream, in one pass instead of one pass per layer. Where the data is
:func:`~separify.calibration.scarce` the ALS and the reconstruction are skipped with a note.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from separify.calibration.als import PatchStatistics, als_fit, als_skip_reason
from separify.calibration.budget import StepTime, cut_note
from separify.calibration.lockstep import Finished, Lockstep, run_lockstep
from separify.calibration.memory import reuse_freed_memory
from separify.calibration.precision import fast_layout, forward_precision, full_precision, widened
from separify.calibration.reconstruct import last_input, reconstruct
from separify.calibration.refit import LayerFit, scarce, scarce_note, solve
from separify.config import RECONSTRUCTION_STEPS
from separify.core.measure import frozen_mode
from separify.errors import SeparifyError

__all__ = ["layer_plan", "refit_pointwise"]


def _exact(fit: Callable, name: str, mod: nn.Module, parts: dict[int, torch.Tensor], autocast: bool) -> None:
    """``fit(name, mod, xs)`` on the gathered inputs ``parts`` (one per group) with autocast off; where the pass runs
    under ``autocast``, its 16-bit activations widened to float32 (a 16-bit model's own inputs stay as they are)."""
    xs = [widened(x) if autocast else x for x in parts.values()]
    with full_precision(xs[0].device):
        fit(name, mod, xs)


def _pixels(ys: Sequence[torch.Tensor]) -> int:
    return sum(y.shape[0] * y[0, 0].numel() for y in ys)


def layer_plan(mod: nn.Module, pixels: int, *, als: int, steps: int | None) -> tuple[int, int, str | None]:
    """``(ALS iterations, reconstruction steps, note)`` for the replacement ``mod`` whose target outputs have
    ``pixels`` pixels over all calibration samples, on both backends. ``steps=None`` is
    :data:`~separify.config.RECONSTRUCTION_STEPS` where the ALS leaves a factor unfitted (pw-dw-pw's first 1×1
    conv), else 0. ALS is skipped where :func:`als_skip_reason` says so, the reconstruction where the pixels are
    scarce for the ``C`` inputs of the last 1×1 conv (Adam on every factor would overfit them); the note says what
    was skipped and why (``None``: nothing)."""
    inputs = mod._last().in_channels
    skip = als_skip_reason(mod.conv_dw, pixels=pixels, inputs=inputs) if als > 0 else None
    layer_als = 0 if skip else als
    layer_steps = steps if steps is not None else (RECONSTRUCTION_STEPS if hasattr(mod, "conv_pw_in") else 0)
    if layer_steps > 0 and scarce(pixels, inputs):
        layer_steps = 0
        skip = "; ".join(filter(None, (skip, f"no reconstruction: {scarce_note(pixels, inputs)}")))
    return layer_als, layer_steps, skip


class _RefitPass:
    """The hooks of :func:`refit_pointwise` and what they record, per replacement name."""

    def __init__(self, outputs: dict[str, list[torch.Tensor]], layers: int, step: Lockstep, *, ridge: float,
                 steps: int | None, lr: float, batch_size: int, seed: int, als: int,
                 progress: Callable[[str], None] | None, autocast: bool = False,
                 budget: StepTime | None = None) -> None:
        # steps=None: the default per layer (layer_plan); autocast: the forward runs under it
        self.outputs, self.step, self.ridge, self.steps, self.lr = outputs, step, ridge, steps, lr
        self.autocast = autocast
        self.batch_size, self.seed, self.als, self.progress = batch_size, seed, als, progress
        self.fits: list[LayerFit] = []
        self.layers = layers  # how many replacements the pass fits
        self.entered: set[tuple[int, str]] = set()  # (group, name): first call of the module in each pass
        self.refitted: set[tuple[int, str]] = set()
        self.done: set[str] = set()  # refitted
        self.busy: set[str] = set()  # running inside its own ALS/reconstruction: its hooks wait
        self.first_error: dict[str, float] = {}  # error before anything, for layers fitted before their refit
        self.notes: dict[str, str] = {}
        self.budget, self.started = budget or StepTime(), 0  # the reconstruction's steps' time; layers reached

    def enter_hook(self, name: str):
        """Pre-hook on the replacement: progress, then the ALS and the reconstruction where they run."""
        return lambda mod, args: self._enter(name, mod, args)

    def refit_hook(self, name: str):
        """Pre-hook on its last 1×1 conv: least squares on the input that conv really gets."""
        return lambda mod, args: self._refit(name, mod, args)

    def _first(self, seen: set, name: str) -> bool:
        key = (self.step.group, name)
        if name in self.busy or key in seen:
            return False
        seen.add(key)
        return True

    def _enter(self, name: str, mod: nn.Module, args: tuple) -> None:
        if self._first(self.entered, name):
            self.step.gather(("enter", name), args[0], lambda xs: _exact(self._prefit, name, mod, xs, self.autocast))

    def _prefit(self, name: str, mod: nn.Module, xs: list[torch.Tensor]) -> None:
        """ALS (or a first refit) and then the reconstruction of one replacement, on its inputs ``xs`` (one per
        shape group), once every pass has reached it."""
        if self.progress is not None:
            self.progress(name)
        self.started += 1
        ys = self.outputs[name]
        layer_als, layer_steps, skip = layer_plan(mod, _pixels(ys), als=self.als, steps=self.steps)
        if skip:
            self.notes[name] = skip
        if layer_steps == 0 and layer_als == 0:
            return
        self.busy.add(name)  # the calls below run the replacement; its own hooks must wait for the real call
        try:
            if layer_als > 0:  # starts with its own pointwise step: the error before it, on the pixels it samples
                stats = PatchStatistics(mod.conv_dw, ys[0].shape[1], _pixels(ys), seed=self.seed,
                                        device=xs[0].device)
                for x, y in zip(xs, ys):
                    stats.add(mod.conv_pw_in(x) if hasattr(mod, "conv_pw_in") else x, y.to(x.device))  # dw input
                self.first_error[name] = als_fit(mod.conv_dw, mod._last(), stats, iters=layer_als,
                                                 ridge=self.ridge)[0]
            else:  # the reconstruction starts from the refitted layer
                zs = [last_input(mod, x) for x in xs]
                self.first_error[name] = solve(mod._last(), zs, ys, self.ridge, name).error_before
            if layer_steps > 0:
                with self.budget.part(self.layers - self.started + 1) as until:
                    taken = reconstruct(mod, xs, ys, steps=layer_steps, lr=self.lr, batch_size=self.batch_size,
                                        seed=self.seed, until=until)
                cut = cut_note("layer-wise reconstruction", taken, layer_steps)
                if cut:
                    self.notes[name] = "; ".join(filter(None, (self.notes.get(name), cut)))
        finally:
            self.busy.discard(name)

    def _refit(self, name: str, mod: nn.Module, args: tuple) -> None:
        if self._first(self.refitted, name):
            self.step.gather(("refit", name), args[0], lambda zs: _exact(self._record, name, mod, zs, self.autocast))
            if len(self.done) == self.layers:  # the rest of the forward fits nothing
                raise Finished

    def _record(self, name: str, mod: nn.Module, zs: list[torch.Tensor]) -> None:
        self.done.add(name)
        fit = solve(mod, zs, self.outputs[name], self.ridge, name)
        if name in self.first_error or name in self.notes:
            note = "; ".join(n for n in (self.notes.get(name), fit.note) if n) or None
            fit = dataclasses.replace(fit, error_before=self.first_error.get(name, fit.error_before), note=note)
        self.fits.append(fit)


def refit_pointwise(
    converted: nn.Module,
    layers: Iterable[str],
    outputs: dict[str, list[torch.Tensor] | torch.Tensor],
    inputs: list[torch.Tensor] | torch.Tensor,
    *,
    ridge: float = 1e-6,
    steps: int | None = 0,
    lr: float = 3e-3,
    batch_size: int = 8,
    seed: int = 0,
    als: int = 0,
    progress: Callable[[str], None] | None = None,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    budget: StepTime | None = None,
) -> list[LayerFit]:
    """Refit the last 1×1 conv of each replacement to the original outputs, in one forward pass (module docstring).

    With ``steps > 0`` (``None``: on pw-dw-pw replacements only, :func:`layer_plan`), each replacement is first
    *reconstructed*: ``steps`` Adam steps (learning rate ``lr``, minibatches of ``batch_size`` samples) on all of
    its factors against the same targets, on the inputs the converted model really gives it, followed by the
    least-squares refit of its last 1×1 conv: ``steps`` forward/backward passes of each layer.

    With ``als > 0``, each replacement's depthwise conv and last 1×1 conv are first fitted jointly to the original
    outputs by up to ``als`` iterations of alternating least squares (:func:`~separify.calibration.als_fit`; for
    pw-dw-pw on the output of its first 1×1 conv, which stays fixed), before any reconstruction steps and the
    final refit.

    Args:
        converted: the converted model; its replacements' factors are overwritten.
        layers: names (in ``converted``) of the replacements to refit.
        outputs: per name, the original target's outputs on ``inputs``, one tensor ``(n_g, N, H_g, W_g)`` per
            group of ``inputs`` (:attr:`~separify.calibration.Observation.outputs`); a tensor for one group.
        inputs: the calibration samples, one tensor ``(n_g, ...)`` per sample shape
            (:func:`~separify.calibration.data.shape_groups`); each group runs as one batch.
        ridge: relative weight of the pull towards the current factors (times the mean diagonal of ``G``).
        dtype: the forward runs under autocast to it (:mod:`~separify.calibration.precision`; ``None``: the model's
            precision); the fits and the reconstruction's steps in float32 or float64.
        channels_last: the samples run in the channels-last layout on a CPU
            (:func:`~separify.calibration.precision.runs_channels_last` says whether the model takes it).
        budget: the reconstruction's steps' time (:mod:`~separify.calibration.budget`), shared out over the layers.

    Returns:
        One :class:`LayerFit` per layer, in the order the forward pass reached them (errors before anything and
        after the last step). Raises :class:`SeparifyError` when the forward never reaches a layer.
    """
    groups = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    outputs = {n: [y] if isinstance(y, torch.Tensor) else list(y) for n, y in outputs.items()}
    names = list(layers)
    step = Lockstep(len(groups))
    state = _RefitPass(outputs, len(set(names)), step, ridge=ridge, steps=steps, lr=lr, batch_size=batch_size,
                       seed=seed, als=als, progress=progress, autocast=dtype is not None, budget=budget)
    device = groups[0].device

    def forward(x: torch.Tensor) -> None:  # in each group's thread: autocast is thread-local
        with forward_precision(dtype, device):
            converted(x)

    handles = []
    # the refit hooks the last 1×1 conv as a module, which only the default layout calls (the others compute the
    # same function from the same weights), so the replacements run in their default layout meanwhile
    layouts = {name: converted.get_submodule(name).layout for name in names}
    try:
        for name in names:
            replacement = converted.get_submodule(name).set_layout(type(converted.get_submodule(name)).LAYOUTS[0])
            handles.append(replacement.register_forward_pre_hook(state.enter_hook(name)))
            handles.append(replacement._last().register_forward_pre_hook(state.refit_hook(name)))
        with frozen_mode(converted), reuse_freed_memory():
            run_lockstep(step, forward, [fast_layout(g) if channels_last else g for g in groups])
    finally:
        for h in handles:
            h.remove()
        for name, layout in layouts.items():
            converted.get_submodule(name).set_layout(layout)
    missing = [n for n in names if n not in state.done]
    if missing:
        raise SeparifyError(f"the calibration data never reaches layer(s) {', '.join(missing[:3])}")
    return state.fits
