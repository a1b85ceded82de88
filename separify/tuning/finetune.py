"""Distillation fine-tuning: train the converted model (student) to match the original (teacher).

Loss (Hinton et al. 2015): ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` between teacher logits ``t`` and student logits
``s`` at temperature ``T``, mixed with cross-entropy on labels when the data carries them:
``α · KD + (1 − α) · CE`` (or another label loss, ``label_loss=``, e.g. CTC for a sequence model), by default
``α = 0.5``: half on the labels, as in DeiT's distillation (Touvron et al. 2021). On the OCR benchmark at
whole-model FLOPs 0.5 one epoch with its strings as CTC labels gave 0.990 word accuracy at ``α = 0.5`` (0.940
without labels; the original 0.990; benchmarks/RESULTS.md): labels keep the student from copying the teacher's
mistakes. Batches without labels can take labels from the teacher's outputs, ``pseudo_labels(teacher_logits)``
(sequence-level distillation; for CTC models :mod:`~separify.tuning.ctc`: 0.972 on the same network and target,
against 0.940). With
``features`` (pairs of converted layer → original layer, e.g. :meth:`separify.ConvertResult.feature_pairs`) and
``feature_weight > 0``, a feature term
``feature_weight · mean_l ‖s_l − t_l‖² / ‖t_l‖²`` pulls each converted layer's output ``s_l`` towards the original
layer's output ``t_l`` on the same batch (relative, so layers of any scale count alike). :func:`distillation_loss`
and :func:`feature_loss` are the same losses for use in your own training loop.

The distillation term puts weight ``hard`` on the teacher's decisions, ``CE(s, argmax t)``, where the teacher is
confident. The run ends with the better-scoring of the states it checks (``keep_best``), so that it never leaves
the student worse than it came in by that score: with ``evaluate(student)`` (a metric on held-out data, higher is
better, called in eval mode without gradients) the best of the start and :data:`CHECKS` states during the run;
without it, the start or the end, on ``validation`` or else on the first batches of the data (at least
:data:`HELD_SAMPLES` samples and :data:`VALIDATION_BATCHES` batches), which training then skips where the data has
enough (:func:`_held_out`), so that the check does not score the student on batches it was trained on (a
reshuffling ``DataLoader`` shows them to later epochs). Where those batches carry labels the run uses, the score
is the loss on the labels (lower is better); else it is the fraction of samples on which the student's largest
class is the teacher's at every position (a noisy proxy of accuracy, so it is asked only that, and one that counts
every sample on which the student corrects the teacher against it).

:func:`finetune` runs AdamW with a linear warm-up and a cosine decay of the learning rate. Left unset, the learning
rate comes from a short range test on a copy of the student, and the temperature from the teacher's outputs on the
first batches (:mod:`~separify.tuning.defaults`). BatchNorm layers are kept in eval mode (frozen
statistics) unless ``train_bn=True``: the converted model inherits well-calibrated statistics, and small fine-tuning
batches would only add noise. Checkpoints (atomic, every ``checkpoint_every`` steps) hold the student, the optimizer,
the step and the position in the data; a call with the same arguments resumes from the checkpoint and, with the same
seed and data, reproduces the uninterrupted run. Under ``torchrun`` (``torch.distributed`` initialised), the student
is wrapped in ``DistributedDataParallel`` and each process takes its share of every batch, so the same script and
the same data work unchanged; rank 0 writes the checkpoints. A non-finite loss stops training and restores the last
good state.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from separify.config import class_axis
from separify.errors import SeparifyError
from separify.core.measure import frozen_mode
from separify.core.progress import progress_bar
from separify.io.files import atomic_write
from separify.tuning import defaults

__all__ = ["distillation_loss", "feature_loss", "finetune", "FinetuneResult"]

CHECKPOINT_FORMAT = "separify-finetune-1"
VALIDATION_BATCHES = 4  # the first batches of the data hold at least this many batches and HELD_SAMPLES samples:
HELD_SAMPLES = 256  # the teacher's outputs on them choose the temperature and the hard weight, and by default the
# range test and the check score the student on them (held out of training): a fixed number of samples, so that
# the scores are not noisier at a smaller batch size
HOLD_MIN_FACTOR = 5  # data of fewer than this many times the first batches is too small to hold them out
CHECKS = 10  # checks of evaluate= in a run, besides the one at the start (the default check: the start and the end)

LabelLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (student logits, labels) → scalar loss


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
                      *, temperature: float = 4.0, alpha: float = 0.5, class_dim: int | None = None,
                      label_loss: LabelLoss | None = None, hard: float = 0.0) -> torch.Tensor:
    """``α·KD + (1 − α)·CE(student, labels)`` (just ``KD`` without labels), with the distillation term
    ``KD = (1 − hard)·T²·KL(teacher ‖ student) + hard·CE(student, argmax teacher)``: soft targets at temperature
    ``T`` mixed with the teacher's decisions as hard labels (Touvron et al. 2021).

    Logits are ``(B, C)``, or any shape with the classes along ``class_dim`` (``None``:
    :func:`~separify.config.class_axis`, which takes the last axis of ``(B, T, C)`` sequence logits and axis 1 of
    ``(B, C, H, W)`` maps; the KL is then summed over the other positions and averaged over ``B``);
    labels ``(B,)`` integer classes, for ``(B, C)`` logits only. ``label_loss(student_logits, labels)`` replaces the
    cross-entropy for other kinds of labels (e.g. CTC targets of a sequence model); the labels are then whatever it
    takes.
    """
    t, class_dim = temperature, class_axis(class_dim, student_logits.dim())
    kd = F.kl_div(F.log_softmax(student_logits / t, dim=class_dim), F.log_softmax(teacher_logits / t, dim=class_dim),
                  reduction="batchmean", log_target=True) * (t * t)
    if hard > 0:
        # cross-entropy against the teacher's decisions, summed over positions and averaged over B like the KL
        s = student_logits.movedim(class_dim, 1)
        ce = F.cross_entropy(s, teacher_logits.movedim(class_dim, 1).argmax(1), reduction="sum") / s.shape[0]
        kd = (1.0 - hard) * kd + hard * ce
    if labels is None:
        return kd
    return alpha * kd + (1.0 - alpha) * _task_loss(student_logits, labels, label_loss)


def _task_loss(student_logits: torch.Tensor, labels: Any, label_loss: LabelLoss | None) -> torch.Tensor:
    """The loss on the labels: ``label_loss(student_logits, labels)``, else the cross-entropy."""
    return label_loss(student_logits, labels) if label_loss is not None else F.cross_entropy(student_logits, labels)


def feature_loss(student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of ``‖s − t‖² / ‖t‖²`` (each pair of the same shape, e.g. ``(B, N, H, W)``)."""
    if len(student_features) != len(teacher_features) or not student_features:
        raise SeparifyError("feature_loss needs the same, non-zero number of student and teacher features")
    terms = []
    for s, t in zip(student_features, teacher_features):
        if s.shape != t.shape:
            raise SeparifyError(f"feature shapes differ: student {tuple(s.shape)}, teacher {tuple(t.shape)}")
        s, t = s.float(), t.float()
        terms.append(((s - t) ** 2).sum() / (t**2).sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


class _Taps:
    """Forward hooks that keep the output of the first call of each named module in a forward pass.

    Only forward passes inside :meth:`recording` count, so that a model run elsewhere (e.g. an evaluation in the
    user's callback, at another batch size) is not mistaken for the training step's.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], *, detach: bool) -> None:
        self.names = list(names)
        self.out: dict[str, torch.Tensor] = {}
        self.active = False
        self.handles = []
        for name in self.names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise SeparifyError(f"features: the model has no module named {name!r}") from None
            self.handles.append(module.register_forward_hook(self._hook(name, detach)))

    def _hook(self, name: str, detach: bool):
        def hook(_mod, _args, output):
            if self.active and name not in self.out:
                # a copy (differentiable for the student): the model may change its output in place afterwards
                # (`out += identity`, ReLU(inplace=True)), and the feature is the module's output as it returned
                self.out[name] = output.detach().clone() if detach else output.clone()

        return hook

    @contextmanager
    def recording(self):
        self.out, self.active = {}, True
        try:
            yield self
        finally:
            self.active = False

    def take(self) -> list[torch.Tensor]:
        missing = [n for n in self.names if n not in self.out]
        if missing:
            raise SeparifyError(f"features: module(s) {', '.join(missing[:3])} did not run in the forward pass")
        out = [self.out[n] for n in self.names]
        self.out = {}
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _agreement(inputs: Sequence[torch.Tensor], teacher_logits: Sequence[torch.Tensor],
               class_dim: int | None) -> Callable[[nn.Module], tuple[float, float]]:
    """``score(student)``: the student's agreement with the teacher (whose logits on ``inputs`` are
    ``teacher_logits``), ``(fraction of samples, fraction of positions)`` at which its largest class along
    ``class_dim`` is the teacher's. A sample agrees where every position does: each sample of ``(B, C)`` logits, the
    whole sequence of ``(B, T, C)`` ones (one wrong step can change a decoded word). The positions break ties
    (``(B, C, H, W)`` maps rarely agree everywhere)."""
    class_dim = class_axis(class_dim, teacher_logits[0].dim())
    decisions = [t.argmax(class_dim) for t in teacher_logits]
    samples = sum(len(d) for d in decisions)

    def score(student: nn.Module) -> float:
        whole = hits = total = 0
        for x, decision in zip(inputs, decisions):
            same = _same_classes(student(x), decision, class_dim)  # (B, positions)
            whole, hits, total = whole + int(same.all(1).sum()), hits + int(same.sum()), total + same.numel()
        return whole / samples, hits / max(total, 1)

    return score


def _same_classes(s_logits: torch.Tensor, decision: torch.Tensor, class_dim: int) -> torch.Tensor:
    """``(B, positions)``: where the student's largest class along ``class_dim`` is the teacher's ``decision``
    (the teacher's logits' argmax along that axis)."""
    return (s_logits.argmax(class_dim) == decision).reshape(len(decision), -1)


class _Guard:
    """Keeps the student's state that scores best: ``score(student)``, a number or a tuple compared in order (higher
    is better; run without gradients, in eval mode), at the start and every ``every`` steps. Ties go to the later
    state. The trace holds the first number of each score; ``kind`` says what it is (:attr:`FinetuneResult.check`)."""

    def __init__(self, score: Callable[[nn.Module], float | tuple[float, ...]], every: int,
                 kind: str = "metric") -> None:
        self.score, self.every, self.kind = score, every, kind
        self.best_step: int | None = None
        self.best_score: tuple[float, ...] = (-math.inf,)
        self.best_state: dict | None = None
        self.trace: list[tuple[int, float]] = []

    def check(self, student: nn.Module, step: int) -> None:
        """Score the student at ``step``; keep a copy of its state if it is the best so far."""
        with torch.no_grad(), frozen_mode(student):
            value = self.score(student)
        value = tuple(float(v) for v in value) if isinstance(value, tuple) else (float(value),)
        if not all(math.isfinite(v) for v in value):
            raise SeparifyError(f"the fine-tuning metric returned {value[0] if len(value) == 1 else value} at step "
                                f"{step}")
        self.trace.append((step, value[0]))
        if value >= self.best_score:
            self.best_step, self.best_score = step, value
            self.best_state = copy.deepcopy(student.state_dict())

    def state(self) -> dict:
        return {"step": self.best_step, "score": self.best_score, "state": self.best_state, "trace": self.trace}

    def load(self, saved: dict) -> None:
        self.best_step, self.best_score, self.best_state = saved["step"], tuple(saved["score"]), saved["state"]
        self.trace = [tuple(t) for t in saved["trace"]]


@dataclass
class FinetuneResult:
    """What :func:`finetune` did: steps run in all, the loss of each step run in this call, where it resumed from, why
    it stopped early (``None`` if it ran to the end), and the learning rate, temperature and hard weight it used
    (``chosen``: those of them it chose itself, ``"lr"``, ``"temperature"``, ``"hard"``). ``scores``: ``(step,
    score)`` at each check of ``keep_best`` (``evaluate``'s value; else minus the loss on the validation
    batches' labels, or without labels the fraction of validation samples on which the student agrees with the
    teacher); ``kept_step``: the step whose state the student holds at the end
    (``steps`` unless an earlier state scored better); ``held_out``: the batches at the start of each epoch that
    training skipped, the default check's validation batches (0: none held out; see :func:`_held_out` for when
    the student may still have seen their samples); ``check``: what ``scores`` holds, ``"metric"``, ``"label
    loss"`` (minus the loss) or ``"agreement"`` (``None``: no check)."""

    steps: int
    losses: list[float] = field(default_factory=list)
    resumed_from: int | None = None
    stopped: str | None = None
    lr: float | None = None
    temperature: float | None = None
    chosen: tuple[str, ...] = ()
    hard: float | None = None
    scores: list[tuple[int, float]] = field(default_factory=list)
    kept_step: int | None = None
    held_out: int = 0
    check: str | None = None


