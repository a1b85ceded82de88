"""The calibration pass over the converted model: fit every replacement to the original outputs in one forward.

:func:`refit_pointwise` runs the converted model once, on all calibration samples as one batch. A pre-hook on each
replacement fires when the forward reaches it; with ``als > 0`` its depthwise conv and last 1×1 conv are fitted
jointly to the kept original output ``y (n, N, H, W)`` (:func:`~separify.calibration.als_dw_pw`), then with
``steps > 0`` all its factors are reconstructed by Adam steps (:func:`~separify.calibration.reconstruct.reconstruct`).
A pre-hook on its last 1×1 conv then refits that conv by least squares (:mod:`~separify.calibration.refit`) on the
input ``z`` it really gets. The weights are replaced before the conv runs, so the forward continues with the
refitted layer: every later layer sees, and corrects, the error left upstream, in one pass instead of one pass per
layer. Where the data is :func:`~separify.calibration.scarce` the ALS and the reconstruction are skipped with a note.
"""

from __future__ import annotations

import dataclasses

from typing import Callable, Iterable

import torch
from torch import nn

from separify.calibration.als import als_dw_pw, als_skip_reason
from separify.calibration.memory import reuse_freed_memory
from separify.calibration.reconstruct import last_input, reconstruct
from separify.calibration.refit import LayerFit, scarce, scarce_note, solve
from separify.core.measure import frozen_mode
from separify.errors import SeparifyError

__all__ = ["refit_pointwise"]


def _layer_plan(mod: nn.Module, y: torch.Tensor, *, als: int, steps: int) -> tuple[int, int, str | None]:
    """``(ALS iterations, reconstruction steps, note)`` for the replacement ``mod`` whose target output is
    ``y (n, N, H, W)``: ALS is skipped where :func:`als_skip_reason` says so, the reconstruction where the
    ``n·H·W`` pixels are scarce for the ``C`` inputs of the last 1×1 conv (Adam on every factor would overfit them);
    the note says what was skipped and why (``None``: nothing)."""
    pixels, inputs = y.shape[0] * y[0, 0].numel(), mod._last().in_channels
    skip = als_skip_reason(mod.conv_dw, pixels=pixels, inputs=inputs) if als > 0 else None
    layer_als = 0 if skip else als
    layer_steps = steps
    if steps > 0 and scarce(pixels, inputs):
        layer_steps = 0
        skip = "; ".join(filter(None, (skip, f"no reconstruction: {scarce_note(pixels, inputs)}")))
    return layer_als, layer_steps, skip


class _RefitPass:
    """The hooks of :func:`refit_pointwise` and what they record, per replacement name."""

    def __init__(self, outputs: dict[str, torch.Tensor], *, ridge: float, steps: int, lr: float, batch_size: int,
                 seed: int, als: int, progress: Callable[[str], None] | None) -> None:
        self.outputs, self.ridge, self.steps, self.lr = outputs, ridge, steps, lr
        self.batch_size, self.seed, self.als, self.progress = batch_size, seed, als, progress
        self.fits: list[LayerFit] = []
        self.entered: set[str] = set()
        self.done: set[str] = set()  # refitted
        self.busy: set[str] = set()  # running inside its own ALS/reconstruction: the refit hook waits
        self.first_error: dict[str, float] = {}  # error before anything, for layers fitted before their refit
        self.notes: dict[str, str] = {}

    def enter_hook(self, name: str):
        """Pre-hook on the replacement: progress, then the ALS and the reconstruction where they run."""
        return lambda mod, args: self._enter(name, mod, args)

    def refit_hook(self, name: str):
        """Pre-hook on its last 1×1 conv: least squares on the input that conv really gets."""
        return lambda mod, args: self._refit(name, mod, args)

    def _enter(self, name: str, mod: nn.Module, args: tuple) -> None:
        if name in self.entered:
            return
        self.entered.add(name)
        if self.progress is not None:
            self.progress(name)
        y = self.outputs[name]  # (n, N, H, W)
        layer_als, layer_steps, skip = _layer_plan(mod, y, als=self.als, steps=self.steps)
        if skip:
            self.notes[name] = skip
        if layer_steps > 0 or layer_als > 0:
            self.busy.add(name)  # the calls below run the replacement; its refit hook must wait for the real one
            try:
                self._prefit(name, mod, args[0], y, layer_als, layer_steps)
            finally:
                self.busy.discard(name)

    def _prefit(self, name: str, mod: nn.Module, x: torch.Tensor, y: torch.Tensor, layer_als: int,
                layer_steps: int) -> None:
        """ALS (or a first refit) and then the reconstruction of one replacement, on its input ``x``."""
        if layer_als > 0:  # starts with its own pointwise step: no refit first; the error before it
            # is measured on the pixels it samples
            h = mod.conv_pw_in(x) if hasattr(mod, "conv_pw_in") else x  # dw input (n, C, H, W)
            self.first_error[name] = als_dw_pw(mod.conv_dw, mod._last(), h, y, iters=layer_als, ridge=self.ridge,
                                               seed=self.seed)[0]
        else:  # the reconstruction starts from the refitted layer
            self.first_error[name] = solve(mod._last(), last_input(mod, x), y, self.ridge, name).error_before
        if layer_steps > 0:
            reconstruct(mod, x, y, steps=layer_steps, lr=self.lr, batch_size=self.batch_size, seed=self.seed)

    def _refit(self, name: str, mod: nn.Module, args: tuple) -> None:
        if name in self.done or name in self.busy:
            return
        self.done.add(name)
        fit = solve(mod, args[0], self.outputs[name], self.ridge, name)
        if name in self.first_error or name in self.notes:
            note = "; ".join(n for n in (self.notes.get(name), fit.note) if n) or None
            fit = dataclasses.replace(fit, error_before=self.first_error.get(name, fit.error_before), note=note)
        self.fits.append(fit)


