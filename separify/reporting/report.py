"""The before/after report: FLOPs, parameters, size, latency and quality of the original and the converted model,
for the whole model and per conv layer; printed with rich, written as JSON (versioned schema, every figure with its
unit) and as a self-contained HTML page (:mod:`separify.html_report`).

Nothing in a :class:`Report` is estimated: every figure was measured in the run that built it. What was not
measured is a :class:`NotMeasured` with the reason (no ONNX Runtime, the export failed, the layer is unchanged...).

Layers are paired by name. For every ``nn.Conv2d`` of the original, the converted model holds at the same name either
a separable module (:class:`~separify.SeparableConv2d`, or the 1×1/depthwise convs under that name when the model was
loaded back from a ``torch.export`` program), or the same conv (kept). With the :class:`~separify.ConvertResult` of
the conversion, the per-layer record (method, rank, reason for keeping, errors) joins the row.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from separify.pipeline import ConvertResult, LayerRecord
from separify.errors import SeparifyError, first_line
from separify.core.measure import (Timing, agreement, conv_input_shapes, count_flops, count_params, cpu_name, export_onnx,
                      first_output, frozen_mode, module_flops, param_dtype, state_dict_bytes, time_onnxruntime,
                      time_torch, topk_accuracy)
from separify.core.modules import SeparableConv2d

__all__ = ["Report", "ModelFigures", "Latency", "Quality", "LayerFigures", "NotMeasured", "report", "print_report",
           "report_onnx", "write_json", "SCHEMA", "SCHEMA_VERSION", "schema"]

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


@dataclass(frozen=True)
class Latency:
    """Both models timed on one backend (``torch-cpu``, ``torch-cuda`` or ``onnxruntime-cpu``) in the same run."""

    backend: str
    original: Timing | NotMeasured
    converted: Timing | NotMeasured

    @property
    def ratio(self) -> float | None:
        """Median converted / median original, when both were measured."""
        if isinstance(self.original, Timing) and isinstance(self.converted, Timing) and self.original.median_ms > 0:
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
    on the report's input; latency of one call at its first real input shape.
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
    selected_ms_before: float | None = None  # objective="latency": as measured on the target by the selection
    selected_ms_after: float | None = None

    @property
    def latency_ratio(self) -> float | None:
        if isinstance(self.latency_before, Timing) and isinstance(self.latency_after, Timing):
            return self.latency_after.median_ms / self.latency_before.median_ms
        return None


@dataclass(frozen=True)
class Report:
    """Everything one report run measured; :meth:`to_dict` is the JSON document (schema :func:`schema`)."""

    original: ModelFigures
    converted: ModelFigures
    latency: tuple[Latency, ...]
    quality: tuple[Quality, ...]
    layers: tuple[LayerFigures, ...]
    settings: Mapping[str, Any]
    environment: Mapping[str, Any]
    conversion: Mapping[str, Any] | None = None
    not_measured: tuple[tuple[str, str], ...] = ()
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))

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
                "flops": _fig(self.flops_ratio, "ratio"),
                "parameters": _fig(self.converted.params / max(self.original.params, 1), "ratio"),
            },
            "latency": [{"backend": lat.backend, "original": _timing(lat.original), "converted": _timing(lat.converted),
                         "ratio": _fig(lat.ratio, "ratio") if lat.ratio is not None
                         else {"not_measured": "needs both timings"}} for lat in self.latency],
            "quality": [{"metric": q.metric, "data": q.data,
                         "original": _fig(q.original, q.unit) if q.original is not None else None,
                         "converted": _fig(q.converted, q.unit)} for q in self.quality],
            "layers": [_layer_dict(r) for r in self.layers],
            "not_measured": [{"what": w, "why": y} for w, y in self.not_measured],
        }


def _fig(value, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit}


def _timing(t: Timing | NotMeasured) -> dict[str, Any]:
    if isinstance(t, NotMeasured):
        return {"not_measured": t.why}
    return {"median": _fig(t.median_ms, "ms"), "iqr": _fig(t.iqr_ms, "ms"), "runs": t.runs, "blocks": t.blocks,
            "threads": t.threads, "batch_size": t.batch_size, "noisy": t.noisy}


def _model_dict(m: ModelFigures) -> dict[str, Any]:
    return {"flops": _fig(m.flops, "FLOP"), "macs": _fig(m.flops // 2, "MAC"), "parameters": _fig(m.params, "count"),
            "state_dict_size": _fig(m.state_dict_bytes, "byte"), "file": m.file,
            "file_size": _fig(m.file_bytes, "byte") if m.file_bytes is not None else None}


def _layer_dict(r: LayerFigures) -> dict[str, Any]:
    flops = (lambda v: _fig(v, "FLOP") if v is not None else {"not_measured": "layer not called on the input"})
    return {
        "name": r.name, "conv": r.conv, "status": r.status, "method": r.method, "rank": r.rank, "reason": r.reason,
        "note": r.note, "input_shape": list(r.input_shape) if r.input_shape else None,
        "flops_before": flops(r.flops_before), "flops_after": flops(r.flops_after),
        "latency_before": _timing(r.latency_before), "latency_after": _timing(r.latency_after),
        "kernel_error": _fig(r.kernel_error, "relative") if r.kernel_error is not None else None,
        "calib_error_before": _fig(r.calib_error_before, "relative") if r.calib_error_before is not None else None,
        "calib_error_after": _fig(r.calib_error_after, "relative") if r.calib_error_after is not None else None,
        "layout": r.layout,
        "selected_ms_before": _fig(r.selected_ms_before, "ms") if r.selected_ms_before is not None else None,
        "selected_ms_after": _fig(r.selected_ms_after, "ms") if r.selected_ms_after is not None else None,
    }


def schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) that every :meth:`Report.to_dict` document validates against."""
    return json.loads((Path(__file__).parent / "report.schema.json").read_text())


