"""Distillation fine-tuning: train the converted model (student) to match the original (teacher).

Loss (Hinton et al. 2015): ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` between teacher logits ``t`` and student logits
``s`` at temperature ``T``, mixed with cross-entropy on labels when the data carries them:
``α · KD + (1 − α) · CE`` (or another label loss, ``label_loss=``, e.g. CTC for a sequence model). With
``features`` (pairs of converted layer → original layer, e.g. :meth:`separify.ConvertResult.feature_pairs`) and
``feature_weight > 0``, a feature term
``feature_weight · mean_l ‖s_l − t_l‖² / ‖t_l‖²`` pulls each converted layer's output ``s_l`` towards the original
layer's output ``t_l`` on the same batch (relative, so layers of any scale count alike). :func:`distillation_loss`
and :func:`feature_loss` are the same losses for use in your own training loop.

:func:`finetune` runs AdamW with a cosine learning-rate schedule. BatchNorm layers are kept in eval mode (frozen
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
import math
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from separify.errors import SeparifyError
from separify.core.measure import frozen_mode
from separify.io.models import atomic_write

__all__ = ["distillation_loss", "feature_loss", "finetune", "FinetuneResult"]

CHECKPOINT_FORMAT = "separify-finetune-1"

LabelLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (student logits, labels) → scalar loss


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
                      *, temperature: float = 4.0, alpha: float = 0.9, class_dim: int = 1,
                      label_loss: LabelLoss | None = None) -> torch.Tensor:
    """``α·T²·KL(teacher ‖ student) + (1 − α)·CE(student, labels)`` (just the KL term without labels).

    Logits are ``(B, C)``, or any shape with the classes along ``class_dim`` (e.g. ``(B, T, C)`` per time step of a
    sequence model with ``class_dim=-1``; the KL is then summed over the other positions and averaged over ``B``);
    labels ``(B,)`` integer classes, for ``(B, C)`` logits only. ``label_loss(student_logits, labels)`` replaces the
    cross-entropy for other kinds of labels (e.g. CTC targets of a sequence model); the labels are then whatever it
    takes.
    """
    t = temperature
    kd = F.kl_div(F.log_softmax(student_logits / t, dim=class_dim), F.log_softmax(teacher_logits / t, dim=class_dim),
                  reduction="batchmean", log_target=True) * (t * t)
    if labels is None:
        return kd
    task = label_loss(student_logits, labels) if label_loss is not None else F.cross_entropy(student_logits, labels)
    return alpha * kd + (1.0 - alpha) * task


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


@dataclass
class FinetuneResult:
    """What :func:`finetune` did: steps run in all, the loss of each step run in this call, where it resumed from,
    and why it stopped early (``None`` if it ran to the end)."""

    steps: int
    losses: list[float] = field(default_factory=list)
    resumed_from: int | None = None
    stopped: str | None = None


def check_temperature(value: Any, name: str = "temperature") -> None:
    """Refuse a distillation temperature that is not a positive finite number (``name`` is how the caller spells
    the option)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise SeparifyError(f"{name} must be a positive number, got {value!r}")


def _recording(taps: _Taps | None):
    return taps.recording() if taps is not None else nullcontext()


