"""Calibration input data: what a real input pipeline yields, normalised to batches that each hold one sample shape.

Accepted (:func:`as_batches`):

* a tensor or NumPy array ``(N, ...)``;
* an iterable — a list, a generator, a ``torch.utils.data.DataLoader`` — whose items are batches ``(B, ...)``,
  single samples (one dimension fewer than the model's input), ``(input, target, ...)`` tuples or lists, or dicts
  (the input is ``input_key``'s value; without a key, the only floating-point tensor in the dict, or else the
  value of one of :data:`INPUT_KEYS`).

Samples may differ in shape (word images of different widths, images at their native size): they are grouped by
shape, and every statistic is accumulated per sample, so the result is the same as feeding the samples one by one.
Only the first ``limit`` samples are read: an iterable over a large dataset is not exhausted. The samples kept are
held in memory (bounded by ``max_bytes``); layer outputs kept for the refit are bounded separately
(:func:`~separify.calibration.observe`).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

from separify.errors import SeparifyError

__all__ = ["INPUT_KEYS", "as_batches", "first_samples", "shape_groups"]

#: dict keys read as the model input when no ``input_key`` is given and a dict holds several float tensors
INPUT_KEYS = ("input", "inputs", "image", "images", "pixel_values", "x")
_BATCH = 128  # samples per batch of a tensor split into batches


def _pick(item: dict, key: str | None) -> Any:
    """The model input in one dict item (module docstring)."""
    if key is not None:
        if key not in item:
            raise SeparifyError(f"the calibration data's dicts have no key {key!r} (keys: "
                                f"{', '.join(map(str, item))})")
        return item[key]
    floats = [k for k, v in item.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if len(floats) == 1:
        return item[floats[0]]
    named = [k for k in INPUT_KEYS if k in item]
    if named:
        return item[named[0]]
    raise SeparifyError(f"cannot tell which entry of the calibration data's dicts is the model input (keys: "
                        f"{', '.join(map(str, item))}); name it with input_key= (CLI: --calib-key)")


def _as_tensor(x: Any, key: str | None) -> torch.Tensor:
    if isinstance(x, dict):
        x = _pick(x, key)
    elif isinstance(x, (tuple, list)) and x:
        x = x[0]
    if type(x).__module__ == "numpy" and hasattr(x, "__array__"):
        import numpy as np

        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise SeparifyError("calibration data must be tensors or arrays (or (input, ...) tuples, or dicts of "
                            f"them), got {type(x).__name__}")
    if not x.is_floating_point():
        raise SeparifyError(f"calibration inputs must be floating point (normalised as for the model), got {x.dtype}")
    return x


def _items(data: Any) -> Iterator[Any]:
    if isinstance(data, torch.Tensor) or type(data).__module__ == "numpy":
        yield _as_tensor(data, None)
        return
    if isinstance(data, dict):
        yield data
        return
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes)):
        raise SeparifyError(f"calibration data must be a tensor, an array or an iterable of batches, got "
                            f"{type(data).__name__}")
    yield from data


def as_batches(data: Any, *, limit: int | None = None, ndim: int | None = None, input_key: str | None = None,
               max_bytes: int | None = None) -> list[torch.Tensor]:
    """Normalise calibration data (module docstring) to a list of batches, each holding samples of one shape.

    Args:
        data: the calibration data.
        limit: read at most this many samples (a batch that crosses it is cut).
        ndim: the rank of the model's input batch (e.g. 4 for ``(N, C, H, W)``): an item of rank ``ndim - 1`` is one
            sample; an item of any other rank than these two is refused. ``None``: every item is a batch.
        input_key: which entry of dict items is the model input.
        max_bytes: bound on the bytes of the samples kept; more raises :class:`SeparifyError` saying how many fit.

    Returns:
        Batches of at most 128 samples; samples of one shape are gathered into the same batches, in order of their
        first appearance. Raises :class:`SeparifyError` for data that holds no sample, non-tensors, non-floating
        point inputs and items of the wrong rank.
    """
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
    count = used = 0
    for item in _items(data):
        x = _as_tensor(item, input_key)
        if ndim is not None and x.dim() == ndim - 1:
            x = x.unsqueeze(0)  # one sample
        elif ndim is not None and x.dim() != ndim:
            raise SeparifyError(f"a calibration item has shape {tuple(x.shape)}; the model takes inputs of rank "
                                f"{ndim} (a batch) or {ndim - 1} (one sample)")
        if limit is not None and count + len(x) > limit:
            x = x[: limit - count]
        if len(x):
            used += x.numel() * x.element_size()
            if max_bytes is not None and used > max_bytes:
                raise SeparifyError(f"the calibration samples need more than {max_bytes / 2**30:.3g} GB; use fewer "
                                    f"(e.g. --calib-limit {max(1, count)}) or raise calib_memory_gb")
            by_shape.setdefault(tuple(x.shape[1:]), []).append(x)
            count += len(x)
        if limit is not None and count >= limit:
            break
    if not by_shape:
        raise SeparifyError("the calibration data is empty")
    return [b for parts in by_shape.values() for b in (torch.cat(parts) if len(parts) > 1 else parts[0]).split(_BATCH)]


def shape_groups(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The batches of each sample shape concatenated: one tensor per shape, in order of first appearance."""
    groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for b in batches:
        groups.setdefault(tuple(b.shape[1:]), []).append(b)
    return [torch.cat(parts) if len(parts) > 1 else parts[0] for parts in groups.values()]


def first_samples(batches: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """The first ``n`` samples of ``batches`` (in their order), as batches of one shape each."""
    out, left = [], n
    for b in batches:
        if left <= 0:
            break
        out.append(b[:left])
        left -= len(out[-1])
    return shape_groups(out)
