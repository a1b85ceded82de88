"""CTC labels for sequence models: the loss on padded targets, and a teacher's greedy decodings as targets.

A CTC model (a text recogniser, a speech model) outputs logits ``(B, T, C)``: ``C`` classes at each of ``T`` steps,
one class the blank. Targets here are ``(B, S)`` class indices padded with the blank; a target never contains the
blank, so its length is its count of other entries. :func:`ctc_greedy_targets` turns a teacher's logits into such
targets, for sequence-level distillation (Kim and Rush 2016): the student learns the teacher's decoded sequences,
free to align them its own way, where the per-step distillation term asks for the teacher's alignment too::

    separify.finetune(student, teacher, images, epochs=1, label_loss=separify.ctc_loss,
                      pseudo_labels=separify.ctc_greedy_targets)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from separify.core.measure import first_output, frozen_mode
from separify.errors import SeparifyError

__all__ = ["ctc_greedy_targets", "ctc_loss", "sequence_accuracy"]


def ctc_loss(logits: torch.Tensor, targets: torch.Tensor, *, blank: int = 0) -> torch.Tensor:
    """The CTC loss of ``logits (B, T, C)`` against ``targets (B, S)`` padded with ``blank``: summed over each
    sequence and averaged over the batch (the scale of the distillation term, summed over the steps). A target that
    no alignment of ``T`` steps can produce counts 0 (``zero_infinity``)."""
    _check_blank(logits, blank)
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (T, B, C)
    b, t = logits.shape[:2]
    steps = torch.full((b,), t, dtype=torch.long, device=logits.device)
    lengths = (targets != blank).sum(1)
    return F.ctc_loss(log_probs, targets, steps, lengths, blank=blank, reduction="sum", zero_infinity=True) / b


def ctc_greedy_targets(logits: torch.Tensor, *, blank: int = 0) -> torch.Tensor:
    """Greedy CTC decoding of ``logits (B, T, C)``: the best class at each step, repeats merged, blanks dropped; as
    targets ``(B, S)`` padded with ``blank`` (``S``: the longest decoding, at least 1)."""
    _check_blank(logits, blank)
    best = logits.argmax(-1)  # (B, T)
    keep = best != blank
    keep[:, 1:] &= best[:, 1:] != best[:, :-1]  # a step repeating the one before it adds nothing
    out = torch.full((len(best), max(1, int(keep.sum(1).max()))), blank, dtype=torch.long, device=logits.device)
    rows = torch.arange(len(best), device=logits.device)[:, None].expand_as(best)
    out[rows[keep], (keep.cumsum(1) - 1)[keep]] = best[keep]
    return out


def _check_blank(logits: torch.Tensor, blank: int) -> None:
    if logits.dim() != 3 or not 0 <= blank < logits.shape[-1]:
        raise SeparifyError(f"CTC needs logits (B, T, C) with the blank among the C classes; got shape "
                            f"{tuple(logits.shape)} and blank {blank}")


def sequence_accuracy(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, blank: int = 0,
                      batch_size: int = 256) -> float:
    """The fraction of ``inputs (N, ...)`` whose greedy decoding (:func:`ctc_greedy_targets` of the model's
    ``(B, T, C)`` logits) equals its target: a row of ``targets (N, S)`` padded with ``blank``."""
    if targets.dim() != 2 or len(targets) != len(inputs):
        raise ValueError(f"CTC targets must be of shape ({len(inputs)}, S), got {tuple(targets.shape)}")
    hits = 0
    with torch.no_grad(), frozen_mode(model):
        for i in range(0, len(inputs), batch_size):
            got = ctc_greedy_targets(first_output(model(inputs[i : i + batch_size])), blank=blank).cpu()
            want = targets[i : i + batch_size]
            width = max(got.shape[1], want.shape[1])  # (B, width), both padded with the blank
            got, want = (F.pad(t, (0, width - t.shape[1]), value=blank) for t in (got, want))
            hits += int((got == want).all(1).sum())
    return hits / max(len(inputs), 1)