def check_temperature(value: Any, name: str = "temperature") -> None:
    """Refuse a distillation temperature that is not a positive finite number (``name`` is how the caller spells
    the option)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise SeparifyError(f"{name} must be a positive number, got {value!r}")


def _recording(taps: _Taps | None):
    return taps.recording() if taps is not None else nullcontext()


def _split(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch → ``(input, labels or None)``: a tensor, or a tuple/list ``(input, labels, ...)``."""
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def _fingerprint(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """``[(state-dict key, shape)]``: what a checkpoint must match to be loaded into ``model``."""
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _dist() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised ``torch.distributed`` group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _total_steps(steps: int | None, epochs: int | None, data: Iterable, hold: int = 0) -> int:
    """The number of optimizer steps: ``steps``, or ``epochs × (len(data) − hold)``; refuses anything but exactly
    one positive integer of the two, empty data, and ``epochs`` for data without a length."""
    if (steps is None) == (epochs is None):
        raise SeparifyError("finetune needs exactly one of steps and epochs")
    for name, value in (("steps", steps), ("epochs", epochs)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise SeparifyError(f"{name} must be a positive integer, got {value!r}")
    batches_per_epoch = _length(data)
    if batches_per_epoch == 0:
        raise SeparifyError("the fine-tuning data is empty")
    if epochs is not None and batches_per_epoch is None:
        raise SeparifyError("epochs needs data with a length (a list or a DataLoader); give steps instead")
    return steps if steps is not None else epochs * (batches_per_epoch - hold)


def _length(data: Iterable) -> int | None:
    """``len(data)``, ``None`` where it has none (a generator; a ``DataLoader`` over an ``IterableDataset``)."""
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


def _held_out(data: Iterable, first: _FirstBatches, keep_best: bool, evaluate: Any, validation: Any,
              saved: dict | None = None) -> int:
    """How many batches at the start of each epoch training skips: the default check's ``first`` batches (at least
    :data:`VALIDATION_BATCHES` batches and :data:`HELD_SAMPLES` samples; keep_best without ``evaluate`` or
    ``validation``), where the data has at least :data:`HOLD_MIN_FACTOR` times as many batches or no length (a
    stream; one with no more batches than these is then refused when training reaches its end); else 0, and the
    check scores batches the student also trains on. A run resuming from the checkpoint state ``saved`` keeps the
    count it was saved with (0 for checkpoints that predate it). A ``DataLoader`` that reshuffles at every epoch
    shows the held-out samples to the later epochs (and ``steps`` that cycle the data, to the later passes): give
    ``validation=`` for a set held out of all of them."""
    if saved is not None:
        return int(saved.get("hold", 0))
    if not keep_best or evaluate is not None or validation is not None:
        return 0
    size, hold = _length(data), len(first.batches)
    return hold if size is None or size >= HOLD_MIN_FACTOR * hold else 0


@dataclass(frozen=True)
class _Objective:
    """The loss of one step (module docstring): :func:`distillation_loss` with these settings, plus
    ``feature_weight ·`` :func:`feature_loss` where features are tapped."""

    temperature: float
    alpha: float
    class_dim: int | None
    label_loss: LabelLoss | None
    use_labels: bool
    feature_weight: float
    hard: float | None = 0.0
    pseudo_labels: Callable[[torch.Tensor], Any] | None = None

    def labels(self, y: Any, t_logits: torch.Tensor) -> Any:
        """The labels a batch is trained and scored on: its own ``y`` (unless ``use_labels`` is off), else
        ``pseudo_labels`` of the teacher's logits ``t_logits`` on it, else ``None`` (distillation only)."""
        if y is not None and self.use_labels:
            return y
        return self.pseudo_labels(t_logits.detach()) if self.pseudo_labels is not None else None

    def check_labels(self, y: torch.Tensor | None, t_logits: torch.Tensor) -> None:
        """Class labels ``y (B,)`` must index the teacher's classes (unchecked with a custom ``label_loss``)."""
        classes = t_logits.shape[class_axis(self.class_dim, t_logits.dim())]
        if y is not None and self.label_loss is None and (int(y.min()) < 0 or int(y.max()) >= classes):
            raise SeparifyError(f"labels must be in [0, {classes - 1}], got values from "
                                f"{int(y.min())} to {int(y.max())}")

    def distillation(self, s_logits: torch.Tensor, t_logits: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """:func:`distillation_loss` of student logits ``s_logits`` against ``t_logits`` (labels ``y`` or None)."""
        return distillation_loss(s_logits, t_logits, y, temperature=self.temperature, alpha=self.alpha,
                                 class_dim=self.class_dim, label_loss=self.label_loss, hard=self.hard)


class _Trainer:
    """The state of one :func:`finetune` run: the models (``model`` is the student, wrapped in
    ``DistributedDataParallel`` when ``world > 1``), AdamW with a cosine schedule over ``total`` steps, the
    position (``step``, ``epoch``, batches of the epoch to ``skip``), the last good state, the feature taps and the
    progress bar; ``schedule(step)``: the factor of ``lr`` at each step (default: :func:`defaults.schedule`);
    ``hold``: the batches at the start of every epoch it does not train on (:func:`_held_out`)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, objective: _Objective, *, total: int,
                 device: torch.device, amp: bool, rank: int, world: int, lr: float, weight_decay: float, seed: int,
                 train_bn: bool, checkpoint_every: int, callback: Callable[[int, float], None] | None,
                 schedule: Callable[[int], float] | None = None, hold: int = 0) -> None:
        self.student, self.teacher, self.objective = student, teacher, objective
        self.total, self.device, self.amp, self.rank, self.world = total, device, amp, rank, world
        self.seed, self.train_bn, self.checkpoint_every, self.callback = seed, train_bn, checkpoint_every, callback
        self.lr = lr
        self.model: nn.Module = student
        if world > 1 and not isinstance(student, nn.parallel.DistributedDataParallel):
            self.model = nn.parallel.DistributedDataParallel(
                student, device_ids=[device.index] if device.type == "cuda" else None)
        params = [p for p in student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule or defaults.schedule(total))
        self.step, self.epoch, self.skip = 0, 0, 0
        self.hold = hold  # batches at the start of every epoch that are not trained on (the guard's validation)
        self.saved_rng: torch.Tensor | None = None  # the random state to continue from, when resuming
        self.result = FinetuneResult(0, lr=lr, temperature=objective.temperature, hard=objective.hard, held_out=hold)
        self.ckpt_path: Path | None = None
        self.last_good, self.last_good_step = None, 0
        self.s_taps: _Taps | None = None
        self.t_taps: _Taps | None = None
        self.guard: _Guard | None = None
        self.bar = self.task = None

    def resume(self, checkpoint: str | os.PathLike | None, state: dict | None) -> None:
        """Write to ``checkpoint`` from now on, and resume from its loaded ``state`` (:func:`_load_checkpoint`;
        ``None``: start afresh) after checking that its parameters match the student: student, optimizer,
        schedule, position, random state. Then keep the current state as the last good one."""
        self.ckpt_path = path = Path(checkpoint) if checkpoint is not None else None
        if state is not None:
            if [(k, tuple(shape)) for k, shape in state["fingerprint"]] != _fingerprint(self.student):
                raise SeparifyError(f"{path} is a checkpoint of another model (its parameters do not match)")
            self.student.load_state_dict(state["student"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
            self.step, self.epoch, self.skip = state["step"], state["epoch"], state["batch"]
            self.saved_rng = state["rng"]
            self.result.resumed_from = self.step
            if self.guard is not None and state.get("best") is not None:
                self.guard.load(state["best"])
        self.last_good, self.last_good_step = copy.deepcopy(self.student.state_dict()), self.step
        if self.guard is not None and self.guard.best_step is None:
            self.guard.check(self.student, self.step)

    def save(self, batch_index: int) -> None:
        """Keep the current state as the last good one and write the checkpoint (rank 0; atomic); ``batch_index``:
        the batch of this epoch to resume at."""
        self.last_good, self.last_good_step = copy.deepcopy(self.student.state_dict()), self.step
        if self.ckpt_path is not None and self.rank == 0:
            payload = {"format": CHECKPOINT_FORMAT, "fingerprint": _fingerprint(self.student),
                       "student": self.last_good, "optimizer": self.optimizer.state_dict(),
                       "schedule": self.schedule.state_dict(), "step": self.step, "epoch": self.epoch,
                       "batch": batch_index, "hold": self.hold, "rng": torch.get_rng_state(), "lr": self.lr,
                       "temperature": self.objective.temperature, "hard": self.objective.hard,
                       "best": self.guard.state() if self.guard is not None else None}
            atomic_write(self.ckpt_path, lambda tmp: torch.save(payload, tmp))
        if self.world > 1:
            torch.distributed.barrier()

    def start_progress(self, progress: bool, label: str = "fine-tuning") -> None:
        """A transient progress bar on rank 0, from the current step."""
        if progress and self.rank == 0:
            self.bar = progress_bar(total=True, auto_refresh=True)
            self.bar.start()
            self.task = self.bar.add_task(label, total=self.total, completed=self.step)

    def set_modes(self) -> None:
        """The student in train mode, its BatchNorm layers in eval mode unless ``train_bn``."""
        self.student.train()
        if not self.train_bn:
            for m in self.student.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def tap(self, features: Mapping[str, str]) -> None:
        """Record the outputs of the student modules (keys) and teacher modules (values) of ``features``."""
        self.s_taps = _Taps(self.student, list(features.keys()), detach=False)
        self.t_taps = _Taps(self.teacher, list(features.values()), detach=True)

    def keep_best(self) -> None:
        """Load the state the guard kept (if it is not the current one) and record the guard's trace."""
        if self.guard is None:
            return
        at = self.last_good_step if self.result.stopped else self.step  # the state the student holds now
        if not self.guard.trace or self.guard.trace[-1][0] != at:
            self.guard.check(self.student, at)
        if self.guard.best_step != at and self.guard.best_state is not None:
            self.student.load_state_dict(self.guard.best_state)
        self.result.kept_step, self.result.scores = self.guard.best_step, list(self.guard.trace)
        self.result.check = self.guard.kind

    def close(self) -> None:
        """Remove the taps and stop the progress bar."""
        for taps in (self.s_taps, self.t_taps):
            if taps is not None:
                taps.remove()
        if self.bar is not None:
            self.bar.stop()

    def train(self, data: Iterable) -> None:
        """Run epochs over ``data`` (reseeding torch at each) until ``total`` steps or a non-finite loss."""
        while self.step < self.total:
            torch.manual_seed(self.seed + self.epoch)  # a DataLoader shuffling with it repeats its order
            index = -1
            for index, batch in enumerate(data):
                if index < max(self.skip, self.hold):
                    continue
                if self.step >= self.total:
                    break
                if not self._train_step(batch, index):
                    return
            if index < self.hold:
                raise SeparifyError("the fine-tuning data is empty" if index == -1 else
                                    f"the fine-tuning data has only the {index + 1} batch(es) held out for checking"
                                    "; give more data, validation= or evaluate=, or keep_best=False")
            if self.step < self.total:
                self.epoch, self.skip = self.epoch + 1, 0

    def _train_step(self, batch: Any, index: int) -> bool:
        """One optimizer step on ``batch`` (batch ``index`` of the epoch); ``False``: the loss was not finite, the
        last good state is restored and the run stops."""
        if self.saved_rng is not None:  # resuming: the random stream continues where the checkpoint left it
            torch.set_rng_state(self.saved_rng)
            self.saved_rng = None
        loss = self._loss(batch)
        if not torch.isfinite(loss):
            if self.last_good is not None:
                self.student.load_state_dict(self.last_good)
            self.result.stopped = (f"the loss became {float(loss)} at step {self.step + 1}; stopped and restored the "
                                   f"last good state (step {self.last_good_step})")
            return False
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        self.step += 1
        self.result.losses.append(float(loss.detach()))
        if self.bar is not None:
            self.bar.update(self.task, completed=self.step)
        if self.callback is not None:
            self.callback(self.step, float(loss.detach()))
        if self.guard is not None and (self.step % self.guard.every == 0 or self.step == self.total):
            self.guard.check(self.student, self.step)
        if self.step % self.checkpoint_every == 0 or self.step == self.total:
            self.save(index + 1)
        return True

    def _loss(self, batch: Any) -> torch.Tensor:
        """The scalar loss of the student on ``batch`` (this process's share of it under ``world > 1``)."""
        x, y = _split(batch)
        if self.world > 1:  # every process takes its share of the same batch
            x = x[self.rank :: self.world]
            y = y[self.rank :: self.world] if y is not None else None
        x = x.to(self.device)
        y = y.to(self.device) if y is not None else None
        self.set_modes()  # again at every step: a callback may have switched modes (e.g. to evaluate)
        with torch.no_grad(), frozen_mode(self.teacher), _recording(self.t_taps):
            t_logits = self.teacher(x)  # (B, ..., classes along class_dim)
        y = self.objective.labels(y, t_logits)
        self.objective.check_labels(y, t_logits)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            with _recording(self.s_taps):
                s_logits = self.model(x)
            loss = self.objective.distillation(s_logits, t_logits, y)
            if self.s_taps is not None:
                loss = loss + self.objective.feature_weight * feature_loss(self.s_taps.take(), self.t_taps.take())
        return loss


def finetune(
    student: nn.Module,
    teacher: nn.Module,
    data: Iterable,
    *,
    steps: int | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    weight_decay: float = 0.0,
    temperature: float | None = None,
    hard: float | None = None,
    warmup: float = defaults.WARMUP,
    alpha: float = 0.5,
    use_labels: bool = True,
    label_loss: LabelLoss | None = None,
    pseudo_labels: Callable[[torch.Tensor], Any] | None = None,
    class_dim: int | None = None,
    features: Mapping[str, str] | None = None,
    feature_weight: float = 0.0,
    train_bn: bool = False,
    train: str = "all",
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    progress: bool = False,
    callback: Callable[[int, float], None] | None = None,
    keep_best: bool = True,
    validation: Iterable | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
) -> FinetuneResult:
    """Fine-tune ``student`` by distillation from ``teacher`` (module docstring); returns a :class:`FinetuneResult`.

    Args:
        student: the converted model; trained in place, left in the train/eval mode it came in.
        teacher: the original model; only run, in eval mode (mode flags restored), without gradients.
        data: a re-iterable of batches (a list, a ``DataLoader``): tensors, or ``(input, label)`` tuples.
        steps, epochs: how long (give exactly one). ``steps`` cycles through the data as needed.
        lr, weight_decay: AdamW settings; ``warmup`` fraction of the steps of linear warm-up, then a cosine to 0.
            ``lr=None``: chosen by a range test on a copy of the student (:mod:`~separify.tuning.defaults`).
        temperature, alpha, hard: distillation loss settings (:func:`distillation_loss`); ``use_labels=False``
            ignores labels in the data. ``None``: chosen from the teacher's outputs on the first batches
            (:func:`~separify.tuning.defaults.choose_temperature`, :func:`~separify.tuning.defaults.choose_hard`).
        label_loss, pseudo_labels: ``label_loss(student_logits, labels)`` instead of the cross-entropy (under ``amp``
            on bfloat16 logits); ``pseudo_labels(teacher_logits)``: the labels of batches that carry none (sequence-
            level distillation); for CTC models :mod:`~separify.tuning.ctc`'s ``ctc_loss``, ``ctc_greedy_targets``.
        class_dim: the class axis of the output; ``None``: :func:`~separify.config.class_axis` (last or 1 by rank).
        features, feature_weight: student → teacher module names whose outputs should match (e.g.
            ``result.feature_pairs()``), and the weight of that term (0: off).
        train, train_bn: ``"all"`` parameters, or the separable replacements' (``"converted"``, as the ONNX path
            does; all where there are none), never those not requiring gradients; update BatchNorm statistics.
        seed: seeds torch at the start and at every epoch (for a ``DataLoader`` that shuffles with it).
        checkpoint: file to save to every ``checkpoint_every`` steps and at the end, and to resume from.
        device, amp, progress: where to train (default: the student's); bfloat16 autocast (default: on for CUDA); a
            progress bar. ``callback(step, loss)`` is called after every step.
        keep_best, validation, evaluate: end with the better-scoring state (module docstring): by ``evaluate(student)``
            (higher is better) the best of :data:`CHECKS` + 1 states, else the start or the end by the loss on the
            labels of ``validation`` (batches; default: the first batches of ``data``, held out of training where it
            has enough, :func:`_held_out`; ``epochs=1`` then trains on the rest), or by the agreement.
    """
    device = torch.device(device) if device is not None else next(student.parameters()).device
    state = _load_checkpoint(checkpoint, device)
    _total_steps(steps, epochs, data)  # refuses bad lengths before any data is read
    student.to(device), teacher.to(device)
    first, held, hold = _reference_batches(teacher, data, validation, device, seed, keep_best, evaluate, state)
    total = _total_steps(steps, epochs, data, hold)
    _check_weights(feature_weight, warmup, hard)
    kw = dict(zip(("rank", "world"), _dist()), device=device, amp=(device.type == "cuda") if amp is None else amp,
              weight_decay=weight_decay, seed=seed, train_bn=train_bn)
    objective = _Objective(temperature, alpha, class_dim, label_loss, use_labels, feature_weight, hard, pseudo_labels)
    guard = _guard(held or first, total, evaluate, objective) if keep_best else None
    with _trained_parameters(student, train):
        lr, objective, chosen = _settings(student, first, total, lr, state or {}, progress, objective, kw, held, hold)
        torch.manual_seed(seed)
        run = _Trainer(student, teacher, objective, total=total, lr=lr, checkpoint_every=checkpoint_every,
                       callback=callback, schedule=defaults.schedule(total, warmup), hold=hold, **kw)
        run.result.chosen, run.guard = chosen, guard
        _run(run, data, checkpoint, state, progress, features, was_training=student.training)  # mode unchanged so far
    return _finish(run.result, run.step)


def _run(run: _Trainer, data: Iterable, checkpoint: str | os.PathLike | None, state: dict | None, progress: bool,
         features: Mapping[str, str] | None, was_training: bool) -> None:
    """Resume ``run`` from the checkpoint ``state`` (or start it), train it over ``data``, end with the state its
    guard kept, and leave the student in train mode if ``was_training``."""
    try:
        run.resume(checkpoint, state)
        run.start_progress(progress)
        run.set_modes()
        if features and run.objective.feature_weight > 0:
            run.tap(features)
        run.train(data)
        run.keep_best()
    finally:
        run.close()
        run.student.train(was_training)


def _reference_batches(teacher: nn.Module, data: Iterable, validation: Iterable | None, device: torch.device,
                       seed: int, keep_best: bool, evaluate: Any,
                       saved: dict | None) -> tuple[_FirstBatches, _FirstBatches | None, int]:
    """The first batches of ``data`` (read once, when first asked for, by the settings and the guard), the batches
    no step trains on (for the range test and the check: ``validation``, else those first batches where the run
    holds them out, else ``None``), and how many batches of each epoch it holds out (:func:`_held_out`)."""
    first = _FirstBatches(teacher, data, device, seed=seed)
    hold = _held_out(data, first, keep_best, evaluate, validation, saved)
    if validation is not None:
        return first, _FirstBatches(teacher, validation, device, True, "validation"), hold
    return first, first if hold else None, hold


def _guard(batches: _FirstBatches, total: int, evaluate: Callable[[nn.Module], float] | None,
           objective: _Objective) -> _Guard:
    """The guard of a run of ``total`` steps: ``evaluate`` at the start and :data:`CHECKS` times; else, at the start
    and the end only (a noisy proxy picks badly among many states), on ``batches`` (the validation data, or the first
    batches of the data): where they carry labels the run uses, the loss on those labels (:func:`_label_fit`), else
    the agreement with the teacher (:func:`_agreement`)."""
    if evaluate is not None:
        return _Guard(evaluate, every=max(1, math.ceil(total / CHECKS)))
    # scored where the teacher's output is finite (a batch it cannot score, such as a corrupt one, scores nothing)
    scored = [(x, y, t) for x, y, t in _labelled(batches, objective) if bool(torch.isfinite(t).all())]
    if scored and all(y is not None for _, y, _ in scored):
        return _Guard(_label_fit(scored, objective), every=total, kind="label loss")
    return _Guard(_agreement(batches.inputs, batches.logits, objective.class_dim), every=total, kind="agreement")


def _label_fit(batches: Sequence[tuple[torch.Tensor, Any, torch.Tensor]],
               objective: _Objective) -> Callable[[nn.Module], float]:
    """``score(student)``: minus the student's mean loss on the labels of ``batches`` (:func:`_labelled`; the
    cross-entropy, or ``objective.label_loss``). The labels are the task itself; the agreement with the teacher
    would also count against the student every sample on which it corrects the teacher."""
    return lambda student: -_mean_loss(student, batches, lambda s, _t, y: _task_loss(s, y, objective.label_loss))


def _labelled(batches: _FirstBatches, objective: _Objective,
              count: int | None = None) -> list[tuple[torch.Tensor, Any, torch.Tensor]]:
    """``(input, labels, teacher logits)`` of the first ``count`` of ``batches`` (``None``: all), with the labels the
    run uses (:meth:`_Objective.labels`; ``None`` for none), checked once."""
    out = []
    for (x, y), t in zip(batches.batches[:count], batches.logits[:count]):
        y = objective.labels(y, t)
        objective.check_labels(y, t)
        out.append((x, y, t))
    return out


def _mean_loss(student: nn.Module, batches: Sequence[tuple[torch.Tensor, Any, torch.Tensor]],
               loss: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]) -> float:
    """The mean of ``loss(student(x), t, y)`` over the ``(x, y, t)`` of ``batches`` (:func:`_labelled`)."""
    return sum(float(loss(student(x), t, y)) for x, y, t in batches) / max(len(batches), 1)


@contextmanager
def _trained_parameters(student: nn.Module, train: str):
    """While inside, only the parameters ``train`` names require gradients: ``"converted"``, those of the student's
    separable replacements (:class:`~separify.core.modules.SeparableConv2d`; every parameter where it has none),
    ``"all"``, every parameter; either way only among those that required gradients already. Each parameter's flag
    is restored afterwards."""
    if train not in ("converted", "all"):
        raise SeparifyError(f"train must be 'converted' or 'all', got {train!r}")
    from separify.core.modules import SeparableConv2d

    saved = [(p, p.requires_grad) for p in student.parameters()]
    replacements = [m for m in student.modules() if isinstance(m, SeparableConv2d)]
    if train == "converted" and replacements:
        keep = {id(p) for m in replacements for p in m.parameters()}
        for p, _ in saved:
            if id(p) not in keep:
                p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _check_weights(feature_weight: Any, warmup: Any, hard: Any) -> None:
    """Refuse a negative or non-numeric ``feature_weight``, and a ``warmup`` or ``hard`` outside [0, 1]."""
    if isinstance(feature_weight, bool) or not isinstance(feature_weight, (int, float)) or not feature_weight >= 0:
        raise SeparifyError(f"feature_weight must be a non-negative number, got {feature_weight!r}")
    if hard is not None and (isinstance(hard, bool) or not isinstance(hard, (int, float)) or not 0 <= hard <= 1):
        raise SeparifyError(f"hard must be a weight in [0, 1], got {hard!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or not 0 <= warmup <= 1:
        raise SeparifyError(f"warmup must be a fraction of the steps in [0, 1], got {warmup!r}")


def _settings(student: nn.Module, first: _FirstBatches, total: int, lr: float | None, saved: dict, progress: bool,
              objective: _Objective, kw: dict[str, Any], held: _FirstBatches | None = None,
              hold: int = 0) -> tuple[float, _Objective, tuple[str, ...]]:
    """The learning rate, the objective with its temperature and hard weight, and which of the three were not given:
    as given, else as stored in the checkpoint state ``saved`` a run resumes from, else chosen (from the teacher's
    outputs on the ``first`` batches, :func:`defaults.choose_temperature` and :func:`defaults.choose_hard`;
    :func:`_range_test` over ``first.data`` skipping its ``hold`` first batches, scored on the ``held`` batches
    where there are any)."""
    chosen = tuple(k for k, v in (("lr", lr), ("temperature", objective.temperature), ("hard", objective.hard))
                   if v is None)
    if objective.temperature is None:
        objective = dataclasses.replace(objective, temperature=saved.get("temperature") or defaults.choose_temperature(
            first.logits, objective.class_dim))
    else:
        check_temperature(objective.temperature)
    if objective.hard is None:
        objective = dataclasses.replace(objective, hard=saved["hard"] if saved.get("hard") is not None
                                        else defaults.choose_hard(first.logits, objective.class_dim))
    if lr is None:
        lr = saved.get("lr") or _range_test(student, first.teacher, objective, first.data, total, held=held,
                                            hold=hold, progress=progress, **kw)
    return lr, objective, chosen


def _load_checkpoint(checkpoint: str | os.PathLike | None, device: torch.device) -> dict | None:
    """The state saved in ``checkpoint`` (``None`` where there is no file yet), after checking that it is a
    readable separify fine-tuning checkpoint."""
    if checkpoint is None or not Path(checkpoint).exists():
        return None
    path = Path(checkpoint)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise SeparifyError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise SeparifyError(f"{path} is not a separify fine-tuning checkpoint")
    return state


class _FirstBatches:
    """The inputs of the first batches of ``data`` on ``device`` (``every``: all of them; else as many as hold at
    least :data:`VALIDATION_BATCHES` batches and :data:`HELD_SAMPLES` samples), and the teacher's logits for them
    (the same on every process), each read once and only when first asked for. With ``seed``, read with torch seeded
    by it, as training's first epoch reads them (a ``DataLoader`` that shuffles with torch's random state then
    yields the same first batches), without changing torch's random state."""

    def __init__(self, teacher: nn.Module, data: Iterable, device: torch.device, every: bool = False,
                 what: str = "fine-tuning", seed: int | None = None) -> None:
        self.teacher, self.data, self.device, self.every, self.what = teacher, data, device, every, what
        self.seed = seed

    @functools.cached_property
    def batches(self) -> list[tuple[torch.Tensor, Any]]:
        """``(input, labels or None)`` of each batch, on ``device``."""
        out = []
        with torch.random.fork_rng(devices=[]):
            if self.seed is not None:
                torch.default_generator.manual_seed(self.seed)  # the CPU generator, which fork_rng restores
            for batch in self.data:
                x, y = _split(batch)
                out.append((x.to(self.device), y.to(self.device) if isinstance(y, torch.Tensor) else y))
                if not self.every and _enough([len(b) for b, _ in out]):
                    break
        if not out:
            raise SeparifyError(f"the {self.what} data is empty")
        return out

    @property
    def inputs(self) -> list[torch.Tensor]:
        return [x for x, _ in self.batches]

    @functools.cached_property
    def logits(self) -> list[torch.Tensor]:
        with torch.no_grad(), frozen_mode(self.teacher):
            return [self.teacher(x) for x in self.inputs]


def _enough(sizes: Sequence[int]) -> bool:
    """Whether batches of sizes ``sizes`` are at least :data:`VALIDATION_BATCHES` batches and :data:`HELD_SAMPLES`
    samples."""
    return len(sizes) >= VALIDATION_BATCHES and sum(sizes) >= HELD_SAMPLES


def _leading(sizes: Sequence[int]) -> int:
    """How many of the leading batches of sizes ``sizes`` are :func:`_enough` (all where none are)."""
    return next((n for n in range(1, len(sizes) + 1) if _enough(sizes[:n])), len(sizes))


class _Diverged(Exception):
    """The range test's loss diverged: it stops there."""


def _range_test(student: nn.Module, teacher: nn.Module, objective: _Objective, data: Iterable, total: int, *,
                held: _FirstBatches | None, hold: int, progress: bool, **kw: Any) -> float:
    """The learning rate from a range test (:mod:`~separify.tuning.defaults`) on a copy of ``student`` (itself
    unchanged), over the first :func:`defaults.range_steps` ``(total)`` batches of ``data`` after its ``hold`` first:
    with ``held`` batches (none of them trained on), :func:`defaults.lr_from_held_out` of the loss on them after
    each step, else :func:`defaults.lr_from_losses` of the training losses; under ``torch.distributed``, rank 0's
    choice for every process."""
    steps = defaults.range_steps(total)
    torch.manual_seed(kw["seed"])
    probe = _Trainer(copy.deepcopy(student), teacher, objective, total=steps, lr=1.0, checkpoint_every=steps + 1,
                     callback=None, schedule=lambda s: defaults.range_lr(s, steps), hold=hold, **kw)
    reference = _labelled(held, objective, _leading([len(x) for x in held.inputs])) if held is not None else []
    start, start_agreement = _held_scores(probe.student, objective, reference) if reference else (math.nan, math.nan)
    losses: list[float] = []  # on the held batches, after each step
    agreement: list[float] = []  # ... and the fraction of their samples the student decides as the teacher does

    def stop_if_diverged(_step: int, _loss: float) -> None:
        if reference:
            loss, agree = _held_scores(probe.student, objective, reference)
            losses.append(loss), agreement.append(agree)
            stop = defaults.harmed(losses, start, agreement, start_agreement) is not None
        else:
            stop = defaults.diverged(probe.result.losses)
        if stop:
            raise _Diverged

    probe.callback = stop_if_diverged
    probe.start_progress(progress, "choosing the learning rate (range test)")
    probe.set_modes()
    try:
        probe.train(data)
    except _Diverged:
        pass
    finally:
        probe.close()
    if losses:  # there are held-out losses only after a finite first step
        lr = defaults.lr_from_held_out(losses, start, steps, agreement, start_agreement)
    else:  # no held batches, or not even the first step's loss was finite (then None)
        lr = defaults.lr_from_losses(probe.result.losses, steps)
    if lr is None:
        raise SeparifyError("the fine-tuning loss was not finite even at the lowest learning rate of the range test "
                            f"({defaults.RANGE_LOW:g}); give lr=")
    if kw["world"] > 1:
        value = torch.tensor([lr], dtype=torch.float64, device=kw["device"])
        torch.distributed.broadcast(value, src=0)
        lr = float(value)
    return lr


def _held_scores(student: nn.Module, objective: _Objective,
                 batches: Sequence[tuple[torch.Tensor, Any, torch.Tensor]]) -> tuple[float, float]:
    """The mean distillation loss of ``student`` (eval mode, no gradients) on ``batches`` (:func:`_labelled`), and
    the fraction of their samples on which it decides as the teacher does (:func:`_same_decisions`)."""
    loss = agree = samples = 0
    with torch.no_grad(), frozen_mode(student):
        for x, y, t in batches:
            s = student(x)
            loss += float(objective.distillation(s, t, y))
            agree, samples = agree + int(_same_decisions(s, t, objective).sum()), samples + len(t)
    return loss / max(len(batches), 1), agree / max(samples, 1)


def _same_decisions(s_logits: torch.Tensor, t_logits: torch.Tensor, objective: _Objective) -> torch.Tensor:
    """``(B,)``: whether the student decides each sample as the teacher does: the same pseudo labels where the run
    makes them (a whole decoded sequence, for :func:`~separify.tuning.ctc.ctc_greedy_targets`; made of both at once,
    so that they are padded alike), else the same largest class along the class axis at every position."""
    b = len(t_logits)
    if objective.pseudo_labels is not None:
        labels = objective.pseudo_labels(torch.cat([s_logits.detach(), t_logits]))
        if isinstance(labels, torch.Tensor) and len(labels) == 2 * b:
            return (labels[:b] == labels[b:]).reshape(b, -1).all(1)
    axis = class_axis(objective.class_dim, t_logits.dim())
    return _same_classes(s_logits, t_logits.argmax(axis), axis).all(1)


def _finish(result: FinetuneResult, step: int) -> FinetuneResult:
    result.steps = step
    return result
