"""The report's data model and its JSON form.

Nothing in a :class:`Report` is estimated: every figure was measured in the run that built it. What was not
measured is a :class:`NotMeasured` with the reason (no ONNX Runtime, the export failed, the layer is unchanged...).
:meth:`Report.to_dict` is the JSON document (versioned schema :func:`schema`, every figure with its unit);
:meth:`Comparison.to_dict` wraps several of them.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from separify.core.measure import Timing
from separify.records import ConvertResult, Search
from separify.reporting.verdict import Verdict, verdict

__all__ = ["Report", "ModelFigures", "Latency", "Quality", "LayerFigures", "NotMeasured", "Comparison", "write_json",
           "SCHEMA", "SCHEMA_VERSION", "schema", "fig", "timing_doc", "conversion_doc", "search_doc", "MEASURED",
           "FROM_CHECK"]

SCHEMA = "separify-report"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class NotMeasured:
    """A figure that this run did not measure, and why."""

    why: str


@dataclass(frozen=True)
class ModelFigures:
    """Whole-model figures of one model. ``flops`` by FlopCounterMode at the report's input (FLOPs = 2 × MACs)."""

    flops: int
    params: int
    state_dict_bytes: int
    file: str | None = None
    file_bytes: int | None = None


#: :attr:`Latency.source` of a row timed by the report itself
MEASURED = "report"
#: :attr:`Latency.source` of a row that carries the conversion's own check (same target), not timed again
FROM_CHECK = "conversion check"


@dataclass(frozen=True)
class Latency:
    """Both models timed on one backend (``torch-cpu``, ``torch-cuda`` or ``onnxruntime-cpu``) in the same run.

    ``source``: :data:`MEASURED` (timed by this report) or :data:`FROM_CHECK` (the conversion's whole-model check
    on an equivalent target, reused)."""

    backend: str
    original: Timing | NotMeasured
    converted: Timing | NotMeasured
    source: str = MEASURED

    @property
    def ratio(self) -> float | None:
        """Median converted / median original, when both were measured (and read above 0)."""
        if (isinstance(self.original, Timing) and isinstance(self.converted, Timing) and self.original.median_ms > 0
                and self.converted.median_ms > 0):
            return self.converted.median_ms / self.original.median_ms
        return None


@dataclass(frozen=True)
class Quality:
    """One quality figure; ``original`` is ``None`` for figures that compare the converted model with the original
    (agreement, output error). ``unit`` is ``"fraction"`` or the user's."""

    metric: str
    data: str
    original: float | None
    converted: float
    unit: str = "fraction"


