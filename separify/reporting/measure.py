"""Building a report: FLOPs, parameters, size, latency and quality of the original and the converted model, for
the whole model and per conv layer, all measured in one run. :func:`report` measures PyTorch models,
:func:`report_onnx` two ONNX files; both take the settings of :class:`~separify.reporting.ReportSettings` as
keyword arguments."""

from __future__ import annotations

import importlib.util
import os
import platform
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from separify.config import DTYPES, LatencyTarget
from separify.core.measure import (Timing, conv_input_shapes, count_flops, count_params, cpu_name, export_onnx,
                                   param_dtype, state_dict_bytes, time_onnxruntime)
from separify.errors import first_line
from separify.records import ConvertResult
from separify.reporting.data import FROM_CHECK, Latency, ModelFigures, NotMeasured, Report, conversion_doc
from separify.reporting.layers import onnx_layers, torch_layers
from separify.reporting.progress import Bar, progress_bar
from separify.reporting.quality import check_outputs, measure_quality
from separify.reporting.settings import ReportSettings, batched, check_matches

__all__ = ["report", "report_onnx"]

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
    class_dim: int | None = None,
    ctc_blank: int | None = None,
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
        files: the two models' files, for their sizes.
        data, labels, data_name, metrics, device, fallback_to_cpu, batch_size, threads, latency, onnx, per_layer,
        min_run_time, layer_min_run_time, random_samples, class_dim, ctc_blank, progress, seed: the fields of
            :class:`~separify.reporting.ReportSettings`.

    Raises:
        SeparifyError: the models' outputs differ in shape, the data does not fit, the device is missing.
    """
    settings = ReportSettings(data=data, labels=labels, data_name=data_name, metrics=metrics,
                              random_samples=random_samples, class_dim=class_dim, ctc_blank=ctc_blank, seed=seed,
                              device=device,
                              fallback_to_cpu=fallback_to_cpu, batch_size=batch_size, threads=threads,
                              latency=latency, onnx=onnx, per_layer=per_layer, min_run_time=min_run_time,
                              layer_min_run_time=layer_min_run_time, progress=progress)
    return _report_torch(original, converted, example_inputs, files, settings)


def _report_torch(original: nn.Module, converted: nn.Module | ConvertResult, example_inputs: Any, files: tuple,
                  settings: ReportSettings) -> Report:
    result = converted if isinstance(converted, ConvertResult) else None
    model = result.model if result is not None else converted
    s, notes = settings.resolved()
    inputs = batched(example_inputs, s.batch_size)
    check_outputs(original, model, inputs)
    with ExitStack() as stack:
        bar = progress_bar(stack, s.progress)
        bar.step("counting FLOPs and parameters")
        figures = tuple(_model_figures(m, inputs, f) for m, f in ((original, files[0]), (model, files[1])))
        bar.step("measuring quality")
        quality = measure_quality(original, model, inputs, s)
        latencies = _torch_latency(original, model, inputs, s, bar, result)
        not_measured = _latency_gaps(latencies, s)
        layers = torch_layers(original, model, inputs, result, s, bar)
        if not s.per_layer:
            not_measured.append(("per-layer latency", "turned off (per_layer=False / --no-layers)"))
    return Report(figures[0], figures[1], tuple(latencies), tuple(quality), tuple(layers), s.document(inputs, notes),
                  _environment(s), conversion_doc(result), tuple(not_measured))


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
    class_dim: int | None = None,
    ctc_blank: int | None = None,
    progress: bool = False,
    seed: int = 0,
) -> Report:
    """The report for two ONNX files (the original and the converted model), everything run in onnxruntime.

    FLOPs are those of the Conv, Gemm and MatMul nodes (:func:`separify.backends.onnx.onnx_flops`); parameters are
    the initializers' elements; latency is onnxruntime on the CPU, both models in the same run
    (:func:`~separify.core.measure.time_onnxruntime`); quality as in :func:`report`, with both models run by
    onnxruntime; a file's size counts the external-data files it references
    (:func:`separify.backends.onnx.onnx_file_bytes`). Layers are paired by node name
    (:func:`separify.backends.onnx.pair_layers`) and named after the layer they came from where the file records it
    (:func:`separify.backends.onnx.source_names`); per-layer latency is not measured for ONNX models. ``result``
    (the conversion's record) adds ranks, errors and reasons. ``input_shapes`` fixes the inputs' dynamic dimensions
    (:func:`separify.backends.onnx.example_feeds`, seeded by ``seed``); the other settings are those of
    :class:`~separify.reporting.ReportSettings`.
    """
    settings = ReportSettings(data=data, labels=labels, data_name=data_name, random_samples=random_samples,
                              class_dim=class_dim, ctc_blank=ctc_blank, seed=seed, threads=threads, latency=latency,
                              per_layer=False, min_run_time=min_run_time, layer_min_run_time=0, progress=progress)
    return _report_onnx((original, converted), result, input_shapes, settings)


def _report_onnx(paths: tuple[str | os.PathLike, str | os.PathLike], result: ConvertResult | None,
                 input_shapes: Any, settings: ReportSettings) -> Report:
    from separify.backends import onnx as onnx_pass

    models = [onnx_pass.load_onnx(p) for p in paths]
    feeds = onnx_pass.example_feeds(models[0], input_shapes, seed=settings.seed)
    s, notes = settings.resolved()
    inputs = tuple(torch.from_numpy(v) for v in feeds.values())
    not_measured = [("PyTorch latency", "the models are ONNX files; they are timed in onnxruntime"),
                    ("per-layer latency", "measured for PyTorch models only; ONNX models are timed whole")]
    with ExitStack() as stack:
        bar = progress_bar(stack, s.progress)
        bar.step("counting FLOPs and parameters")
        figures = tuple(ModelFigures(onnx_pass.onnx_flops(m, feeds, threads=s.threads), onnx_pass.onnx_params(m),
                                     onnx_pass.initializer_bytes(m), str(p), onnx_pass.onnx_file_bytes(p))
                        for m, p in zip(models, paths))
        runners = [onnx_pass.OrtModule(m, threads=s.threads) for m in models]
        check_outputs(*runners, inputs)
        bar.step("measuring quality")
        quality = measure_quality(*runners, inputs, s)
        bar.step("pairing the layers")
        pairs = onnx_pass.pair_layers(*models, feeds, threads=s.threads)
        layers = onnx_layers(models, feeds, result, s.threads, pairs=pairs)  # rows named after the source layers
        latencies = _onnx_latency(paths, inputs, s, bar, result, {p.name: p.input_shape for p in pairs})
        not_measured += _latency_gaps(latencies, s)
    notes = notes + ["FLOPs: Conv, Gemm and MatMul nodes only (other ONNX ops, e.g. LSTM, are not counted)"]
    return Report(figures[0], figures[1], tuple(latencies), tuple(quality), tuple(layers), s.document(inputs, notes),
                  _environment(s), conversion_doc(result), tuple(not_measured))


def _onnx_latency(paths: Sequence, inputs: tuple, settings: ReportSettings, bar: Bar, result: ConvertResult | None,
                  layer_shapes: Mapping[str, tuple | None]) -> list[Latency]:
    """The ``onnxruntime-cpu`` row of two ONNX files: the conversion's check when it timed on an equivalent target
    (:func:`check_timings`), else both timed here, interleaved."""
    if not settings.latency:
        return []
    reused = check_timings(result, "onnxruntime-cpu", settings, inputs, layer_shapes=layer_shapes)
    if reused is not None:
        return [Latency("onnxruntime-cpu", *reused, source=FROM_CHECK)]
    bar.step("timing both models in onnxruntime")
    return [Latency("onnxruntime-cpu", *time_onnxruntime(list(paths), inputs, threads=settings.threads,
                                                         min_run_time=settings.min_run_time))]


def _latency_gaps(latencies: list[Latency], settings: ReportSettings) -> list[tuple[str, str]]:
    """``(what, why)`` for each whole-model timing not measured (or for all of them, when timing is off)."""
    if not settings.latency:
        return [("whole-model latency", "turned off (latency=False / --no-timing)")]
    return [(f"{lat.backend} latency of the {side} model", t.why) for lat in latencies
            for side, t in (("original", lat.original), ("converted", lat.converted)) if isinstance(t, NotMeasured)]


def _model_figures(model: nn.Module, inputs, file) -> ModelFigures:
    return ModelFigures(count_flops(model, inputs), count_params(model), state_dict_bytes(model),
                        str(file) if file is not None else None, _file_bytes(file))


def _file_bytes(file: str | os.PathLike | None) -> int | None:
    """Bytes on disk of a model file (``None``: no file): an ONNX file (by its ``.onnx`` extension) with every
    external-data file it references (:func:`separify.backends.onnx.onnx_file_bytes`), any other the file alone."""
    if file is None or not os.path.isfile(file):
        return None
    if Path(file).suffix.lower() == ".onnx":
        from separify.backends.onnx import onnx_file_bytes

        return onnx_file_bytes(file)
    return os.path.getsize(file)


def _torch_latency(original: nn.Module, converted: nn.Module, inputs: tuple, settings: ReportSettings,
                   bar: Bar, result: ConvertResult | None = None) -> list[Latency]:
    """Both whole models in PyTorch on ``settings.device`` and (``settings.onnx``) in ONNX Runtime. A row whose
    target the conversion's own check timed on (:func:`check_timings`) carries the check's two timings, marked
    :data:`~separify.reporting.data.FROM_CHECK`; the others are timed here, PyTorch with
    :func:`separify.planning.latency.time_model` (the check's protocol) on :func:`report_target`."""
    if not settings.latency:
        return []
    backend = f"torch-{settings.device}"
    reused = check_timings(result, backend, settings, inputs, original)
    if reused is not None:
        latencies = [Latency(backend, *reused, source=FROM_CHECK)]
    else:
        bar.step(f"timing both models in PyTorch ({settings.device})")
        latencies = [Latency(backend, *_time_torch_models([original, converted], inputs, settings))]
    if settings.onnx:
        reused = check_timings(result, "onnxruntime-cpu", settings, inputs, original)
        if reused is not None:
            latencies.append(Latency("onnxruntime-cpu", *reused, source=FROM_CHECK))
        else:
            bar.step("exporting both models to ONNX and timing them in ONNX Runtime")
            latencies.append(_onnxruntime(original, converted, inputs, settings.threads, settings.min_run_time))
    return latencies


def report_target(settings: ReportSettings, inputs: tuple, model: nn.Module) -> LatencyTarget:
    """The :class:`~separify.config.LatencyTarget` a report times PyTorch models on: ``settings.device``, its
    threads, the inputs' batch size, the backend's default memory format (channels-last on the CPU: the original
    is timed both ways, its faster reading kept), the model's dtype where a target takes it (else float32)."""
    dtype = next((name for name, d in DTYPES.items() if d == param_dtype(model)), "float32")
    if settings.device == "cpu" and dtype == "float16":
        dtype = "float32"
    batch = int(inputs[0].shape[0]) if inputs and inputs[0].dim() else None
    return LatencyTarget(backend=settings.device, batch_size=batch, dtype=dtype, threads=settings.threads)


def _time_torch_models(models: list[nn.Module], inputs: tuple, settings: ReportSettings) -> list[Timing]:
    """``models`` timed whole, interleaved, for ``settings.min_run_time`` s each on :func:`report_target`; the first
    (the original) at the faster of its two memory formats, as the conversion's check times it."""
    from separify.planning.latency import time_model

    target = report_target(settings, inputs, models[0])
    return list(time_model(models, inputs, target, run_time=settings.min_run_time, either_format=[True]))


def check_timings(result: ConvertResult | None, backend: str, settings: ReportSettings, inputs: tuple,
                  original: nn.Module | None = None,
                  layer_shapes: Mapping[str, tuple | None] | None = None) -> tuple[Timing, Timing] | None:
    """The conversion's whole-model timings ``(original, converted)`` when its check timed on a target
    equivalent to the report's ``backend`` row, else ``None``.

    Equivalent: torch cpu (cuda) target → ``"torch-cpu"`` (``"torch-cuda"``), onnxruntime → ``"onnxruntime-cpu"``;
    float32, the backend's default memory format; both timings real measurements on that backend (several blocks: an injected timer's single
    reading is not reused) at the report's batch size and (CPU) threads; every conv the record and the report
    both know sees the same input shape past the batch dimension (``layer_shapes``: name → shape; for PyTorch
    they are taken from ``original`` on ``inputs``)."""
    batch = int(inputs[0].shape[0]) if inputs and inputs[0].dim() else None
    if not check_matches(result, backend, settings.threads, batch):
        return None
    timings = (result.latency_before, result.latency_after)
    if not all(isinstance(t, Timing) and t.blocks >= 2 for t in timings):
        return None
    if layer_shapes is None and original is not None:
        if backend.startswith("torch") and param_dtype(original) != torch.float32:
            return None
        layer_shapes = _conv_shapes(original, inputs, [r.name for r in result.layers])
    return timings if _same_inputs(result, layer_shapes or {}) else None


def _conv_shapes(model: nn.Module, inputs: tuple, names: Sequence[str]) -> dict[str, tuple | None]:
    """Name → first input shape on ``inputs`` of each of ``names`` that is a module of ``model``."""
    own = dict(model.named_modules())
    calls = conv_input_shapes(model, inputs, [n for n in names if n in own])
    return {n: c[0] if c else None for n, c in calls.items()}


def _same_inputs(result: ConvertResult, layer_shapes: Mapping[str, tuple | None]) -> bool:
    """Every layer with a recorded input shape and a shape in ``layer_shapes`` agrees past the batch dimension."""
    for rec in result.layers:
        seen, shape = rec.spec.input_shape, layer_shapes.get(rec.name)
        if seen is not None and shape is not None and tuple(seen[1:]) != tuple(shape[1:]):
            return False
    return True


def _onnxruntime(original, converted, inputs, threads, min_run_time) -> Latency:
    """Both models exported to ONNX and timed in ONNX Runtime's CPU provider; a model that fails to export or
    run is :class:`NotMeasured`, with why."""
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


def _environment(settings: ReportSettings) -> dict[str, Any]:
    from separify import __version__

    env = {"separify": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
           "threads": settings.threads}
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        env["onnxruntime"] = None
    env["gpu"] = torch.cuda.get_device_name() if settings.device == "cuda" else None
    return env