def _split(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def _fingerprint(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def finetune(
    student: nn.Module,
    teacher: nn.Module,
    data: Iterable,
    *,
    steps: int | None = None,
    epochs: int | None = None,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    temperature: float = 4.0,
    alpha: float = 0.9,
    use_labels: bool = True,
    label_loss: LabelLoss | None = None,
    class_dim: int = 1,
    features: Mapping[str, str] | None = None,
    feature_weight: float = 0.0,
    train_bn: bool = False,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 50,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    progress: bool = False,
    callback: Callable[[int, float], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``student`` by distillation from ``teacher`` (see the module docstring).

    Args:
        student: the converted model; trained in place, and left in the train/eval mode it came in.
        teacher: the original model; only run, in eval mode (its own mode flags are restored), without gradients.
        data: a re-iterable of batches (a list, a ``DataLoader``): tensors, or ``(input, label)`` tuples.
        steps, epochs: how long (give exactly one). ``steps`` cycles through the data as needed.
        lr, weight_decay: AdamW settings; the learning rate follows a cosine schedule to 0.
        temperature, alpha: distillation loss settings; ``use_labels=False`` ignores labels in the data.
        label_loss: ``label_loss(student_logits, labels)``, the label term instead of the cross-entropy (for labels
            that are not one class per sample, e.g. CTC targets; see :func:`distillation_loss`); under ``amp`` it
            gets bfloat16 logits (cast them up if the loss needs it).
        class_dim: the class dimension of the model's output (``-1`` for ``(B, T, C)`` sequence logits).
        features, feature_weight: student module name → teacher module name whose outputs should match (e.g.
            ``result.feature_pairs()`` from :func:`separify.convert`), and the weight of that term (0: off).
        train_bn: update BatchNorm statistics (default: frozen).
        seed: seeds torch's generator at the start and at every epoch (for a ``DataLoader`` that shuffles with it).
        checkpoint: file to save to every ``checkpoint_every`` steps and at the end, and to resume from.
        device: where to train (default: the student's device). ``amp`` (default: on for CUDA) uses bfloat16
            autocast.
        progress: show a progress bar. ``callback(step, loss)`` is called after every step.

    Returns:
        :class:`FinetuneResult`.
    """
    if (steps is None) == (epochs is None):
        raise SeparifyError("finetune needs exactly one of steps and epochs")
    for name, value in (("steps", steps), ("epochs", epochs)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise SeparifyError(f"{name} must be a positive integer, got {value!r}")
    batches_per_epoch = len(data) if hasattr(data, "__len__") else None
    if batches_per_epoch == 0:
        raise SeparifyError("the fine-tuning data is empty")
    if epochs is not None and batches_per_epoch is None:
        raise SeparifyError("epochs needs data with a length (a list or a DataLoader); give steps instead")
    total = steps if steps is not None else epochs * batches_per_epoch
    rank, world = _dist()
    device = torch.device(device) if device is not None else next(student.parameters()).device
    amp = (device.type == "cuda") if amp is None else amp
    student.to(device)
    teacher.to(device)
    was_training = student.training
    if isinstance(feature_weight, bool) or not isinstance(feature_weight, (int, float)) or not feature_weight >= 0:
        raise SeparifyError(f"feature_weight must be a non-negative number, got {feature_weight!r}")
    check_temperature(temperature)
    use_features = bool(features) and feature_weight > 0

    torch.manual_seed(seed)
    model: nn.Module = student
    if world > 1 and not isinstance(student, nn.parallel.DistributedDataParallel):
        model = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))

    step, epoch, skip = 0, 0, 0
    result = FinetuneResult(0)
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    if ckpt_path is not None and ckpt_path.exists():
        try:
            state = torch.load(ckpt_path, map_location=device, weights_only=True)
        except Exception as exc:
            raise SeparifyError(f"{ckpt_path}: cannot read the checkpoint ({type(exc).__name__}: {exc})") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise SeparifyError(f"{ckpt_path} is not a separify fine-tuning checkpoint")
        if [(k, tuple(shape)) for k, shape in state["fingerprint"]] != _fingerprint(student):
            raise SeparifyError(f"{ckpt_path} is a checkpoint of another model (its parameters do not match)")
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, epoch, skip = state["step"], state["epoch"], state["batch"]
        saved_rng = state["rng"]
        result.resumed_from = step
    else:
        saved_rng = None
    last_good, last_good_step = copy.deepcopy(student.state_dict()), step

    def save(batch_index: int) -> None:
        nonlocal last_good, last_good_step
        last_good, last_good_step = copy.deepcopy(student.state_dict()), step
        if ckpt_path is not None and rank == 0:
            payload = {"format": CHECKPOINT_FORMAT, "fingerprint": _fingerprint(student), "student": last_good,
                          "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "step": step,
                          "epoch": epoch, "batch": batch_index, "rng": torch.get_rng_state()}
            atomic_write(ckpt_path, lambda tmp: torch.save(payload, tmp))
        if world > 1:
            torch.distributed.barrier()

    bar = None
    if progress and rank == 0:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("fine-tuning", total=total, completed=step)

    def set_modes() -> None:
        student.train()
        if not train_bn:
            for m in student.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    set_modes()
    s_taps = t_taps = None
    if use_features:
        s_taps = _Taps(student, list(features.keys()), detach=False)
        t_taps = _Taps(teacher, list(features.values()), detach=True)
    try:
        while step < total:
            torch.manual_seed(seed + epoch)  # a DataLoader shuffling with the global generator repeats its order
            index = -1
            for index, batch in enumerate(data):
                if index < skip:
                    continue
                if step >= total:
                    break
                if saved_rng is not None:  # resuming: the random stream continues where the checkpoint left it
                    torch.set_rng_state(saved_rng)
                    saved_rng = None
                x, y = _split(batch)
                if world > 1:  # every process takes its share of the same batch
                    x = x[rank::world]
                    y = y[rank::world] if y is not None else None
                x = x.to(device)
                y = y.to(device) if (y is not None and use_labels) else None
                set_modes()  # again at every step: a callback may have switched modes (e.g. to evaluate)
                with torch.no_grad(), frozen_mode(teacher), _recording(t_taps):
                    t_logits = teacher(x)
                if y is not None and label_loss is None and (int(y.min()) < 0
                                                             or int(y.max()) >= t_logits.shape[class_dim]):
                    raise SeparifyError(f"labels must be in [0, {t_logits.shape[class_dim] - 1}], got values from "
                                        f"{int(y.min())} to {int(y.max())}")
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    with _recording(s_taps):
                        s_logits = model(x)
                    loss = distillation_loss(s_logits, t_logits, y, temperature=temperature, alpha=alpha,
                                             class_dim=class_dim, label_loss=label_loss)
                    if use_features:
                        loss = loss + feature_weight * feature_loss(s_taps.take(), t_taps.take())
                if not torch.isfinite(loss):
                    student.load_state_dict(last_good)
                    result.stopped = (f"the loss became {float(loss)} at step {step + 1}; stopped and restored the "
                                      f"last good state (step {last_good_step})")
                    return _finish(result, step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                result.losses.append(float(loss.detach()))
                if bar is not None:
                    bar.update(task, completed=step)
                if callback is not None:
                    callback(step, float(loss))
                if step % checkpoint_every == 0 or step == total:
                    save(index + 1)
            if index == -1:
                raise SeparifyError("the fine-tuning data is empty")
            if step < total:
                epoch, skip = epoch + 1, 0
    finally:
        for taps in (s_taps, t_taps):
            if taps is not None:
                taps.remove()
        if bar is not None:
            bar.stop()
        student.train(was_training)
    return _finish(result, step)


def _finish(result: FinetuneResult, step: int) -> FinetuneResult:
    result.steps = step
    return result