@dataclass(frozen=True)
class LayerFigures:
    """One original conv and what replaced it.

    ``status``: ``"converted"`` (a separable replacement was found at the layer's name), ``"kept"`` (the same conv
    is still there) or ``"unmatched"`` (nothing recognisable at that name). FLOPs summed over every call of the layer
    on the report's input; latency of one call at its first real input shape. ``selected_ms_before``/``after``
    (``objective="latency"``): the dense conv's and the replacement's times as the selection measured them on the
    latency target.
    """

    name: str
    conv: str
    status: str
    input_shape: tuple[int, ...] | None
    flops_before: int | None
    flops_after: int | None
    latency_before: Timing | NotMeasured
    latency_after: Timing | NotMeasured
    method: str | None = None
    rank: int | None = None
    reason: str | None = None
    note: str | None = None
    kernel_error: float | None = None
    calib_error_before: float | None = None
    calib_error_after: float | None = None
    layout: str | None = None
    selected_ms_before: float | None = None
    selected_ms_after: float | None = None

    @property
    def latency_ratio(self) -> float | None:
        if isinstance(self.latency_before, Timing) and isinstance(self.latency_after, Timing):
            return self.latency_after.median_ms / self.latency_before.median_ms
        return None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Report:
    """Everything one report run measured; :meth:`to_dict` is the JSON document (schema :func:`schema`).

    ``settings`` is the JSON form of how it was measured (device, batch size, threads, input shapes, run times,
    notes); ``conversion`` summarises the :class:`~separify.ConvertResult` when one was given
    (:func:`conversion_doc`); ``not_measured`` is ``((what, why), ...)``.
    """

    original: ModelFigures
    converted: ModelFigures
    latency: tuple[Latency, ...]
    quality: tuple[Quality, ...]
    layers: tuple[LayerFigures, ...]
    settings: Mapping[str, Any]
    environment: Mapping[str, Any]
    conversion: Mapping[str, Any] | None = None
    not_measured: tuple[tuple[str, str], ...] = ()
    created: str = field(default_factory=_now)

    @property
    def flops_ratio(self) -> float:
        return self.converted.flops / self.original.flops if self.original.flops else 1.0

    def quality_of(self, metric: str) -> Quality | None:
        return next((q for q in self.quality if q.metric == metric), None)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document: every figure is ``{"value": ..., "unit": ...}``; what was not measured is
        ``{"not_measured": "why"}``."""
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "created": self.created,
            "environment": dict(self.environment),
            "settings": dict(self.settings),
            "conversion": dict(self.conversion) if self.conversion is not None else None,
            "models": {"original": _model_dict(self.original), "converted": _model_dict(self.converted)},
            "ratios": {
                "flops": fig(self.flops_ratio, "ratio"),
                "parameters": fig(self.converted.params / max(self.original.params, 1), "ratio"),
            },
            "latency": [_latency_dict(lat) for lat in self.latency],
            "quality": [{"metric": q.metric, "data": q.data,
                         "original": fig(q.original, q.unit) if q.original is not None else None,
                         "converted": fig(q.converted, q.unit)} for q in self.quality],
            "layers": [_layer_dict(r) for r in self.layers],
            "not_measured": [{"what": w, "why": y} for w, y in self.not_measured],
            "verdict": self.verdict().to_dict(),
        }

    def verdict(self) -> Verdict:
        """What the conversion gave in a sentence, and the next step (:mod:`~separify.reporting.verdict`)."""
        return verdict(self)


@dataclass(frozen=True)
class Comparison:
    """Reports of several conversions of one model (e.g. FLOPs targets 0.75/0.5/0.25, both forms), in one run.

    ``runs`` is ``((label, settings, report), ...)``; ``settings`` holds the conversion options that differ.
    """

    runs: tuple[tuple[str, Mapping[str, Any], Report], ...]

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows (the original first, then one per setting) of the trade-off table; "—" where a run has
        no such figure (not measured, or not defined for the original, e.g. agreement with itself)."""
        missing = "—"
        first = self.runs[0][2]
        backends = [lat.backend for lat in first.latency]
        metrics = [q.metric for q in first.quality]
        head = ["setting", "FLOPs ratio", "params ratio"] + [f"latency ratio, {b}" for b in backends] + metrics
        rows = [["original", "1.000", "1.000"] + ["1.000"] * len(backends)
                + [missing if q.original is None else f"{q.original:.4f}" for q in first.quality]]
        for label, _, rep in self.runs:
            lat = {lt.backend: lt.ratio for lt in rep.latency}
            qual = {q.metric: q.converted for q in rep.quality}
            rows.append([label, f"{rep.flops_ratio:.3f}", f"{rep.converted.params / max(rep.original.params, 1):.3f}"]
                        + [missing if lat.get(b) is None else f"{lat[b]:.3f}" for b in backends]
                        + [missing if qual.get(m) is None else f"{qual[m]:.4f}" for m in metrics])
        return head, rows

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "separify-comparison", "schema_version": SCHEMA_VERSION,
                "runs": [{"label": label, "settings": dict(s), "report": rep.to_dict()} for label, s, rep in self.runs]}


# --------------------------------------------------------------------------------------------------------------
# JSON


def fig(value, unit: str) -> dict[str, Any]:
    """One figure of the JSON document: ``{"value": value, "unit": unit}``."""
    return {"value": value, "unit": unit}


def _opt_fig(value, unit: str) -> dict[str, Any] | None:
    return fig(value, unit) if value is not None else None


def timing_doc(t: Timing | NotMeasured) -> dict[str, Any]:
    """A timing as JSON (median and IQR in ms, runs, threads...), or ``{"not_measured": why}``."""
    if isinstance(t, NotMeasured):
        return {"not_measured": t.why}
    return {"median": fig(t.median_ms, "ms"), "iqr": fig(t.iqr_ms, "ms"), "runs": t.runs, "blocks": t.blocks,
            "threads": t.threads, "batch_size": t.batch_size, "noisy": t.noisy, "suspect": t.suspect}


def _latency_dict(lat: Latency) -> dict[str, Any]:
    return {"backend": lat.backend, "source": lat.source, "original": timing_doc(lat.original),
            "converted": timing_doc(lat.converted),
            "ratio": fig(lat.ratio, "ratio") if lat.ratio is not None else {"not_measured": "needs both timings"}}