def write_json(doc: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write a report (or comparison) document atomically."""
    from separify.io.models import atomic_write

    text = json.dumps(doc, indent=2, allow_nan=False, default=_json_default)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))


def _json_default(obj):
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


# --------------------------------------------------------------------------------------------------------------
# Building a report


def report(
    original: nn.Module,
    converted: nn.Module | ConvertResult,
    *,
    example_inputs: Any,
    data: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    data_name: str | None = None,
    metrics: Mapping[str, Callable[[nn.Module], float]] | None = None,
    device: str = "cpu",
    fallback_to_cpu: bool = False,
    batch_size: int | None = None,
    threads: int | None = None,
    latency: bool = True,
    onnx: bool = True,
    per_layer: bool = True,
    min_run_time: float = 0.5,
    layer_min_run_time: float = 0.05,
    random_samples: int = 64,
    class_dim: int = 1,
    files: tuple[str | os.PathLike | None, str | os.PathLike | None] = (None, None),
    progress: bool = False,
    seed: int = 0,
) -> Report:
    """Measure ``original`` and ``converted`` side by side.

    Args:
        original: the model before conversion.
        converted: the converted model, or the :class:`~separify.ConvertResult` of :func:`separify.convert` (its
            per-layer record then joins the layer rows).
        example_inputs: a tensor or tuple of tensors both models accept. Timing, FLOPs and layer shapes use it,
            repeated (first sample) to ``batch_size`` when that is given.
        data, labels: evaluation inputs ``(N, ...)`` and optional integer labels ``(N,)``: with labels, top-1 (and
            top-5 when there are more than 5 classes) accuracy of both models; always the agreement of the
            converted model with the original (top-1 agreement, relative output error). Without ``data`` the
            agreement is measured on ``random_samples`` standard-normal inputs, and the report says so.
        metrics: ``{name: fn}``; ``fn(model) -> float`` is called on both models (e.g. your own validation loop).
        device: ``"cpu"`` or ``"cuda"`` for the PyTorch timings (ONNX Runtime always runs on the CPU). A missing
            GPU is an error unless ``fallback_to_cpu``.
        threads: intra-op threads for PyTorch CPU and ONNX Runtime (default: PyTorch's current setting).
        latency, onnx, per_layer: turn off whole-model timing, the ONNX Runtime timing, per-layer timing.
        min_run_time, layer_min_run_time: seconds of timed runs per model / per layer (after warm-up).
        files: the two models' files, for their sizes.
        progress: show a progress bar (stderr) over the measurements.

    Raises:
        SeparifyError: the models' outputs differ in shape, the data does not fit, the device is missing.
    """
    result = converted if isinstance(converted, ConvertResult) else None
    model = result.model if result is not None else converted
    device, notes = _resolve_device(device, fallback_to_cpu)
    inputs = _batched(example_inputs, batch_size)
    threads = threads or torch.get_num_threads()
    _check_outputs(original, model, inputs)
    not_measured: list[tuple[str, str]] = []

    with ExitStack() as stack:
        bar = _progress(stack, progress)
        bar.step("counting FLOPs and parameters")
        figures = tuple(_model_figures(m, inputs, f) for m, f in ((original, files[0]), (model, files[1])))
        bar.step("measuring quality")
        quality = _quality(original, model, data, labels, data_name, metrics, inputs, random_samples, class_dim, seed)

        latencies: list[Latency] = []
        if latency:
            bar.step(f"timing both models in PyTorch ({device})")
            latencies.append(Latency(f"torch-{device}", *time_torch([original, model], inputs, device=device,
                                                                    threads=threads, min_run_time=min_run_time)))
            if onnx:
                bar.step("exporting both models to ONNX and timing them in ONNX Runtime")
                latencies.append(_onnxruntime(original, model, inputs, threads, min_run_time))
            for lat in latencies:
                for side in ("original", "converted"):
                    t = getattr(lat, side)
                    if isinstance(t, NotMeasured):
                        not_measured.append((f"{lat.backend} latency of the {side} model", t.why))
        else:
            not_measured.append(("whole-model latency", "turned off (latency=False / --no-timing)"))

        layers = _layers(original, model, inputs, result, device, threads, layer_min_run_time if per_layer else None,
                         bar)
        if not per_layer:
            not_measured.append(("per-layer latency", "turned off (per_layer=False / --no-layers)"))

    if data is None:
        notes = notes + ["quality figures compare the two models on random inputs, which says little about accuracy "
                         "on real data; give data (--data) for that"]
    settings = {
        "device": device,
        "batch_size": int(inputs[0].shape[0]) if inputs and inputs[0].dim() else None,
        "threads": threads,
        "input_shapes": [list(t.shape) for t in inputs],
        "min_run_time": _fig(min_run_time, "s"),
        "layer_min_run_time": _fig(layer_min_run_time, "s"),
        "notes": notes,
    }
    return Report(figures[0], figures[1], tuple(latencies), tuple(quality), tuple(layers), settings,
                  _environment(device, threads), _conversion(result), tuple(not_measured))


def report_onnx(
    original: str | os.PathLike,
    converted: str | os.PathLike,
    *,
    result: ConvertResult | None = None,
    input_shapes: Mapping[str, Sequence[int]] | Sequence[int] | None = None,
    data: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    data_name: str | None = None,
    threads: int | None = None,
    latency: bool = True,
    min_run_time: float = 0.5,
    random_samples: int = 64,
    class_dim: int = 1,
    progress: bool = False,
    seed: int = 0,
) -> Report:
    """The report for two ONNX files (the original and the converted model), everything run in onnxruntime.

    FLOPs are those of the Conv, Gemm and MatMul nodes (:func:`separify.onnx_pass.onnx_flops`); parameters are the
    initializers' elements; latency is onnxruntime on the CPU, both models in the same run (:func:`time_onnxruntime`);
    quality as in :func:`report`, with both models run by onnxruntime. Layers are paired by node name
    (:func:`separify.onnx_pass.pair_layers`); per-layer latency is not measured for ONNX models. ``result`` (the
    conversion's record) adds ranks, errors and reasons.
    """
    from separify.backends.onnx import onnx_pass

    models = [onnx_pass.load_onnx(p) for p in (original, converted)]
    feeds = onnx_pass.example_feeds(models[0], input_shapes, seed=seed)
    threads = threads or torch.get_num_threads()
    inputs = tuple(torch.from_numpy(v) for v in feeds.values())
    not_measured: list[tuple[str, str]] = [
        ("PyTorch latency", "the models are ONNX files; they are timed in onnxruntime"),
        ("per-layer latency", "measured for PyTorch models only; ONNX models are timed whole")]
    with ExitStack() as stack:
        bar = _progress(stack, progress)
        bar.step("counting FLOPs and parameters")
        figures = tuple(ModelFigures(onnx_pass.onnx_flops(m, feeds, threads=threads), onnx_pass.onnx_params(m),
                                     onnx_pass.initializer_bytes(m),
                                     str(p), os.path.getsize(p)) for m, p in zip(models, (original, converted)))
        runners = [onnx_pass.OrtModule(m, threads=threads) for m in models]
        _check_outputs(*runners, inputs)
        bar.step("measuring quality")
        quality = _quality(*runners, data, labels, data_name, None, inputs, random_samples, class_dim, seed)
        latencies = []
        if latency:
            bar.step("timing both models in onnxruntime")
            latencies.append(Latency("onnxruntime-cpu", *time_onnxruntime([original, converted], inputs,
                                                                          threads=threads, min_run_time=min_run_time)))
        else:
            not_measured.append(("whole-model latency", "turned off (latency=False / --no-timing)"))
        bar.step("pairing the layers")
        records = {r.name: r for r in result.layers} if result is not None else {}
        layers = []
        for pair in onnx_pass.pair_layers(*models, feeds, threads=threads):
            rec = records.get(pair.name)
            reason = rec.reason if rec is not None else None
            if pair.status == "kept" and reason is None:
                reason = "the same conv is in both models"
            elif pair.status == "unmatched":
                reason = "no Conv node, or nodes written by separify, at this name in the converted model"
            why = NotMeasured("per-layer timing is for PyTorch models only")
            layers.append(LayerFigures(
                name=pair.name, conv=conv_desc(pair.in_channels, pair.out_channels, pair.kernel_size, pair.stride,
                                               pair.groups),
                status=pair.status, input_shape=pair.input_shape, flops_before=pair.flops_before,
                flops_after=pair.flops_after, latency_before=why, latency_after=why,
                method=pair.method, rank=pair.rank, reason=reason, note=_note(rec),
                kernel_error=rec.rel_error if rec is not None else None,
                calib_error_before=rec.calib_error_before if rec is not None else None,
                calib_error_after=rec.calib_error_after if rec is not None else None))
    notes = ["FLOPs: Conv, Gemm and MatMul nodes only (other ONNX ops, e.g. LSTM, are not counted)"]
    if data is None:
        notes.append("quality figures compare the two models on random inputs, which says little about accuracy "
                     "on real data; give data (--data) for that")
    settings = {
        "device": "cpu",
        "batch_size": int(inputs[0].shape[0]) if inputs and inputs[0].dim() else None,
        "threads": threads,
        "input_shapes": [list(t.shape) for t in inputs],
        "min_run_time": _fig(min_run_time, "s"),
        "layer_min_run_time": _fig(0, "s"),
        "notes": notes,
    }
    return Report(figures[0], figures[1], tuple(latencies), tuple(quality), tuple(layers), settings,
                  _environment("cpu", threads), _conversion(result), tuple(not_measured))


def _resolve_device(device: str, fallback: bool) -> tuple[str, list[str]]:
    if device not in ("cpu", "cuda"):
        raise SeparifyError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        if not fallback:
            raise SeparifyError("device 'cuda' asked for, but PyTorch sees no CUDA GPU here; use --device cpu, or "
                                "--fallback-cpu to measure on the CPU instead")
        return "cpu", ["CUDA was asked for but is not available; measured on the CPU as allowed by fallback"]
    return device, []


def _batched(example_inputs, batch_size: int | None) -> tuple[torch.Tensor, ...]:
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise SeparifyError("the report needs example inputs as tensors (e.g. torch.randn(1, 3, 224, 224))")
    if batch_size is None:
        return inputs
    if batch_size <= 0:
        raise SeparifyError(f"batch size must be a positive integer, got {batch_size}")
    return tuple(t[:1].expand(batch_size, *t.shape[1:]).contiguous() for t in inputs)


def _check_outputs(original: nn.Module, converted: nn.Module, inputs: tuple) -> None:
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


def _model_figures(model: nn.Module, inputs, file) -> ModelFigures:
    size = os.path.getsize(file) if file is not None and os.path.isfile(file) else None
    return ModelFigures(count_flops(model, inputs), count_params(model), state_dict_bytes(model),
                        str(file) if file is not None else None, size)


def _quality(original, converted, data, labels, data_name, metrics, inputs, random_samples, class_dim, seed) -> list[Quality]:
    rows: list[Quality] = []
    if data is None:
        gen = torch.Generator().manual_seed(seed)
        x = inputs[0]
        data = torch.randn((random_samples, *x.shape[1:]), generator=gen, dtype=x.dtype)
        what = f"{random_samples} random normal inputs, no data given"
    else:
        what = data_name or f"{len(data)} given inputs"
    try:
        batch = _eval_batch(original, converted, data, int(inputs[0].shape[0]))
        if labels is not None:
            if len(labels) != len(data):
                raise SeparifyError(f"{len(labels)} labels for {len(data)} inputs")
            accs = [topk_accuracy(m, data, labels, batch_size=batch) for m in (original, converted)]
            for k in sorted(accs[0]):
                rows.append(Quality(f"top-{k} accuracy", what, accs[0][k], accs[1][k]))
        top1, rel = agreement(original, converted, data, class_dim=class_dim, batch_size=batch)
    except SeparifyError:
        raise
    except Exception as exc:
        raise SeparifyError(f"the data ({what}, shape {tuple(data.shape)}) does not fit the models "
                            f"({type(exc).__name__}: {first_line(exc)})") from None
    if top1 is not None:
        rows.append(Quality("top-1 agreement with the original", what, None, top1))
    rows.append(Quality("relative output error vs the original", what, None, rel, "relative"))
    for name, fn in (metrics or {}).items():
        rows.append(Quality(name, "user metric", float(fn(original)), float(fn(converted)), "user"))
    return rows


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


def _onnxruntime(original, converted, inputs, threads, min_run_time) -> Latency:
    backend = "onnxruntime-cpu"
    if importlib.util.find_spec("onnxruntime") is None:
        why = NotMeasured("onnxruntime is not installed (pip install onnxruntime)")
        return Latency(backend, why, why)
    cpu_inputs = tuple(t.cpu() for t in inputs)
    timings: list[Timing | NotMeasured] = []
    with tempfile.TemporaryDirectory(prefix="separify-onnx-") as tmp:
        paths = [Path(tmp) / "original.onnx", Path(tmp) / "converted.onnx"]
        for m, path in zip((original, converted), paths):
            try:
                export_onnx(m, cpu_inputs, path)
                timings.append(time_onnxruntime(path, cpu_inputs, threads=threads, min_run_time=0.01, warmup=1))
            except Exception as exc:  # noqa: BLE001 - a failure is reported, not raised
                what = "ONNX export failed" if not path.exists() else "ONNX Runtime could not run the exported model"
                timings.append(NotMeasured(f"{what}: {first_line(exc)}"))
        if all(isinstance(t, Timing) for t in timings):  # both run: time them again, interleaved, for real
            timings = time_onnxruntime(paths, cpu_inputs, threads=threads, min_run_time=min_run_time)
    return Latency(backend, *timings)


def _environment(device: str, threads: int) -> dict[str, Any]:
    from separify import __version__

    env = {"separify": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": threads}
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        env["onnxruntime"] = None
    env["gpu"] = torch.cuda.get_device_name() if device == "cuda" else None
    return env


def _conversion(result: ConvertResult | None) -> dict[str, Any] | None:
    if result is None:
        return None
    cfg = result.config
    target = {"flops": cfg.flops, "rank": cfg.rank, "energy": cfg.energy, "latency": cfg.latency}.get(cfg.selection)
    doc = {"method": cfg.method, "selection": cfg.selection, "target": target, "path": result.path,
           "trace_error": result.trace_error, "converted_layers": len(result.converted),
           "conv_layers": len(result.layers),
           "flops_ratio_at_example_input": _fig(result.flops_ratio, "ratio"),
           "calibrated": any(r.calib_error_after is not None for r in result.layers),
           "objective": cfg.objective,
           "warnings": list(result.warnings)}
    if cfg.objective == "latency" and result.latency_target is not None:
        doc["latency_selection"] = {
            "target": result.latency_target,
            "original": _timing(result.latency_before) if result.latency_before else None,
            "converted": _timing(result.latency_after) if result.latency_after else None,
            "ratio": _fig(result.latency_ratio, "ratio") if result.latency_ratio is not None else None,
            "predicted_ratio": _fig(result.latency_predicted, "ratio") if result.latency_predicted is not None
            else None,
        }
    return doc


# --------------------------------------------------------------------------------------------------------------
# Layers


def conv_desc(in_channels: int, out_channels: int, kernel_size, stride, groups: int) -> str:
    """``"64→128 3×3 /2"`` (``g4`` appended for grouped convs)."""
    text = f"{in_channels}→{out_channels} {'×'.join(str(v) for v in kernel_size)}"
    stride = tuple(stride)
    if any(s != 1 for s in stride):
        text += f" /{stride[0]}" if len(set(stride)) == 1 else f" /{','.join(str(s) for s in stride)}"
    if groups != 1:
        text += f" g{groups}"
    return text


def _replacement(name: str, new_modules: dict[str, nn.Module], conv_order: list[str]) -> nn.Module | None:
    """The converted model's stand-in for the original conv ``name``: a separable module at that name, or (for a
    model loaded back from ``torch.export``) its convs, called in order."""
    module = new_modules.get(name)
    if isinstance(module, SeparableConv2d):
        return module
    parts = [new_modules[n] for n in conv_order if n.startswith(name + ".")]
    return nn.Sequential(*parts) if parts else None


def _layers(original, converted, inputs, result, device, threads, min_run_time, bar) -> list[LayerFigures]:
    old_convs = [n for n, m in original.named_modules() if isinstance(m, nn.Conv2d)]
    old_modules = dict(original.named_modules())
    new_modules = dict(converted.named_modules())
    new_convs = [n for n, m in new_modules.items() if isinstance(m, nn.Conv2d)]
    shapes = conv_input_shapes(original, inputs, old_convs)
    new_order = [n for n, calls in conv_input_shapes(converted, inputs, new_convs).items() if calls]
    records: dict[str, LayerRecord] = {r.name: r for r in result.layers} if result is not None else {}
    timed = [n for n in old_convs if shapes[n]] if min_run_time is not None else []
    bar.total(len(timed))
    rows = []
    for name in old_convs:
        conv = old_modules[name]
        rec = records.get(name)
        shape = shapes[name][0] if shapes[name] else None
        same = new_modules.get(name)
        if isinstance(same, nn.Conv2d) and not isinstance(same, SeparableConv2d):
            status, new = "kept", same
        else:
            new = _replacement(name, new_modules, new_order)
            status = "converted" if new is not None else "unmatched"
        flops_before = module_flops(conv, shapes[name]) if shapes[name] else None
        flops_after = None
        if shapes[name] and new is not None:
            try:
                flops_after = module_flops(new, shapes[name])
            except Exception:  # noqa: BLE001 - convs lifted from a .pt2 of a non-default layout do not run alone
                flops_after = None
        reason = rec.reason if rec is not None else None
        if status == "kept" and reason is None:
            reason = "the same conv is in both models"
        elif status == "unmatched":
            reason = "no conv or separable module at this name in the converted model"

        before: Timing | NotMeasured
        after: Timing | NotMeasured
        if shape is None:
            before = after = NotMeasured("the layer is not called on the report's input")
        elif min_run_time is None:
            before = after = NotMeasured("per-layer timing turned off")
        else:
            bar.step(f"timing layer {name}")
            x = torch.randn(shape, dtype=param_dtype(conv))
            after = NotMeasured("layer unchanged" if status == "kept" else "no counterpart")
            if status == "converted":
                try:
                    with torch.no_grad(), frozen_mode(new):
                        new(x)
                except Exception as exc:  # noqa: BLE001 - e.g. padding ops of an exported module lost between convs
                    after = NotMeasured(f"the replacement cannot be run on its own ({first_line(exc)})")
                else:
                    before, after = time_torch([conv, new], (x,), device=device, threads=threads,
                                               min_run_time=min_run_time)
            if not isinstance(after, Timing):
                before = time_torch(conv, (x,), device=device, threads=threads, min_run_time=min_run_time)
        rows.append(LayerFigures(
            name=name, conv=conv_desc(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.groups),
            status=status, input_shape=shape, flops_before=flops_before, flops_after=flops_after,
            latency_before=before, latency_after=after,
            method=rec.method if rec is not None else _method_of(new) if status == "converted" else None,
            rank=rec.rank if rec is not None else _rank_of(new) if status == "converted" else None,
            reason=reason, note=_note(rec),
            kernel_error=rec.rel_error if rec is not None else None,
            calib_error_before=rec.calib_error_before if rec is not None else None,
            calib_error_after=rec.calib_error_after if rec is not None else None,
            layout=rec.layout if rec is not None else getattr(new, "layout", None) if status == "converted" else None,
            selected_ms_before=rec.time_before_ms if rec is not None else None,
            selected_ms_after=rec.time_after_ms if rec is not None else None,
        ))
    return rows


def _method_of(module: nn.Module | None) -> str | None:
    if isinstance(module, SeparableConv2d):
        return module.method
    if isinstance(module, nn.Sequential):  # convs of a torch.export-loaded replacement: pw → dw → pw or dw → pw
        kinds = ["pw" if tuple(m.kernel_size) == (1, 1) else "dw" for m in module]
        return "-".join(kinds)
    return None


def _rank_of(module: nn.Module | None) -> int | None:
    """R of pw-dw-pw (the depthwise conv's channels), K of dw-pw (its channel multiplier)."""
    if isinstance(module, SeparableConv2d):
        return module.rank
    if isinstance(module, nn.Sequential):
        dw = next((m for m in module if tuple(m.kernel_size) != (1, 1)), None)
        if dw is not None:
            return dw.out_channels // dw.in_channels if module[0] is dw else dw.out_channels
    return None


def _note(rec: LayerRecord | None) -> str | None:
    if rec is None:
        return None
    timed = None
    if rec.time_before_ms is not None and rec.time_after_ms is not None:
        timed = f"selected on the target: {rec.time_before_ms:.3g} → {rec.time_after_ms:.3g} ms, layout {rec.layout}"
    elif rec.time_before_ms is not None and rec.reason is not None and "measured" not in rec.reason:
        timed = f"dense {rec.time_before_ms:.3g} ms on the target"
    parts = [f"BN {rec.bn_folded} folded" if rec.bn_folded else None, rec.note, timed,
             f"output error {rec.output_error:.3g} (onnxruntime, random inputs)" if rec.output_error is not None
             else None]
    return "; ".join(p for p in parts if p) or None


class _Bar:
    """A rich progress bar on stderr, redrawn at each step (never while timing), or nothing."""

    def __init__(self, progress):
        self._p = progress
        self._task = progress.add_task("report", total=None) if progress is not None else None

    def step(self, what: str) -> None:
        if self._p is not None:
            self._p.update(self._task, description=what, advance=1)
            self._p.refresh()

    def total(self, n: int) -> None:
        if self._p is not None:
            self._p.update(self._task, total=n, completed=0)
            self._p.refresh()


def _progress(stack: ExitStack, on: bool) -> _Bar:
    if not on:
        return _Bar(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=Console(stderr=True), transient=True,
                        auto_refresh=False)  # no refresh thread competing with the timed code; redrawn per step
    stack.enter_context(progress)
    return _Bar(progress)


# --------------------------------------------------------------------------------------------------------------
# Terminal


def _ms(t: Timing | NotMeasured) -> str:
    if isinstance(t, NotMeasured):
        return "—"
    return f"{t.median_ms:.3g} ±{100 * t.spread:.0f}%" + (" [yellow]noisy[/yellow]" if t.noisy else "")


def _mflops(v: int | None) -> str:
    return "—" if v is None else f"{v / 1e6:,.1f}"


def _bytes(v: int | None) -> str:
    return "—" if v is None else f"{v / 1e6:,.2f}"


def _arrow(before: str, after: str) -> str:
    return before if not after else f"{before} → {after}"


def layer_table(rep: Report) -> Table:
    """One row per original conv: what happened to it, FLOPs and latency before → after (``*``: noisy timing)."""
    timed = any(isinstance(r.latency_before, Timing) for r in rep.layers)
    errors = any(r.kernel_error is not None for r in rep.layers)
    calib = any(r.calib_error_after is not None for r in rep.layers)
    title = "Layers (FLOPs = 2 × MACs"
    if timed:
        title += (f"; ms: median of one call at batch {rep.settings.get('batch_size')}, torch "
                  f"{rep.settings.get('device')}, {rep.settings.get('threads')} threads, * = noisy")
    table = Table(title=title + ")")
    cols = [("layer", "left"), ("conv", "left"), ("method", "left"), ("rank", "right"), ("MFLOPs", "right"),
            ("ratio", "right")]
    if timed:
        cols += [("ms", "right"), ("time ratio", "right")]
    if errors:
        cols += [("kernel error", "right")]
    if calib:
        cols += [("output error (calib)", "right")]
    cols += [("notes", "left")]
    for c, j in cols:
        table.add_column(c, justify=j)
    for r in rep.layers:
        converted = r.status == "converted"
        ratio = (f"{r.flops_after / r.flops_before:.3f}" if converted and r.flops_before and r.flops_after is not None
                 else "")
        row = [r.name, r.conv, r.method if converted else "[dim]kept[/dim]", str(r.rank) if r.rank is not None else "",
               _arrow(_mflops(r.flops_before), _mflops(r.flops_after) if converted else ""), ratio]
        if timed:
            lr = r.latency_ratio
            row += [_arrow(_short(r.latency_before), _short(r.latency_after) if converted else ""),
                    "" if lr is None else (f"[red]{lr:.2f}[/red]" if lr > 1 else f"{lr:.2f}")]
        if errors:
            row += [f"{r.kernel_error:.3f}" if r.kernel_error is not None else ""]
        if calib:
            row += [f"{r.calib_error_before:.3f} → {r.calib_error_after:.3f}" if r.calib_error_after is not None else ""]
        row += [r.note or "" if converted else f"[yellow]{r.reason}[/yellow]" + (f"; {r.note}" if r.note else "")]
        table.add_row(*row)
    return table


def _short(t: Timing | NotMeasured) -> str:
    if isinstance(t, NotMeasured):
        return "—"
    return f"{t.median_ms:.3g}" + ("*" if t.noisy else "")


def totals_table(rep: Report) -> Table:
    """Whole-model figures, before and after."""
    table = Table(title="Whole model")
    for c, j in (("", "left"), ("original", "right"), ("converted", "right"), ("converted / original", "right")):
        table.add_column(c, justify=j)
    o, c = rep.original, rep.converted
    table.add_row("FLOPs (M, = 2 × MACs)", _mflops(o.flops), _mflops(c.flops), f"{rep.flops_ratio:.3f}")
    table.add_row("parameters", f"{o.params:,}", f"{c.params:,}", f"{c.params / max(o.params, 1):.3f}")
    table.add_row("state dict size (MB)", _bytes(o.state_dict_bytes), _bytes(c.state_dict_bytes),
                  f"{c.state_dict_bytes / max(o.state_dict_bytes, 1):.3f}")
    if o.file_bytes is not None or c.file_bytes is not None:
        ratio = f"{c.file_bytes / o.file_bytes:.3f}" if o.file_bytes and c.file_bytes is not None else ""
        table.add_row("file size (MB)", _bytes(o.file_bytes), _bytes(c.file_bytes), ratio)
    for lat in rep.latency:
        b = lat.original if isinstance(lat.original, Timing) else lat.converted
        how = f", {b.threads} threads" if isinstance(b, Timing) and b.threads else ""
        ratio = lat.ratio
        table.add_row(f"latency ms, {lat.backend} (median ±IQR{how})", _ms(lat.original), _ms(lat.converted),
                      "—" if ratio is None else (f"[red]{ratio:.3f}[/red]" if ratio > 1 else f"{ratio:.3f}"))
    for q in rep.quality:
        fmt = "{:.4f}" if q.unit in ("fraction", "user") else "{:.3g}"
        table.add_row(f"{q.metric} ({q.data})", "—" if q.original is None else fmt.format(q.original),
                      fmt.format(q.converted), "")
    return table


def print_report(rep: Report, console: Console | None = None) -> None:
    """Print the layer table, the whole-model table and the notes (noisy timings, what was not measured)."""
    console = console or Console()
    if rep.layers:
        console.print(layer_table(rep))
    console.print(totals_table(rep))
    env = rep.environment
    console.print(f"measured on {env.get('cpu')} ({env.get('cpu_count')} logical CPUs"
                  + (f", GPU {env['gpu']}" if env.get("gpu") else "") + f"), torch {env.get('torch')}"
                  + (f", onnxruntime {env['onnxruntime']}" if env.get("onnxruntime") else ""), highlight=False)
    conv = rep.conversion
    if conv is not None:
        line = f"{conv['converted_layers']} of {conv['conv_layers']} conv layers converted via {conv['path']}"
        if conv.get("trace_error"):
            line += f" (torch.fx could not trace the model: {conv['trace_error']})"
        console.print(line)
        if conv["selection"] == "flops":
            console.print(f"FLOPs target {conv['target']:g}: reached {conv['flops_ratio_at_example_input']['value']:.3f}")
        sel = conv.get("latency_selection")
        if sel and sel.get("ratio"):
            line = (f"latency objective on {sel['target']}: whole model {sel['original']['median']['value']:.3g} → "
                    f"{sel['converted']['median']['value']:.3g} ms, ratio {sel['ratio']['value']:.3f}")
            if sel.get("predicted_ratio"):
                line += f" (the layer times predicted {sel['predicted_ratio']['value']:.3f})"
            if conv["selection"] == "latency":
                line += f"; target {conv['target']:g}"
            console.print(line, highlight=False)
        for w in conv["warnings"]:
            console.print(f"[yellow]warning:[/yellow] {w}")
    noisy = [lat.backend for lat in rep.latency for t in (lat.original, lat.converted)
             if isinstance(t, Timing) and t.noisy]
    noisy_layers = sum(isinstance(t, Timing) and t.noisy for r in rep.layers for t in (r.latency_before, r.latency_after))
    if noisy or noisy_layers:
        console.print("[yellow]note:[/yellow] some timings are noisy (IQR above 10% of the median): "
                      + ", ".join(sorted(set(noisy)) + ([f"{noisy_layers} layer timings"] if noisy_layers else []))
                      + "; treat their ratios with care (close other programs, raise --min-time)")
    for note in rep.settings.get("notes", []):
        console.print(f"[yellow]note:[/yellow] {note}")
    for what, why in rep.not_measured:
        console.print(f"not measured: {what}: {why}", highlight=False)


# --------------------------------------------------------------------------------------------------------------
# Several conversions of one model


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
    ``{"method": "dw-pw", "flops": 0.5}``) and :func:`report` each against the original with ``report_options``
    (per-layer timing is off unless ``per_layer=True`` is passed). ``on_result(label, result)`` is called after
    each conversion (e.g. to save the model)."""
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


def print_comparison(comp: Comparison, console: Console | None = None) -> None:
    """One row per setting: FLOPs, parameters, latency ratios and quality."""
    console = console or Console()
    head, rows = comp.table()
    table = Table(title="Conversions compared (ratios are converted / original, measured in this run)")
    for i, h in enumerate(head):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
