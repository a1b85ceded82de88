"""Fine-tuning settings chosen from the model and the data: the distillation temperature and the learning rate.

**Temperature.** Distillation at temperature ``T`` trains the student on ``softmax(t/T)`` of the teacher's logits
``t``. A higher ``T`` shows more of the teacher's ranking of the wrong classes, but over many classes it flattens the
targets into noise: on the OCR benchmark (8,210 classes per time step) the teacher's largest probability averages
0.98 at ``T = 1``, 0.84 at ``T = 2`` and 0.08 at ``T = 4`` (at ``T = 4`` its mean perplexity is 5,000 classes). One
epoch of its fine-tuning from 0.936 word accuracy gave 0.932 at ``T = 2`` and 0.956 at ``T = 1`` (each with the
range test's learning rate, benchmarks/RESULTS.md). On the 10-class embedded model the largest probability is 0.91,
0.78 and 0.51. :func:`choose_temperature` takes the highest
of :data:`TEMPERATURES` at which the tempered teacher still gives its top class at least :data:`TOP_MASS` of the
probability on average, so the soft targets stay close to the teacher's decisions; both benchmark networks get 1.

**Learning rate.** The range test of Smith (2017) (run by :func:`separify.finetune`): from a copy of the student, one
step per batch with the learning rate rising geometrically from :data:`RANGE_LOW` to :data:`RANGE_HIGH`. Where the run
holds batches out (its default check, or ``validation=``), the test scores the student on at least 256 of their samples
after every step, the same ones each time: the distillation loss, and the agreement with the teacher (the fraction of
samples it decides as the teacher does: the same pseudo labels where the run makes them, such as a whole decoded CTC
sequence, else the same largest class at every position). Training hurts (:func:`harmed`) where the loss stays above
:data:`HURT` times its value before the test (:func:`hurts`) or the agreement more than :data:`FALL` below its own
(:func:`falls`), two steps in a row; the test stops there. A student whose best agreement before any harm beats its
start by at least :data:`CLEAR` has much to win (:func:`much_to_win`): its rate is :data:`FAR_LR`, at most
:data:`ABOVE_HARM` times the rate of the first update that hurt (:func:`lr_from_held_out`). Any other gets the lowest
rate (a student that decides nearly as its teacher has little to win from a large one); within :data:`LR_BOUNDS`. The
agreement is what the loss does not show: on the OCR benchmark network the held-out distillation loss was lowest at
similar rates for a student 1.9 points from its teacher on 2,000 words (whole-model FLOPs 0.5) and one 0.1 points from
it (0.25 of the conv FLOPs). Over 256 held-out words at batch 32, in three orders of the data each, the best agreement
beat the start by 0.035 to 0.047 for the first and by 0 to 0.004 for the second (hence :data:`CLEAR`). The test's rates
themselves are no guide to the first student's: its steps compound, each rate starting from the damage of the ones
before; they first hurt at 2.1e-4 to 4.8e-4, and one epoch with warm-up and a cosine decay at 1e-3 took the student from
0.964 to 0.983, 0.976 and 0.973 word accuracy on 2,000 words in the three orders (original 0.983), where the rates an
earlier rule read off the agreement curve (1e-5 to 4.8e-4) gave 0.966 to 0.977 (benchmarks/RESULTS.md). The cap keeps a
fragile student from a rate the test showed to hurt it many times over. The training losses of the test's batches cannot
show either: each is a new batch's, and on the OCR benchmark they vary 4× between batches at rates far too small to
change anything.

Without held-out batches the test reads the training losses and stops where they diverge (:func:`diverged`): a
batch's loss exceeds :data:`DIVERGED` times the lowest smoothed loss so far, or the smoothed loss itself exceeds
:data:`DIVERGED_SMOOTH` times its lowest two steps in a row (a sustained rise, which noisy single batches may not
show in time); the rate (:func:`lr_from_losses`) is a tenth of the one that made the loss diverge, within
:data:`LR_BOUNDS`. The lowest point of a converted model's flat, noisy training loss (the usual "a tenth of the rate
at the minimum") is noise, the divergence is not; but where it comes is chance too: on the OCR benchmark it chose
1e-5 to 1.6e-4 and 3.7e-4 to 8.5e-4 for the two students above in runs that differed in their batches.

The training run then warms up linearly over its first :data:`WARMUP` of the steps and decays on a cosine to 0.

**Hard targets.** Where the teacher is confident (its largest class holds :data:`TOP_MASS` of ``softmax(t)`` on
average), the distillation term mixes the soft KL with the cross-entropy against the teacher's decisions (its
largest class), weight :data:`HARD` (:func:`choose_hard`); an unsure teacher's decisions are no targets. The KL at
``T = 1`` over many classes spends the student's capacity on the teacher's small probabilities: on the OCR benchmark
one epoch at conv FLOPs 0.25 lowered the KL on its first batches from 3.65 to 1.36 while word accuracy fell from
0.976 to 0.928; with half of the term on the teacher's decisions it ended at 0.948 (0.5 of the whole model: 0.956
soft, 0.972 half hard; benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from separify.config import class_axis

__all__ = ["ABOVE_HARM", "CLEAR", "DIVERGED", "DIVERGED_SMOOTH", "FALL", "FAR_LR", "HARD", "HURT", "LR_BOUNDS",
           "RANGE_HIGH", "RANGE_LOW", "TEMPERATURES", "TOP_MASS", "WARMUP", "choose_hard", "choose_temperature",
           "diverged", "falls", "harmed", "hurts", "lr_from_held_out", "lr_from_losses", "much_to_win", "range_lr",
           "range_steps", "schedule"]

TEMPERATURES = (4.0, 2.0, 1.0)  # candidates, highest first (Hinton et al. use 1–20; 4 is the common default)
TOP_MASS = 0.9  # the tempered teacher's mean top-class probability must stay at least this
RANGE_LOW, RANGE_HIGH = 1e-6, 1e-1  # learning rates swept by the range test
DIVERGED = 4.0  # the range test stops where a loss exceeds this times the lowest smoothed loss
DIVERGED_SMOOTH = 2.0  # ... or where the smoothed loss exceeds this times its lowest (from step _SMOOTH_FROM on),
# twice in a row
HURT = 1.05  # the range test's held-out loss above this times its start, twice in a row: the rate hurts
FALL = 0.02  # ... or its held-out agreement with the teacher this far below its start, twice in a row
CLEAR = 0.03  # the range test's best held-out agreement must beat its start by this for a rate above the lowest
FAR_LR = 1e-3  # ... then the rate is this (Adam's customary rate, Kingma & Ba 2015) ...
ABOVE_HARM = 5.0  # ... at most this times the rate of the range test's first update that hurt
LR_BOUNDS = (1e-5, 1e-2)  # the chosen learning rate is clipped to these
WARMUP = 0.05  # fraction of the steps of linear warm-up
HARD = 0.5  # weight of the cross-entropy against the teacher's decisions in the distillation term
_SMOOTH = 0.7  # weight of the past in the range test's exponential moving average of the loss
_SMOOTH_FROM = 3  # the first smoothed losses average fewer than 1 / (1 − _SMOOTH) batches: too noisy for a minimum


def choose_temperature(teacher_logits: Sequence[torch.Tensor], class_dim: int | None) -> float:
    """The highest of :data:`TEMPERATURES` at which ``softmax(t / T)`` over ``class_dim`` (``None``:
    :func:`~separify.config.class_axis`) gives the largest class at
    least :data:`TOP_MASS` on average over every position of ``teacher_logits`` (module docstring); the lowest
    where none does."""
    flat = _positions(teacher_logits, class_dim)
    for temperature in TEMPERATURES:
        if _top_mass(flat, temperature) >= TOP_MASS:
            return temperature
    return TEMPERATURES[-1]


def choose_hard(teacher_logits: Sequence[torch.Tensor], class_dim: int | None) -> float:
    """:data:`HARD` where the teacher is confident, its largest class holding at least :data:`TOP_MASS` of
    ``softmax(t)`` on average over every position of ``teacher_logits`` (module docstring), else 0: the decisions of
    an unsure teacher are no targets."""
    return HARD if _top_mass(_positions(teacher_logits, class_dim), 1.0) >= TOP_MASS else 0.0


def _positions(teacher_logits: Sequence[torch.Tensor], class_dim: int | None) -> torch.Tensor:
    """The logits as ``(positions, classes)``, float64."""
    axes = [class_axis(class_dim, t.dim()) for t in teacher_logits]
    return torch.cat([t.detach().movedim(a, -1).reshape(-1, t.shape[a]).double() for t, a in zip(teacher_logits, axes)])


def _top_mass(flat: torch.Tensor, temperature: float) -> float:
    """The mean largest probability of ``softmax(flat / temperature)`` over the rows of ``flat``."""
    return float(torch.softmax(flat / temperature, -1).amax(-1).mean())


def range_steps(total: int) -> int:
    """Steps of the range test for a run of ``total`` steps: a tenth of it, within 16–64."""
    return min(64, max(16, total // 10))


def range_lr(step: int, steps: int) -> float:
    """The learning rate of step ``step`` (0-based) of a range test of ``steps`` steps."""
    return RANGE_LOW * (RANGE_HIGH / RANGE_LOW) ** (step / max(steps - 1, 1))


def _smoothed(losses: Sequence[float]) -> list[float]:
    """The bias-corrected exponential moving average of ``losses``, up to the first that is not finite."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        if not math.isfinite(loss):
            break
        avg = _SMOOTH * avg + (1 - _SMOOTH) * loss
        out.append(avg / (1 - _SMOOTH ** (i + 1)))
    return out