def refit_pointwise(
    converted: nn.Module,
    layers: Iterable[str],
    outputs: dict[str, torch.Tensor],
    inputs: torch.Tensor,
    *,
    ridge: float = 1e-6,
    steps: int = 0,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    als: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[LayerFit]:
    """Refit the last 1×1 conv of each replacement to the original outputs, in one forward pass (module docstring).

    With ``steps > 0``, each replacement is first *reconstructed*: ``steps`` Adam steps (learning rate ``lr``,
    minibatches of ``batch_size`` samples) on all of its factors against the same targets, on the inputs the
    converted model really gives it, followed by the least-squares refit of its last 1×1 conv. This costs ``steps``
    forward/backward passes of each layer.

    With ``als > 0``, each replacement's depthwise conv and last 1×1 conv are first fitted jointly to the original
    outputs by up to ``als`` iterations of alternating least squares (:func:`~separify.calibration.als_dw_pw`; for
    pw-dw-pw on the output of its first 1×1 conv, which stays fixed), before any reconstruction steps and the
    final refit.

    Args:
        converted: the converted model; its replacements' factors are overwritten.
        layers: names (in ``converted``) of the replacements to refit.
        outputs: per name, the original target's outputs ``(n, N, H, W)`` on ``inputs``
            (:attr:`~separify.calibration.Observation.outputs`).
        inputs: all calibration samples, ``(n, ...)``; run as one batch.
        ridge: relative weight of the pull towards the current factors (times the mean diagonal of ``G``).

    Returns:
        One :class:`LayerFit` per layer, in the order the forward pass reached them (errors before anything and
        after the last step). Raises :class:`SeparifyError` when the forward never reaches a layer.
    """
    state = _RefitPass(outputs, ridge=ridge, steps=steps, lr=lr, batch_size=batch_size, seed=seed, als=als,
                       progress=progress)
    handles = []
    names = list(layers)
    # the refit hooks the last 1×1 conv as a module, which only the default layout calls (the others compute the
    # same function from the same weights), so the replacements run in their default layout meanwhile
    layouts = {name: converted.get_submodule(name).layout for name in names}
    try:
        for name in names:
            replacement = converted.get_submodule(name).set_layout(type(converted.get_submodule(name)).LAYOUTS[0])
            handles.append(replacement.register_forward_pre_hook(state.enter_hook(name)))
            handles.append(replacement._last().register_forward_pre_hook(state.refit_hook(name)))
        with torch.no_grad(), frozen_mode(converted), reuse_freed_memory():
            converted(inputs)
    finally:
        for h in handles:
            h.remove()
        for name, layout in layouts.items():
            converted.get_submodule(name).set_layout(layout)
    missing = [n for n in names if n not in state.done]
    if missing:
        raise SeparifyError(f"the calibration data never reaches layer(s) {', '.join(missing[:3])}")
    return state.fits
