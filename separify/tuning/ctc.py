"""CTC labels for sequence models: the loss on padded targets, and a teacher's greedy decodings as targets.

A CTC model (a text recogniser, a speech model) outputs logits ``(B, T, C)``: ``C`` classes at each of ``T`` steps,
one class the blank. Targets here are ``(B, S)`` class indices padded with the blank; a target never contains the
blank, so its length is its count of other entries. :func:`ctc_greedy_targets` turns a teacher's logits into such
targets, for sequence-level distillation (Kim and Rush 2016): the student learns the teacher's decoded sequences,
free to align them its own way, where the per-step distillation term asks for the teacher's alignment too::

    separify.finetune(student, teacher, images, epochs=1, class_dim=-1, label_loss=separify.ctc_loss,
                      pseudo_labels=separify.ctc_greedy_targets)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ctc_greedy_targets", "ctc_loss"]


def ctc_loss(logits: torch.Tensor, targets: torch.Tensor, *, blank: int = 0) -> torch.Tensor:
    """The CTC loss of ``logits (B, T, C)`` against ``targets (B, S)`` padded with ``blank``: summed over each
    sequence and averaged over the batch (the scale of the distillation term, summed over the steps). A target that
    no alignment of ``T`` steps can produce counts 0 (``zero_infinity``)."""
    log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (T, B, C)
    b, t = logits.shape[:2]
    steps = torch.full((b,), t, dtype=torch.long, device=logits.device)
    lengths = (targets != blank).sum(1)
    return F.ctc_loss(log_probs, targets, steps, lengths, blank=blank, reduction="sum", zero_infinity=True) / b


def ctc_greedy_targets(logits: torch.Tensor, *, blank: int = 0) -> torch.Tensor:
    """Greedy CTC decoding of ``logits (B, T, C)``: the best class at each step, repeats merged, blanks dropped; as
    targets ``(B, S)`` padded with ``blank`` (``S``: the longest decoding, at least 1)."""
    best = logits.argmax(-1)  # (B, T)
    keep = best != blank
    keep[:, 1:] &= best[:, 1:] != best[:, :-1]  # a step repeating the one before it adds nothing
    out = torch.full((len(best), max(1, int(keep.sum(1).max()))), blank, dtype=torch.long, device=logits.device)
    rows = torch.arange(len(best), device=logits.device)[:, None].expand_as(best)
    out[rows[keep], (keep.cumsum(1) - 1)[keep]] = best[keep]
    return out
