"""How a report measures: one frozen :class:`ReportSettings` shared by :func:`~separify.reporting.report` (PyTorch
models) and :func:`~separify.reporting.report_onnx` (ONNX files), and the example inputs it measures at."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import torch
from torch import nn

from separify.errors import SeparifyError
from separify.reporting.data import fig

__all__ = ["ReportSettings", "batched", "check_matches"]

DEVICES = ("cpu", "cuda")
RANDOM_DATA_NOTE = ("quality figures compare the two models on random inputs, which says little about accuracy on "
                    "real data; give data (--data) for that")


@dataclass(frozen=True)
class ReportSettings:
    """What a report measures and how.

    Attributes:
        data, labels: evaluation inputs ``(N, ...)`` and optional integer labels ``(N,)``: with labels, top-1 (and
            top-5 when there are more than 5 classes) accuracy of both models; with ``ctc_blank``, the labels are
            targets ``(N, S)`` padded with the blank, and the rows are the sequence accuracy; always the agreement
            of the converted model with the original (top-1 agreement, relative output error). Without ``data`` the
            agreement is measured on ``random_samples`` standard-normal inputs (seeded by ``seed``), and the
            report says so.
        data_name: how the quality rows name the data (default: ``"<N> given inputs"``).
        metrics: ``{name: fn}``; ``fn(model) -> float`` is called on both models.
        class_dim: the dimension of the outputs that holds the classes (``None``:
            :func:`~separify.config.class_axis`, the last for ``(N, C)`` and ``(B, T, C)``, 1 for ``(N, C, H, W)``).
        ctc_blank: the models output CTC logits ``(B, T, C)`` with this blank class: accuracy is the fraction of
            samples whose greedy decoding equals its target (:func:`separify.tuning.ctc.sequence_accuracy`).
        device: ``"cpu"`` or ``"cuda"`` for the PyTorch timings (ONNX Runtime always runs on the CPU); a missing
            GPU is an error unless ``fallback_to_cpu``.
        batch_size: repeat the example input's first sample to this batch size (PyTorch models).
        threads: intra-op threads for PyTorch CPU and ONNX Runtime (``None``: PyTorch's current setting).
        latency: time the whole models; ``onnx``: also in ONNX Runtime (PyTorch models); ``per_layer``: time
            every conv and its replacement alone (PyTorch models).
        min_run_time, layer_min_run_time: seconds of timed runs per model / per layer (after warm-up).
        progress: show a progress bar (stderr) over the measurements.

    Raises:
        SeparifyError: ``device`` is not ``"cpu"`` or ``"cuda"``.
    """

    data: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    data_name: str | None = None
    metrics: Mapping[str, Callable[[nn.Module], float]] | None = None
    random_samples: int = 64
    class_dim: int | None = None
    ctc_blank: int | None = None
    seed: int = 0
    device: str = "cpu"
    fallback_to_cpu: bool = False
    batch_size: int | None = None
    threads: int | None = None
    latency: bool = True
    onnx: bool = True
    per_layer: bool = True
    min_run_time: float = 0.5
    layer_min_run_time: float = 0.05
    progress: bool = False

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise SeparifyError(f"device must be 'cpu' or 'cuda', got {self.device!r}")

    def resolved(self) -> tuple["ReportSettings", list[str]]:
        """These settings with the device the run will use and ``threads`` filled in, and the notes on what was
        changed (CUDA asked for, CPU used).

        Raises:
            SeparifyError: CUDA asked for and missing, without ``fallback_to_cpu``.
        """
        device, notes = self.device, []
        if device == "cuda" and not torch.cuda.is_available():
            if not self.fallback_to_cpu:
                raise SeparifyError("device 'cuda' asked for, but PyTorch sees no CUDA GPU here; use --device cpu, or "
                                    "--fallback-cpu to measure on the CPU instead")
            device = "cpu"
            notes.append("CUDA was asked for but is not available; measured on the CPU as allowed by fallback")
        return replace(self, device=device, threads=self.threads or torch.get_num_threads()), notes

    @property
    def layer_run_time(self) -> float | None:
        """Seconds of timed runs per layer, ``None`` when per-layer timing is off."""
        return self.layer_min_run_time if self.per_layer else None

    def document(self, inputs: tuple[torch.Tensor, ...], notes: list[str]) -> dict[str, Any]:
        """The ``settings`` entry of a report measured at ``inputs`` (device, batch size, threads, input shapes,
        run times, ``notes`` plus the note on random data when no data was given)."""
        if self.data is None:
            notes = notes + [RANDOM_DATA_NOTE]
        return {
            "device": self.device,
            "batch_size": int(inputs[0].shape[0]) if inputs and inputs[0].dim() else None,
            "threads": self.threads,
            "input_shapes": [list(t.shape) for t in inputs],
            "min_run_time": fig(self.min_run_time, "s"),
            "layer_min_run_time": fig(self.layer_min_run_time, "s"),
            "notes": notes,
        }


def batched(example_inputs: Any, batch_size: int | None) -> tuple[torch.Tensor, ...]:
    """``example_inputs`` (a tensor or a sequence of tensors) as a tuple, each repeated (first sample) to
    ``batch_size`` when that is given.

    Raises:
        SeparifyError: the inputs are not tensors, or ``batch_size`` is not positive.
    """
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise SeparifyError("the report needs example inputs as tensors (e.g. torch.randn(1, 3, 224, 224))")
    if batch_size is None:
        return inputs
    if batch_size <= 0:
        raise SeparifyError(f"batch size must be a positive integer, got {batch_size}")
    return tuple(t[:1].expand(batch_size, *t.shape[1:]).contiguous() for t in inputs)


#: the report's latency row that each :class:`~separify.config.LatencyTarget` backend corresponds to
TARGET_ROWS = {"cpu": "torch-cpu", "cuda": "torch-cuda", "onnxruntime": "onnxruntime-cpu"}


def check_matches(result: Any, backend: str, threads: int | None, batch: int | None) -> bool:
    """Whether the conversion behind ``result`` (a :class:`~separify.ConvertResult` or ``None``) timed its whole
    models, and so its layers, on a target equivalent to the report's ``backend`` row at ``batch`` and (CPU)
    ``threads``: the target's backend maps to that row (:data:`TARGET_ROWS`), float32, the backend's default memory
    format (channels-last on the CPU, as the report times), and both whole-model
    timings were read on that backend at that batch size and thread count."""
    spec = getattr(result, "latency_spec", None)
    timings = (getattr(result, "latency_before", None), getattr(result, "latency_after", None))
    if spec is None or any(t is None for t in timings):
        return False
    default_format = type(spec)(spec.backend).runs_channels_last
    if TARGET_ROWS.get(spec.backend) != backend or spec.dtype != "float32" \
            or spec.runs_channels_last != default_format:
        return False
    return all(t.backend == backend and t.batch_size == batch and (backend == "torch-cuda" or t.threads == threads)
               for t in timings)
