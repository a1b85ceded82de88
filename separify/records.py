"""What a conversion did: one record per conv site, and the result of the whole pass.

A :class:`LayerRecord` is built in three parts, in pipeline order:

1. ``spec``: a frozen :class:`LayerSpec` of the conv as found (name, channels, kernel, stride, groups, input shape);
2. either ``skip`` (a :class:`Skip`: a :class:`Reason` code the code tests, and its text for people) or ``plan``
   (a :class:`Plan`: form, rank, layout and measured times);
3. the outcome: FLOPs and parameters before/after, decomposition and calibration errors, and :class:`Note` s.

The flat attributes of earlier versions (``rec.name``, ``rec.reason``, ``rec.rank``, ``rec.note``...) are read-only
views of these parts, and :meth:`LayerRecord.to_dict` keeps their keys (adding ``reason_code`` and ``notes``).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from separify.config import ConvertConfig
from separify.core import measure

__all__ = ["LayerSpec", "Reason", "Skip", "Plan", "NoteCode", "Note", "LayerRecord", "ConvertResult", "new_record"]


class Reason(str, enum.Enum):
    """Why a conv was left dense."""

    UNSUPPORTED = "unsupported"  # the layer itself: grouped, 1×1, not 2-D, a subclass, a non-float weight...
    BLOCKED = "blocked"  # the graph forbids the swap: weight shared, read directly, computed or a graph input
    EXCLUDED = "excluded"  # by an ``exclude`` pattern or rule
    NOT_REACHED = "not-reached"  # not called on the example input, so no shape to plan at
    NO_SAVING = "no-saving"  # no replacement saves FLOPs at the rank asked for, or at any rank
    ALLOCATION = "kept-by-allocation"  # the global FLOPs or latency allocation kept it dense
    NOT_FASTER = "not-faster"  # no replacement measured faster on the latency target, or the whole model was not
    ACCURACY = "accuracy"  # max_drop: no faster plan kept the metric within the allowed drop


@dataclass(frozen=True)
class Skip:
    code: Reason
    text: str


class NoteCode(str, enum.Enum):
    BN_NOT_FOLDED = "bn-not-folded"
    RANK_CLAMPED = "rank-clamped"
    RANK_PADDED = "rank-padded"
    SCARCE = "scarce-calibration"  # too few calibration pixels for a plain refit (calibration.refit)
    CALIBRATION = "calibration"  # anything else the calibration said (e.g. no ALS for the layer's size)


@dataclass(frozen=True)
class Note:
    code: NoteCode
    text: str


@dataclass(frozen=True)
class LayerSpec:
    """One conv site as found in the model, before any decision."""

    name: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    groups: int
    input_shape: tuple[int, ...] | None


@dataclass
class Plan:
    """The replacement chosen for a conv: ``method`` (form), ``rank`` (``None`` until planned), ``exact_rank``
    (the rank at which the form is exact), ``rank_source`` (what chose the rank), and under the latency objective
    the ``layout`` and the measured times (ms per call at the target's batch) of the dense conv and the choice."""

    method: str
    rank: int | None = None
    exact_rank: int | None = None
    rank_source: str | None = None
    layout: str | None = None
    time_before_ms: float | None = None
    time_after_ms: float | None = None


_SPEC = tuple(f.name for f in dataclasses.fields(LayerSpec))
_PLAN = ("method", "rank", "exact_rank", "rank_source", "layout")


@dataclass
class LayerRecord:
    """What happened to one conv.

    ``status`` is ``"converted"`` or ``"skipped"``; a skipped layer has a ``skip`` (``reason_code`` and
    ``reason``). FLOPs are counted by ``FlopCounterMode`` at the layer's real input shape(s) on the example input
    (FLOPs = 2 × MACs); ``rel_error`` is ``‖W − Ŵ‖ / ‖W‖`` of the (BatchNorm-folded) kernel. With calibration data,
    ``calib_error_before``/``after`` are the layer's relative output error on that data (in the converted model,
    every earlier layer already refitted) before and after the refit. ``output_error`` (ONNX) is the relative error
    of the layer's output in the converted model against the original, both run in onnxruntime on random inputs.
    ``time_before_ms``/``time_after_ms`` (latency objective): the dense conv's and the replacement's measured times.
    """

    spec: LayerSpec
    skip: Skip | None = None
    plan: Plan | None = None
    status: str = "skipped"
    flops_before: int = 0
    flops_after: int = 0
    params_before: int = 0
    params_after: int = 0
    rel_error: float | None = None
    bn_folded: str | None = None
    calib_error_before: float | None = None
    calib_error_after: float | None = None
    output_error: float | None = None
    notes: list[Note] = field(default_factory=list)
    _time_before_ms: float | None = None  # measured on a layer kept dense for its time (no plan left)

    # --- views of the parts

    def __getattr__(self, name: str) -> Any:
        if name in _SPEC:
            return getattr(self.spec, name)
        if name in _PLAN:
            return getattr(self.plan, name) if self.plan is not None else None
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    @property
    def converted(self) -> bool:
        return self.status == "converted"

    @property
    def reason(self) -> str | None:
        return self.skip.text if self.skip is not None else None

    @property
    def reason_code(self) -> Reason | None:
        return self.skip.code if self.skip is not None else None

    @property
    def note(self) -> str | None:
        """The notes' texts joined by ``"; "`` (``None`` without notes)."""
        return "; ".join(n.text for n in self.notes) or None

    @property
    def time_before_ms(self) -> float | None:
        return self.plan.time_before_ms if self.plan is not None else self._time_before_ms

    @property
    def time_after_ms(self) -> float | None:
        return self.plan.time_after_ms if self.plan is not None else None

    # --- changes, as the pipeline makes them

    def skip_with(self, code: Reason, text: str) -> None:
        """Leave the layer dense, saying why; a plan's measured dense time is kept."""
        if self.plan is not None:
            self._time_before_ms = self.plan.time_before_ms
        self.skip, self.plan = Skip(code, text), None

    def add_note(self, code: NoteCode, text: str) -> None:
        if all(n.text != text for n in self.notes):
            self.notes.append(Note(code, text))

    def has_note(self, code: NoteCode) -> bool:
        return any(n.code == code for n in self.notes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data with the flat keys of earlier versions, plus ``reason_code`` and ``notes``."""
        doc: dict[str, Any] = {k: getattr(self.spec, k) for k in _SPEC}
        doc.update(status=self.status, reason=self.reason, reason_code=self.reason_code.value if self.skip else None)
        doc.update({k: getattr(self, k) for k in _PLAN})
        for k in ("flops_before", "flops_after", "params_before", "params_after", "rel_error", "bn_folded",
                  "calib_error_before", "calib_error_after", "output_error"):
            doc[k] = getattr(self, k)
        doc.update(time_before_ms=self.time_before_ms, time_after_ms=self.time_after_ms, note=self.note,
                   notes=[{"code": n.code.value, "text": n.text} for n in self.notes])
        return doc


@dataclass
class SearchTry:
    """One plan the ``max_drop`` search built, calibrated and evaluated.

    Attributes:
        budget: the latency budget tried (fraction of the original's time on the target).
        flops_ratio: whole-model FLOPs converted / original.
        time_ratio: whole-model time converted / original, measured on the target (same run, interleaved).
        metric: ``evaluate(converted)``.
        within: ``metric >= original metric - max_drop``.
        chosen: the plan returned (the fastest within the budget; the original itself when none was).
        converted: how many conv layers the plan replaced.
    """

    budget: float
    flops_ratio: float
    time_ratio: float | None
    metric: float
    within: bool
    converted: int
    chosen: bool = False


@dataclass
class Search:
    """What ``convert(..., max_drop=D, evaluate=f)`` explored: the original's metric and every try, in order."""

    metric: str  # what ``evaluate`` measures, e.g. "top-1 accuracy (1000 held-out images)"
    original: float
    max_drop: float
    target: str  # the latency target, described
    tries: list[SearchTry] = field(default_factory=list)

    @property
    def chosen(self) -> SearchTry | None:
        return next((t for t in self.tries if t.chosen), None)

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "original": self.original, "max_drop": self.max_drop, "target": self.target,
                "tries": [dataclasses.asdict(t) for t in self.tries]}


@dataclass
class ConvertResult:
    """The converted model and what was done.

    Attributes:
        model: the converted model (a ``torch.fx.GraphModule`` on the fx path, the model's own class on the
            module-tree path, an ``onnx_ir.Model`` for ONNX input).
        layers: one :class:`LayerRecord` per conv, in graph (or module-tree) order.
        path: ``"fx"``, ``"module-tree"`` or ``"onnx"``.
        trace_error: why torch.fx tracing failed when the module-tree path was used.
        flops_before, flops_after: whole-model FLOPs on the example input (FLOPs = 2 × MACs).
        params_before, params_after: parameter counts.
        flops_budget: the FLOPs the target allowed (``flops`` selection only).
        warnings: messages worth showing the user (also issued with ``warnings.warn``).
        latency_before, latency_after: with ``objective="latency"``, both whole models timed on the target in the
            same run (:class:`~separify.core.measure.Timing`); ``latency_predicted`` is the ratio the sum of the
            measured layer times predicted; ``latency_target`` describes the target, ``latency_spec`` is it (a
            :class:`~separify.config.LatencyTarget`).
        output_fit: with calibration data, what the output reconstruction did
            (:class:`~separify.calibration.output.OutputFit`; ``None`` when it was off).
    """

    model: Any
    layers: list[LayerRecord]
    path: str
    config: ConvertConfig
    trace_error: str | None = None
    flops_before: int = 0
    flops_after: int = 0
    params_before: int = 0
    params_after: int = 0
    flops_budget: int | None = None
    warnings: list[str] = field(default_factory=list)
    latency_before: measure.Timing | None = None
    latency_after: measure.Timing | None = None
    latency_predicted: float | None = None
    latency_target: str | None = None
    latency_spec: Any = None  # the LatencyTarget timed on (latency objective)
    search: Search | None = None
    seconds: float | None = None
    output_fit: Any = None

    @property
    def converted(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.converted]

    @property
    def skipped(self) -> list[LayerRecord]:
        return [r for r in self.layers if not r.converted]

    @property
    def flops_ratio(self) -> float:
        return self.flops_after / self.flops_before if self.flops_before else 1.0

    @property
    def latency_ratio(self) -> float | None:
        """Converted / original whole-model time on the latency target (``objective="latency"`` only)."""
        if self.latency_before is None or self.latency_after is None or not self.latency_before.median_ms > 0:
            return None
        return self.latency_after.median_ms / self.latency_before.median_ms

    def feature_pairs(self) -> dict[str, str]:
        """Converted layer name → name of the original module its output reproduces (the conv, or its folded
        BatchNorm): the ``features`` argument of :func:`separify.finetune` for a feature-distillation term."""
        return {r.name: r.bn_folded or r.name for r in self.converted}

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready) without the model."""
        return {
            "path": self.path,
            "trace_error": self.trace_error,
            "config": self.config.to_dict(),
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "flops_budget": self.flops_budget,
            "latency_target": self.latency_target,
            "latency_before": dataclasses.asdict(self.latency_before) if self.latency_before else None,
            "latency_after": dataclasses.asdict(self.latency_after) if self.latency_after else None,
            "latency_predicted": self.latency_predicted,
            "search": self.search.to_dict() if self.search is not None else None,
            "seconds": self.seconds,
            "warnings": list(self.warnings),
            "layers": [r.to_dict() for r in self.layers],
        }


def new_record(spec: LayerSpec, flops: int, params: int) -> LayerRecord:
    """A fresh record of a conv that costs ``flops`` and holds ``params`` (before and, until converted, after)."""
    return LayerRecord(spec, flops_before=flops, flops_after=flops, params_before=params, params_after=params)