def _divergence(losses: Sequence[float]) -> int | None:
    """The index of the first loss that is not finite, or exceeds :data:`DIVERGED` times the lowest smoothed loss
    before it, or the second in a row whose smoothed loss exceeds :data:`DIVERGED_SMOOTH` times the lowest smoothed
    loss from step ``_SMOOTH_FROM`` on before it (``None``: none). On a flat loss with 30% noise per batch (lognormal)
    that stops a 64-step test early in about 3% of tests, against 2% for the first rule alone and 7% without the
    second in a row."""
    smooth = _smoothed(losses)
    above = 0  # smoothed losses above the settled minimum in a row
    for i, loss in enumerate(losses):
        if i >= len(smooth):
            return i
        low = min(smooth[:i]) if i > 0 else math.inf
        settled = min(smooth[_SMOOTH_FROM:i]) if i > _SMOOTH_FROM else math.inf
        above = above + 1 if smooth[i] > DIVERGED_SMOOTH * settled else 0
        if loss > DIVERGED * low or above == 2:
            return i
    return None


def diverged(losses: Sequence[float]) -> bool:
    """Whether a range test can stop: its loss diverged (:func:`lr_from_losses`)."""
    return _divergence(losses) is not None


def lr_from_losses(losses: Sequence[float], steps: int) -> float | None:
    """The chosen learning rate (module docstring) from the losses of a range test of ``steps`` steps, the loss of
    step ``i`` measured before its update at :func:`range_lr` ``(i)``; ``None`` if the first loss is not finite."""
    if not losses or not math.isfinite(losses[0]):
        return None
    at = _divergence(losses)
    # loss i shows the updates before it: the rate that made the loss diverge is that of update i − 1 (the last
    # rate of the sweep where it never did)
    lr = range_lr((at if at is not None else len(losses)) - 1, steps) / 10
    return min(max(lr, LR_BOUNDS[0]), LR_BOUNDS[1])