def _model_dict(m: ModelFigures) -> dict[str, Any]:
    return {"flops": fig(m.flops, "FLOP"), "macs": fig(m.flops // 2, "MAC"), "parameters": fig(m.params, "count"),
            "state_dict_size": fig(m.state_dict_bytes, "byte"), "file": m.file,
            "file_size": _opt_fig(m.file_bytes, "byte")}


def _layer_dict(r: LayerFigures) -> dict[str, Any]:
    flops = (lambda v: fig(v, "FLOP") if v is not None else {"not_measured": "layer not called on the input"})
    return {
        "name": r.name, "conv": r.conv, "status": r.status, "method": r.method, "rank": r.rank, "reason": r.reason,
        "note": r.note, "input_shape": list(r.input_shape) if r.input_shape else None,
        "flops_before": flops(r.flops_before), "flops_after": flops(r.flops_after),
        "latency_before": timing_doc(r.latency_before), "latency_after": timing_doc(r.latency_after),
        "kernel_error": _opt_fig(r.kernel_error, "relative"),
        "calib_error_before": _opt_fig(r.calib_error_before, "relative"),
        "calib_error_after": _opt_fig(r.calib_error_after, "relative"),
        "layout": r.layout,
        "selected_ms_before": _opt_fig(r.selected_ms_before, "ms"),
        "selected_ms_after": _opt_fig(r.selected_ms_after, "ms"),
    }


def conversion_doc(result: ConvertResult | None) -> dict[str, Any] | None:
    """The ``conversion`` entry of a report: form, rank selection and its value (``target``), path, layer counts,
    FLOPs ratio, whether calibrated, objective, warnings, and under ``objective="latency"`` the whole-model times
    the selection measured on its target (``latency_selection``), after a ``max_drop`` search every plan it
    tried (``search``, :func:`search_doc`), and with calibration data what the output reconstruction did
    (``output_reconstruction``: relative output errors on the held-out calibration samples). ``None`` without a
    result."""
    if result is None:
        return None
    cfg = result.config
    doc = {"method": cfg.method, "selection": cfg.selection, "target": cfg.ranks.value, "path": result.path,
           "trace_error": result.trace_error, "converted_layers": len(result.converted),
           "conv_layers": len(result.layers),
           "flops_ratio_at_example_input": fig(result.flops_ratio, "ratio"),
           "calibrated": any(r.calib_error_after is not None for r in result.layers),
           "objective": cfg.objective,
           "warnings": list(result.warnings)}
    if cfg.objective == "latency" and result.latency_target is not None:
        doc["latency_selection"] = {
            "target": result.latency_target,
            "original": timing_doc(result.latency_before) if result.latency_before else None,
            "converted": timing_doc(result.latency_after) if result.latency_after else None,
            "ratio": _opt_fig(result.latency_ratio, "ratio"),
            "predicted_ratio": _opt_fig(result.latency_predicted, "ratio"),
        }
    if getattr(result, "search", None) is not None:
        doc["search"] = search_doc(result.search)
    fit = getattr(result, "output_fit", None)
    if fit is not None:
        doc["output_reconstruction"] = {"steps": fit.steps, "planned_steps": fit.planned or fit.steps,
                                        "held_out_samples": fit.held, "kept": fit.kept,
                                        "error_before": fit.error_before, "error_after": fit.error_after,
                                        "note": fit.note, "seconds": fit.seconds, "precision": fit.precision}
    return doc


def search_doc(search: Search) -> dict[str, Any]:
    """The ``max_drop`` search as JSON: what was measured (``metric``), on which ``target``, the original's value,
    the allowed drop and the ``floor`` (original − max_drop), one entry per try in order (latency budget, FLOPs and
    time ratios, the metric, its ``change`` from the original, ``within`` the drop, layers converted, ``chosen``),
    and ``chosen``: the index of the chosen try (``null``: none was within the drop; the original was kept)."""
    tries = [{"budget": fig(t.budget, "ratio"), "flops_ratio": fig(t.flops_ratio, "ratio"),
              "time_ratio": fig(t.time_ratio, "ratio") if t.time_ratio is not None else
              {"not_measured": "the try was not timed whole"},
              "metric": fig(t.metric, "user"), "change": fig(t.metric - search.original, "user"),
              "within": bool(t.within), "converted_layers": int(t.converted), "chosen": bool(t.chosen)}
             for t in search.tries]
    return {"metric": search.metric, "target": search.target, "original": fig(search.original, "user"),
            "max_drop": fig(search.max_drop, "user"), "floor": fig(search.original - search.max_drop, "user"),
            "tries": tries, "chosen": next((i for i, t in enumerate(search.tries) if t.chosen), None)}


def schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) that every :meth:`Report.to_dict` document validates against."""
    return json.loads((Path(__file__).parent / "report.schema.json").read_text())


def write_json(doc: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write a report (or comparison) document atomically (tuples and sets as lists, paths as strings; NaN is
    refused)."""
    from separify.io.files import atomic_write

    text = json.dumps(doc, indent=2, allow_nan=False, default=_json_default)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))


def _json_default(obj):
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")
