"""Calibration input data: whatever the caller passes, normalised to a list of floating-point input batches."""

from __future__ import annotations

from typing import Any

import torch

from separify.errors import SeparifyError

__all__ = ["as_batches"]


def as_batches(data: Any, *, limit: int | None = None) -> list[torch.Tensor]:
    """Normalise calibration data to a list of input batches.

    ``data`` may be a tensor ``(N, ...)`` (split into batches of 128), or an iterable of batches, each a tensor or a
    tuple/list whose first element is the input (as a ``DataLoader`` of ``(image, label)`` yields). At most ``limit``
    samples are kept (the last batch is cut to fit). Raises :class:`SeparifyError` for a non-tensor or
    non-floating-point batch and for data that holds no sample.
    """
    if isinstance(data, torch.Tensor):
        data = list(torch.split(data, 128))
    batches: list[torch.Tensor] = []
    count = 0
    for item in data:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor):
            raise SeparifyError(f"calibration batches must be tensors (or (input, ...) tuples), got {type(x).__name__}")
        if not x.is_floating_point():
            raise SeparifyError(f"calibration inputs must be floating point (normalised as for the model), got {x.dtype}")
        if limit is not None and count + len(x) > limit:
            x = x[: limit - count]
        if len(x):
            batches.append(x)
            count += len(x)
        if limit is not None and count >= limit:
            break
    if not batches:
        raise SeparifyError("the calibration data is empty")
    return batches
