"""Output reconstruction: Adam steps on every replacement's factors against the original model's outputs.

The layer pass (:mod:`~separify.calibration.refit_pass`) fits each replacement to its own original layer's output;
what it leaves adds up through the network, and a layer's error counts the same in directions the rest of the
network ignores as in those it amplifies. This stage fits what matters, the model's output: on the calibration
samples (no labels) it takes ``steps`` Adam steps on the replacements' parameters only (everything else stays as
it is), minimising the relative squared output error

    E(B) = Σ_leaves ‖f(x_B) − g(x_B)‖² / Σ_leaves ‖g(x_B)‖²

over minibatches ``B``, where ``f`` is the converted model, ``g`` the original and the sums run over every
floating-point tensor of the output (a tensor, or tuples, lists and dicts of them): logits, features, boxes. The
learning rate follows a cosine from ``lr`` to 0. The training samples are split once into fixed minibatches (a
seeded shuffle per shape group; a group's last minibatch filled up with other samples of it), visited in a fresh
random order each round, so the original's outputs of a minibatch are computed once, when it is first drawn, and
kept while they take at most :data:`CACHE_BYTES` (a classifier's logits, a recogniser's sequence scores); larger
outputs (dense maps) are computed again at every visit. Images so large that one fills a minibatch (more than
:data:`MINIBATCH_VALUES` values, e.g. 224² RGB) are trained on crops: each minibatch gets one crop window of about
:data:`CROP_VALUES` values, drawn once, the same for both models (where the original runs on a crop of that size;
else whole images), so a step costs a fraction of a whole image. The original's output on a crop is as valid a
target as on the whole image, and the held-out check, on whole images, keeps the steps only where they lowered the
whole images' error.

The steps run under bfloat16 autocast where the calibration precision allows it (:func:`step_dtype`: the rule of
:mod:`~separify.calibration.precision` applied to the stage's own FLOPs), and on images in the channels-last layout
where the model runs in it: the factors, Adam's state and the loss stay float32; the convolutions, recurrent and
linear layers of both models compute in bfloat16. Its rounding (a relative ``2⁻⁹`` per value) is far below the
output error the stage fits (a relative squared error of a few percent). The held-out check runs in the models' own
precision (it must see errors far smaller than bfloat16's rounding of the outputs). Two changes make the stage faster
and compute the same function (:func:`~separify.calibration.precision.frozen_lowered`,
:func:`~separify.calibration.precision.trained_channels_last`): under autocast the layers that do not train hold
their weights in bfloat16 for the steps instead of casting them at every call (the same values), and in a model
that cannot run channels-last the replacements alone run in it, in the steps and the check (CPU; oneDNN may sum in
another order there).

Undone where it did not help on samples it did not train on: one sample in :data:`HOLD_EVERY` is held out (at
most :data:`CHECK_VALUES` input values' worth); ``E`` on them is measured before and after, and the parameters are
restored where the steps did not lower it (or gave a non-finite value). With fewer than :data:`MIN_HELD` held-out
samples the stage is skipped with a note; so is a model the steps cannot train (its backward raises: e.g. an output
detached from the factors), with the error in the note.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from separify.calibration.precision import (fast_layout, forward_precision, frozen_lowered, pass_dtype,
                                            trained_channels_last)
from separify.calibration.reconstruct import _rows
from separify.errors import first_line

__all__ = ["CACHE_BYTES", "CHECK_VALUES", "CROP_VALUES", "HOLD_EVERY", "MINIBATCH_VALUES", "MIN_HELD", "OutputFit",
           "fit_output", "output_error", "step_dtype", "too_few"]

#: one sample in this many is held out of the steps, to check them on
HOLD_EVERY = 8

#: fewer held-out samples than this: the stage is skipped (too few to tell a better state from a worse one)
MIN_HELD = 4

#: input values of held-out samples at most (and at least :data:`MIN_HELD` samples): 16 RGB images of 224², about
#: 200 OCR words of 64×192. The check costs three forwards of them in full precision (on ResNet-50 at 224², 4–5 s
#: for 32 images on 2 cores); a paired comparison of the same samples before and after needs no more
CHECK_VALUES = 16 * 3 * 224 * 224

#: input values per minibatch above which it takes fewer than ``batch_size`` samples: 8 OCR words of 64×192, one
#: 224² RGB image (large inputs: their pixels already average the gradient, and each step costs a whole model)
MINIBATCH_VALUES = 131_072

#: values of the crop a step takes of one sample larger than :data:`MINIBATCH_VALUES` (4-D images; both sides scaled
#: alike): a 128² crop of a 224² RGB image, which costs ResNet-50's steps about a third of the whole image's FLOPs
CROP_VALUES = 3 * 128 * 128

#: bytes of the original's outputs on the training minibatches kept between visits (beyond it: computed again)
CACHE_BYTES = 2**28

#: the note of a stage the time budget left no time for
SPENT = "no output reconstruction: the time budget (calib_seconds) was spent before it"


@dataclass(frozen=True)
class OutputFit:
    """What :func:`fit_output` did: ``steps`` taken of the ``planned`` (fewer where the time budget ended them;
    0: as many as taken), the relative output error ``E`` on the ``held`` held-out
    samples before and after (``after == before`` where the steps were undone), whether the new state was ``kept``,
    why nothing was done (``note``), the number format the steps computed in (``precision``: ``"float32"`` or
    ``"bfloat16"``), and the wall-clock ``seconds`` of the stage (set by the pipeline)."""

    steps: int
    held: int
    error_before: float | None = None
    error_after: float | None = None
    kept: bool = False
    note: str | None = None
    seconds: float | None = None
    precision: str = "float32"
    planned: int = 0


def fit_output(student: nn.Module, params: Sequence[nn.Parameter], teacher: Callable[[torch.Tensor], Any],
               groups: Sequence[torch.Tensor], *, steps: int, lr: float, batch_size: int, seed: int,
               fixed_batch: int | None = None, dtype: torch.dtype | None = None, channels_last: bool = False,
               on_step: Callable[[int, int], None] | None = None, until: float | None = None) -> OutputFit:
    """Fit ``student``'s output to ``teacher``'s on ``groups`` (one tensor ``(n_g, ...)`` per sample shape) by
    ``steps`` Adam steps on ``params`` (module docstring); fixed minibatches of ``batch_size`` samples from one
    group (fewer where they would hold more than :data:`MINIBATCH_VALUES` input values, at least one), cut and
    visited in an order drawn by a generator seeded by ``seed``. Models that only run at a ``fixed_batch`` size get
    minibatches of that size and see the held-out samples in batches of it (a remainder is left out of the check).
    The steps' forward passes run under autocast to ``dtype`` (``None``: the models' own precision;
    :func:`step_dtype` chooses it); they and the held-out check get their inputs channels-last where
    ``channels_last`` (else the trained parts alone run in that layout, module docstring). Both models run as they
    are (the caller sets eval mode); ``requires_grad`` flags are restored and gradients cleared on exit.
    ``on_step(done, steps)`` after every step. ``until``: a :func:`time.perf_counter` deadline
    (:mod:`~separify.calibration.budget`) for the whole stage: the steps stop in time for the closing check (as long
    as the opening one), the cosine following the time spent where that comes first (:func:`_steps`)."""
    train, held = _split(groups, fixed_batch)
    if fixed_batch is not None:
        held = [h[i:i + fixed_batch] for h in held for i in range(0, len(h) - fixed_batch + 1, fixed_batch)]
    n_held = sum(len(h) for h in held)
    held = [fast_layout(h) for h in held] if channels_last else held
    note = too_few(sum(len(g) for g in groups), n_held)
    if note or not train:
        return OutputFit(0, n_held, note=note)
    if until is not None and time.perf_counter() >= until:
        return OutputFit(0, n_held, note=SPENT, planned=steps)
    chosen = {id(p) for p in params}
    with contextlib.nullcontext() if channels_last else trained_channels_last(student, chosen):
        with torch.no_grad():
            targets = [teacher(h) for h in held]
        check = time.perf_counter()
        before = output_error(student, held, targets)
        end = None if until is None else until - (time.perf_counter() - check)
        if end is not None and time.perf_counter() >= end:
            return OutputFit(0, n_held, before, before, note=SPENT, planned=steps)
        saved = [p.detach().clone() for p in params]
        flags = [(p, p.requires_grad) for p in student.parameters()]
        try:
            for p, _ in flags:
                p.requires_grad_(id(p) in chosen)
            models = [m for m in (student, teacher) if isinstance(m, nn.Module)]
            with frozen_lowered(dtype, models, chosen):
                taken = _steps(student, params, teacher, train, steps=steps, lr=lr, batch_size=batch_size,
                               seed=seed, fixed_batch=fixed_batch, dtype=dtype, channels_last=channels_last,
                               on_step=on_step, end=end)
            after = output_error(student, held, targets)
        except RuntimeError as exc:  # autograd's errors: nothing to train through
            _restore(params, saved)
            return OutputFit(0, n_held, before, before, note=f"no output reconstruction: the steps failed "
                                                             f"({type(exc).__name__}: {first_line(exc)})")
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
                p.grad = None
    kept = after < before  # False for NaN
    if not kept:
        _restore(params, saved)
    precision = "float32" if dtype is None else str(dtype).removeprefix("torch.")
    return OutputFit(taken, n_held, before, after if kept else before, kept, precision=precision, planned=steps)


def too_few(samples: int, held: int | None = None) -> str | None:
    """Why the stage is skipped for ``samples`` calibration samples of which ``held`` are held out (``None``: the
    ``samples // HOLD_EVERY`` that :func:`fit_output` holds out of any samples, before a fixed batch drops some):
    fewer than :data:`MIN_HELD` held out; ``None`` where enough are."""
    held = samples // HOLD_EVERY if held is None else held
    if held >= MIN_HELD:
        return None
    return f"no output reconstruction: {samples} calibration samples hold out fewer than {MIN_HELD} to check it on"


def step_dtype(precision: str, student: nn.Module, groups: Sequence[torch.Tensor], *, steps: int, batch_size: int,
               fixed_batch: int | None, flops_per_value: float) -> torch.dtype | None:
    """The autocast dtype of :func:`fit_output`'s steps: :func:`~separify.calibration.precision.pass_dtype` of
    the calibration ``precision`` for the stage's FLOPs, ``4 · steps · v · flops_per_value`` (a step: the forward
    and the backward of the converted model, about three forwards, and a forward of the original, on a minibatch
    of ``v`` input values, the largest group's, or one crop of it where its samples are large enough for crops,
    :func:`_crop_size`; a model that turns out to take whole samples only then costs more than estimated;
    ``flops_per_value``: the original's forward FLOPs per input value, 0 where unknown)."""
    if not groups:
        return None
    largest = max((g[0] for g in groups), key=torch.numel)
    crop = None if fixed_batch else _crop_size(largest)
    if crop is None:
        values = largest.numel() * _minibatch(largest.numel(), batch_size, fixed_batch)
    else:  # one crop per step
        values = largest.shape[0] * math.prod(crop)
    return pass_dtype(precision, student, groups[0].device, 4 * steps * values * flops_per_value)


def _minibatch(sample_values: int, batch_size: int, fixed_batch: int | None) -> int:
    """Samples per step for samples of ``sample_values`` input values: ``fixed_batch`` where the models fix it, else
    ``batch_size``, fewer where that many would hold more than :data:`MINIBATCH_VALUES`, at least one."""
    return fixed_batch or max(1, min(batch_size, MINIBATCH_VALUES // sample_values))


def _restore(params: Sequence[nn.Parameter], saved: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)


def _split(groups: Sequence[torch.Tensor],
           fixed_batch: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every :data:`HOLD_EVERY`-th sample (counted through the groups in order) held out, the rest to train on;
    per group, empty parts dropped. Samples of a shape too rare to be held out still train. At most
    :data:`CHECK_VALUES` input values' worth are held out (counted at the largest sample; at least :data:`MIN_HELD`
    samples, a whole number of ``fixed_batch``\ es): the every-:data:`HOLD_EVERY`-th samples past them train too."""
    values = max((g[0].numel() for g in groups if len(g)), default=1)
    limit = max(MIN_HELD, CHECK_VALUES // max(1, values))
    if fixed_batch:
        limit = -(-limit // fixed_batch) * fixed_batch
    train, held, seen = [], [], 0
    for g in groups:
        mask = (torch.arange(seen, seen + len(g)) % HOLD_EVERY) == HOLD_EVERY - 1
        seen += len(g)
        mask[mask.nonzero().flatten()[max(0, limit):]] = False  # past the limit: train
        limit -= int(mask.sum())
        for part, keep in ((train, ~mask), (held, mask)):
            if keep.any():
                part.append(g[keep.to(g.device)] if not keep.all() else g)
    return train, held


def _steps(student: nn.Module, params: Sequence[nn.Parameter], teacher: Callable[[torch.Tensor], Any],
           train: Sequence[torch.Tensor], *, steps: int, lr: float, batch_size: int, seed: int,
           fixed_batch: int | None, dtype: torch.dtype | None, channels_last: bool,
           on_step: Callable[[int, int], None] | None, end: float | None = None) -> int:
    """The Adam steps of :func:`fit_output` over the fixed minibatches of :func:`_partition` in a fresh random order
    each round; returns how many ran. The learning rate follows a cosine from ``lr`` to 0 over the progress, the
    steps' fraction of ``steps`` or, where a deadline ``end`` (:func:`time.perf_counter`) comes first, the time's
    fraction until it: the steps stop where the progress reaches 1."""
    gen = torch.Generator().manual_seed(seed)
    # the fused kernel: one pass over all the factors per step instead of several (CPU and CUDA have it)
    opt = torch.optim.Adam(params, lr=lr, fused=all(p.device.type in ("cpu", "cuda") for p in params))
    batches = _partition(train, batch_size, fixed_batch, gen)
    crops = _crops(train, fixed_batch, teacher, dtype)
    # one crop window per fixed minibatch: both models see the same, and the original's output stays cacheable
    windows = [_window(train[g], crops[g], gen) for g, _ in batches]
    targets: dict[int, Any] = {}  # minibatch index -> the original's output on it, while within CACHE_BYTES
    kept = 0
    order: list[int] = []
    start, step = time.perf_counter(), 0
    with torch.enable_grad():
        for step in range(steps):
            order = order or torch.randperm(len(batches), generator=gen).tolist()
            b = order.pop()
            g, idx = batches[b]
            x = _rows(_cropped(train[g], windows[b]), idx)
            x = fast_layout(x) if channels_last else x
            with forward_precision(dtype, x.device):
                target = targets.get(b)
                if target is None:
                    with torch.no_grad():
                        target = teacher(x)
                    size = sum(t.numel() * t.element_size() for t in _leaves(target))
                    if kept + size <= CACHE_BYTES:
                        targets[b], kept = target, kept + size
                out = student(x)
            loss = _relative_error(out, target)  # in float32 (_squares)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            now = time.perf_counter()
            done = max((step + 1) / steps, 0.0 if end is None else (now - start) / max(end - start, 1e-9))
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
            if on_step is not None:
                on_step(step + 1, steps)
            if done >= 1:
                break
    return min(step + 1, steps)


def _partition(train: Sequence[torch.Tensor], batch_size: int, fixed_batch: int | None,
               gen: torch.Generator) -> list[tuple[int, list[int]]]:
    """The fixed minibatches ``(group, sample indices)`` of the steps: per group, its samples shuffled by ``gen``
    and cut into minibatches of :func:`_minibatch` samples, the last one filled up with samples drawn from the rest
    of the group (a group smaller than a minibatch repeats samples), so that every minibatch has the same size."""
    batches = []
    for g, x in enumerate(train):
        n = _minibatch(x[0].numel(), batch_size, fixed_batch)
        perm = torch.randperm(len(x), generator=gen).tolist()
        for i in range(0, len(perm), n):
            idx = perm[i:i + n]
            fill = torch.randint(0, len(x), (n - len(idx),), generator=gen).tolist()
            batches.append((g, idx + fill))
    return batches


def _crop_size(sample: torch.Tensor) -> tuple[int, int] | None:
    """``(h, w)`` of the crops the steps train on for a sample ``(C, H, W)`` of more than :data:`MINIBATCH_VALUES`
    values: both sides scaled by ``√(CROP_VALUES / (C·H·W))``; ``None`` (whole samples) for any other sample."""
    if sample.dim() != 3 or sample.numel() <= MINIBATCH_VALUES:
        return None
    scale = math.sqrt(CROP_VALUES / sample.numel())
    return max(1, round(sample.shape[1] * scale)), max(1, round(sample.shape[2] * scale))


def _crops(train: Sequence[torch.Tensor], fixed_batch: int | None, teacher: Callable[[torch.Tensor], Any],
           dtype: torch.dtype | None) -> list[tuple[int, int] | None]:
    """Per group, the crop size of its minibatches (:func:`_crop_size`) where the original runs on a crop of it, tried
    once; ``None`` (whole samples) where it does not (a model of a fixed input size) or runs at a ``fixed_batch``."""
    sizes: list[tuple[int, int] | None] = []
    for x in train:
        size = None if fixed_batch else _crop_size(x[0])
        if size is not None:
            try:
                with torch.no_grad(), forward_precision(dtype, x.device):
                    teacher(x[:1, :, :size[0], :size[1]])
            except Exception:  # noqa: BLE001 - any failure means: this model takes whole samples only
                size = None
        sizes.append(size)
    return sizes


def _window(x: torch.Tensor, size: tuple[int, int] | None,
            gen: torch.Generator) -> tuple[int, int, int, int] | None:
    """``(top, left, h, w)``: a crop of ``size`` at a place drawn by ``gen`` in the samples of ``x (n, C, H, W)``."""
    if size is None:
        return None
    top = int(torch.randint(0, x.shape[2] - size[0] + 1, (1,), generator=gen))
    left = int(torch.randint(0, x.shape[3] - size[1] + 1, (1,), generator=gen))
    return top, left, *size


def _cropped(x: torch.Tensor, window: tuple[int, int, int, int] | None) -> torch.Tensor:
    """The view of ``window`` (:func:`_window`) in every sample of ``x``; ``x`` for ``None``."""
    if window is None:
        return x
    top, left, h, w = window
    return x[:, :, top:top + h, left:left + w]


def output_error(student: nn.Module, xs: Sequence[torch.Tensor], targets: Sequence[Any]) -> float:
    """``E`` (module docstring) of ``student`` over the batches ``xs`` against the outputs ``targets``."""
    err = ref = 0.0
    with torch.no_grad():
        for x, t in zip(xs, targets):
            e, r = _squares(student(x), t, torch.float64)
            err, ref = err + float(e), ref + float(r)
    return err / ref if ref > 0 else err


def _relative_error(out: Any, target: Any) -> torch.Tensor:
    err, ref = _squares(out, target, torch.float32)
    return err / ref.clamp_min(1e-30)


def _squares(out: Any, target: Any, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ ‖out − target‖², Σ ‖target‖²)`` over the output's floating-point tensors, summed in ``dtype``."""
    pairs = [(a.to(dtype), b.to(a.device, dtype)) for a, b in zip(_leaves(out), _leaves(target), strict=True)]
    return (sum((a - b).square().sum() for a, b in pairs), sum(b.square().sum() for _, b in pairs))


def _leaves(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (a tensor, or tuples, lists and dicts of them), in order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        return [t for k in out for t in _leaves(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _leaves(o)]
    return []
