"""Fastest within an accuracy budget: ``convert(..., max_drop=D, evaluate=f)``.

``evaluate(model) -> float`` measures the model on the user's held-out data (higher is better: top-1, mAP, word
accuracy, agreement with the original...). The search converts the model at a sequence of latency budgets
``L`` (fractions of the original's time on the target), each plan decomposed, calibrated and evaluated, and
returns the plan with the lowest measured time whose metric is at least ``evaluate(original) - D``:

* budgets are bisected in (0, 1): a plan within the drop moves the upper end down, one beyond it the lower end
  up; a plan that cannot meet its budget is the fastest reachable, so lower budgets are not tried after it passes;
* every try shares one :class:`Memo`: layer and whole-model timings come from the cache after
  the first try, and the calibration statistics are measured once;
* with no plan within the drop, the original is returned (every layer dense, :attr:`Reason.ACCURACY`).

Every try is kept in :attr:`ConvertResult.search` (:class:`~separify.records.Search`): budget, FLOPs ratio,
measured time ratio, metric, so the report can show the frontier explored.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from typing import Any, Callable

from dataclasses import dataclass

from separify.backends.base import Backend
from separify.config import ConvertConfig
from separify.core.progress import overall_bar, step
from separify.errors import ConfigError, SeparifyError, first_line
from separify.planning import latency
from separify.records import ConvertResult, Reason, Search, SearchTry, Skip

__all__ = ["Memo", "fastest_within", "check_search"]


@dataclass
class Memo:
    """What one conversion measured that another of the same model and data reuses (the tries of a search):
    the timing cache (layer and whole-model times) and the calibration statistics."""

    cache: latency.LatencyCache | None = None
    observed: tuple | None = None  # (backend observation, covariances, whitened kernels, patch statistics)
    weights: tuple | None = None  # (loss-aware weights, warning)


#: bisection steps over the latency budget (the first try is 0.5; resolution 1/2**TRIES)
TRIES = 5
#: the description of the search's overall bar
SEARCHING = "max-drop search"


def check_search(cfg: ConvertConfig, max_drop: Any, evaluate: Any) -> None:
    """Refuse a search that cannot run, before anything is measured."""
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not 0 <= max_drop < 1 \
            or math.isnan(max_drop):
        raise ConfigError(f"max_drop must be a number in [0, 1) (the metric's allowed drop), got {max_drop!r}")
    if evaluate is None:
        raise ConfigError("max_drop needs evaluation data: evaluate=callable(model) -> float in the library, "
                          "--data (or the embedded model's own evaluation set) on the command line")
    if not callable(evaluate):
        raise ConfigError(f"evaluate must be a callable(model) -> float, got {type(evaluate).__name__}")
    if cfg.objective != "latency":
        raise ConfigError("max_drop searches latency budgets on the target: it needs objective='latency' (the "
                          "default), not 'flops'")
    if cfg.selection in ("rank", "energy"):
        raise ConfigError(f"max_drop chooses the ranks itself; drop the fixed {cfg.selection} setting")


def metric(evaluate: Callable[[Any], float], model: Any, what: str) -> float:
    """``evaluate(model)``, checked: a finite number, or one clear error."""
    try:
        value = evaluate(model)
    except SeparifyError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's function: say so, with its message
        raise SeparifyError(f"the evaluate function raised on {what}: {type(exc).__name__}: {first_line(exc)}") \
            from None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise SeparifyError(f"the evaluate function returned {value!r} on {what}; expected a number") from None
    if not math.isfinite(value):
        raise SeparifyError(f"the evaluate function returned {value} on {what}; expected a finite number")
    return value


def fastest_within(make_backend: Callable[[], Backend], run: Callable[..., ConvertResult], cfg: ConvertConfig, *,
                   max_drop: float,
                   evaluate: Callable[[Any], float], metric_name: str = "evaluate(model)", calibration: Any = None,
                   progress: Any = False, timer: Any = None, tries: int = TRIES) -> ConvertResult:
    """The fastest plan on the target whose ``evaluate`` is within ``max_drop`` of the original's (module
    docstring). ``make_backend()`` builds a fresh backend of the same model for each try; ``run`` is
    :func:`separify.pipeline.run`. ``progress=True``: one overall bar (tries done of at most ``tries``, elapsed
    time, time left from the second try on) drawn above each try's own bars
    (:func:`separify.core.progress.overall_bar`); a callable is passed to ``run`` as it is."""
    check_search(cfg, max_drop, evaluate)
    start = time.perf_counter()
    memo = Memo()
    with overall_bar(f"{SEARCHING}: the original model", tries, on=progress is True) as bar:
        first = make_backend()
        with _evaluating(progress, "evaluating the original model"):
            original = metric(evaluate, first.runnable("original"), "the original model")
        search = Search(metric_name, original, float(max_drop), target="")
        best: ConvertResult | None = None
        lo, hi = 0.0, 1.0
        for i in range(tries):
            budget = round((lo + hi) / 2, 4)
            bar.show(f"{SEARCHING}: try {i + 1} of at most {tries}, latency budget {budget:g}")
            backend = first if first is not None else make_backend()
            first = None
            result, within, reached = _try(run, backend, cfg.replace(latency=budget), budget, evaluate, search, memo,
                                           calibration=calibration, progress=progress, timer=timer)
            bar.done()
            if within and (best is None or (result.latency_ratio or 1.0) < (best.latency_ratio or 1.0)):
                best = result
            if within and not reached:
                break  # the fastest reachable plan keeps the metric: lower budgets give the same plan
            lo, hi = (lo, budget) if within else (budget, hi)
        if best is None:
            bar.show(f"{SEARCHING}: no plan within the drop, keeping the original")
            best = _original(run, make_backend(), cfg, search, calibration=calibration, memo=memo, timer=timer)
    _choose(search, best)
    best.search, best.seconds = search, time.perf_counter() - start
    return best


def _try(run, backend: Backend, cfg: ConvertConfig, budget: float, evaluate, search: Search, memo: Memo, **kw):
    """One conversion at a latency budget, evaluated; recorded in ``search``."""
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        result = run(backend, cfg, memo=memo, **kw)
    with _evaluating(kw.get("progress"), f"evaluating the plan at latency budget {budget:g}"):
        value = metric(evaluate, backend.runnable("converted"), f"the plan at latency budget {budget:g}")
    within = value >= search.original - search.max_drop
    ratio = result.latency_ratio
    search.target = result.latency_target or search.target
    search.tries.append(SearchTry(budget, result.flops_ratio, ratio, value, within, len(result.converted)))
    result._search_index = len(search.tries) - 1
    reached = ratio is not None and ratio <= budget * 1.02 and bool(result.converted)
    return result, within, reached


def _evaluating(progress: Any, what: str):
    """The evaluation as a step with its elapsed time (``progress is True``; the user's function, of a length not
    known beforehand)."""
    return step(what) if progress is True else contextlib.nullcontext()


def _original(run, backend: Backend, cfg: ConvertConfig, search: Search, **kw) -> ConvertResult:
    """No plan kept the metric: every layer dense, saying why."""
    tried = ", ".join(f"{t.metric:.4g} at {t.time_ratio:.2f}× time" for t in search.tries if t.time_ratio)
    why = (f"no faster plan kept {search.metric} within {search.max_drop:g} of the original's {search.original:.4g}"
           + (f" (tried: {tried})" if tried else ""))
    result = run(backend, cfg, keep=Skip(Reason.ACCURACY, why), **kw)
    result.warnings.append(why + "; the original is kept. Allow a larger drop, calibrate with more data, or "
                           "fine-tune the converted model (--finetune)")
    return result


def _choose(search: Search, best: ConvertResult) -> None:
    index = getattr(best, "_search_index", None)
    if index is not None:
        search.tries[index].chosen = True
