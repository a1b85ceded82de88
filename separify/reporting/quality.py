"""Whether two models are versions of one network, and how close the converted one is to the original: accuracy,
agreement, output error and the user's metrics, on the given data or on random inputs."""

from __future__ import annotations

import torch
from torch import nn

from separify.core.measure import agreement, first_output, frozen_mode, topk_accuracy
from separify.errors import SeparifyError, first_line
from separify.reporting.data import Quality
from separify.reporting.settings import ReportSettings
from separify.tuning.ctc import sequence_accuracy

__all__ = ["check_outputs", "measure_quality"]


def check_outputs(original: nn.Module, converted: nn.Module, inputs: tuple) -> None:
    """Run both models on ``inputs``.

    Raises:
        SeparifyError: a model does not run on them, or the two outputs differ in shape.
    """
    shapes = []
    for which, m in (("original", original), ("converted", converted)):
        try:
            with torch.no_grad(), frozen_mode(m):
                out = m(*inputs)
        except Exception as exc:
            shape = ", ".join(str(tuple(t.shape)) for t in inputs)
            raise SeparifyError(f"the {which} model does not run on inputs of shape {shape} "
                                f"({type(exc).__name__}: {first_line(exc)}); a program exported with a fixed batch "
                                "size only runs at that size") from None
        out = first_output(out)
        shapes.append(tuple(out.shape) if isinstance(out, torch.Tensor) else None)
    if shapes[0] != shapes[1]:
        raise SeparifyError(f"the models' outputs differ in shape ({shapes[0]} vs {shapes[1]}); they are not two "
                            "versions of one network")


def measure_quality(original: nn.Module, converted: nn.Module, inputs: tuple,
                    settings: ReportSettings) -> list[Quality]:
    """Top-k accuracy of both models (with labels), the converted model's top-1 agreement and relative output error
    against the original, then the user's metrics; on ``settings.data``, or on random inputs shaped like
    ``inputs[0]``'s samples.

    Raises:
        SeparifyError: the labels do not match the data, or the data does not fit the models.
    """
    rows: list[Quality] = []
    data, what = _eval_data(settings, inputs[0])
    labels = settings.labels
    try:
        batch = _eval_batch(original, converted, data, int(inputs[0].shape[0]))
        if labels is not None:
            if len(labels) != len(data):
                raise SeparifyError(f"{len(labels)} labels for {len(data)} inputs")
            rows += _accuracy_rows(original, converted, data, labels, what, settings.ctc_blank, batch)
        top1, rel = agreement(original, converted, data, class_dim=settings.class_dim, batch_size=batch)
    except SeparifyError:
        raise
    except Exception as exc:
        raise SeparifyError(f"the data ({what}, shape {tuple(data.shape)}) does not fit the models "
                            f"({type(exc).__name__}: {first_line(exc)})") from None
    if top1 is not None:
        rows.append(Quality("top-1 agreement with the original", what, None, top1))
    rows.append(Quality("relative output error vs the original", what, None, rel, "relative"))
    for name, fn in (settings.metrics or {}).items():
        rows.append(Quality(name, "user metric", float(fn(original)), float(fn(converted)), "user"))
    return rows


def _accuracy_rows(original, converted, data, labels, what: str, ctc_blank: int | None, batch: int) -> list[Quality]:
    """Top-k accuracy of both models on class labels ``(N,)``; with ``ctc_blank``, sequence accuracy on targets
    ``(N, S)``."""
    if ctc_blank is not None:
        accs = [sequence_accuracy(m, data, labels, blank=ctc_blank, batch_size=batch) for m in (original, converted)]
        return [Quality("sequence accuracy (greedy CTC)", what, *accs)]
    accs = [topk_accuracy(m, data, labels, batch_size=batch) for m in (original, converted)]
    return [Quality(f"top-{k} accuracy", what, accs[0][k], accs[1][k]) for k in sorted(accs[0])]


def _eval_data(settings: ReportSettings, example: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The evaluation inputs and how the quality rows name them."""
    if settings.data is not None:
        return settings.data, settings.data_name or f"{len(settings.data)} given inputs"
    n = settings.random_samples
    gen = torch.Generator().manual_seed(settings.seed)
    data = torch.randn((n, *example.shape[1:]), generator=gen, dtype=example.dtype)
    return data, f"{n} random normal inputs, no data given"


def _eval_batch(original, converted, data, example_batch: int) -> int:
    """256, or the example input's batch size for models exported with a fixed batch (they refuse other sizes)."""
    if len(data) <= 1 or example_batch >= len(data):
        return max(example_batch, 1)
    try:
        with torch.no_grad(), frozen_mode(original, converted):
            for m in (original, converted):
                m(data[:2] if example_batch != 2 else data[:3])
    except Exception:  # noqa: BLE001 - a fixed batch size; anything else fails again below, with its message
        return example_batch
    return 256