def hurts(held: Sequence[float], start: float) -> int | None:
    """The index of the first update after which the held-out loss ``held[i]`` (measured after update ``i`` of a
    range test) is above :data:`HURT` times its ``start`` (before any update) two updates in a row, or not finite
    (``None``: none is). A single value above it is noise of the few held-out batches, not a trend."""
    for i, loss in enumerate(held):
        if not math.isfinite(loss):
            return i
        if i > 0 and min(loss, held[i - 1]) > HURT * start:
            return i - 1
    return None


def falls(agreement: Sequence[float], start: float) -> int | None:
    """The index of the first update after which the held-out agreement with the teacher ``agreement[i]`` (measured
    after update ``i``) is more than :data:`FALL` below its ``start`` two updates in a row (``None``: none is)."""
    for i in range(1, len(agreement)):
        if max(agreement[i], agreement[i - 1]) < start - FALL:
            return i - 1
    return None


def harmed(held: Sequence[float], start: float, agreement: Sequence[float], start_agreement: float) -> int | None:
    """The first update after which training hurt: the held-out loss rose (:func:`hurts`) or the agreement fell
    (:func:`falls`), whichever came first (``None``: neither)."""
    found = [i for i in (hurts(held, start), falls(agreement, start_agreement)) if i is not None]
    return min(found) if found else None


def much_to_win(agreement: Sequence[float], start: float) -> bool:
    """Whether the best of ``agreement`` (held-out agreement after each update before any harm) is at least
    :data:`CLEAR` above ``start`` (the agreement before any update)."""
    return max(agreement, default=-math.inf) >= start + CLEAR


def lr_from_held_out(held: Sequence[float], start: float, steps: int, agreement: Sequence[float] = (),
                     start_agreement: float = math.nan) -> float:
    """The chosen learning rate (module docstring) from the held-out losses ``held`` of a range test of ``steps``
    steps (``held[i]`` after its update at :func:`range_lr` ``(i)``), the loss ``start`` before them, and the
    held-out agreement with the teacher after each update and before them: where the updates before any harm
    (:func:`harmed`) show :func:`much_to_win`, :data:`FAR_LR`, at most :data:`ABOVE_HARM` times the rate of the first
    update that hurt, else the lowest rate; without agreements, a tenth of the rate of the first update that hurt
    (the last update where none did). Within :data:`LR_BOUNDS`."""
    if agreement:
        at = harmed(held, start, agreement, start_agreement)
        if much_to_win(agreement[: at if at is not None else len(agreement)], start_agreement):
            lr = FAR_LR if at is None else min(FAR_LR, ABOVE_HARM * range_lr(at, steps))
        else:
            lr = 0.0
    else:
        at = hurts(held, start)
        lr = range_lr((at if at is not None else len(held) - 1), steps) / 10
    return min(max(lr, LR_BOUNDS[0]), LR_BOUNDS[1])


def schedule(total: int, warmup: float = WARMUP) -> Callable[[int], float]:
    """The learning-rate factor of step ``s`` of ``total``: linear warm-up over ``warmup · total`` steps (at least
    one), then a cosine from 1 to 0."""
    warm = max(1, round(warmup * total))

    def factor(s: int) -> float:
        return min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))

    return factor
