"""Several conversions of one model, each reported against the original in one run."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from torch import nn

from separify.errors import SeparifyError
from separify.records import ConvertResult
from separify.reporting.data import Comparison
from separify.reporting.measure import report

__all__ = ["compare"]


def compare(
    model: nn.Module,
    settings: Sequence[Mapping[str, Any]],
    *,
    example_inputs: Any,
    calibration: Any = None,
    on_result: Callable[[str, ConvertResult], None] | None = None,
    **report_options: Any,
) -> Comparison:
    """Convert ``model`` once per entry of ``settings`` (keyword options of :func:`separify.convert`, e.g.
    ``{"method": "dw-pw", "flops": 0.5}``) and :func:`~separify.reporting.report` each against the original with
    ``report_options`` (per-layer timing is off unless ``per_layer=True`` is passed). Each run is labelled by the
    options that differ between the settings (all of the first one's when none differ). ``on_result(label,
    result)`` is called after each conversion (e.g. to save the model).

    Raises:
        SeparifyError: ``settings`` is empty.
    """
    from separify.pipeline import convert

    if not settings:
        raise SeparifyError("compare() needs at least one setting")
    report_options = {"per_layer": False, **report_options}
    varying = [k for k in dict.fromkeys(k for s in settings for k in s)
               if len({repr(s.get(k)) for s in settings}) > 1] or list(settings[0])
    runs = []
    for s in settings:
        label = " ".join(f"{k}={s[k]}" for k in varying if k in s)
        result = convert(model, example_inputs=example_inputs, calibration=calibration, **dict(s))
        if on_result is not None:
            on_result(label, result)
        runs.append((label, dict(s), report(model, result, example_inputs=example_inputs, **report_options)))
    return Comparison(tuple(runs))
