"""Conversion settings: frozen dataclasses in sections, validated on construction, per-layer rules by name pattern.

:class:`ConvertConfig` holds four sections (:class:`RankSelection`, :class:`Calibration`, :class:`LatencySettings`,
:class:`CPSolver`) and the settings that concern the whole pass (exclude, rules, fold_bn, seed, tracer). The flat
keyword names of earlier versions (``flops=0.5``, ``calib_limit=256``, ``margin=0.1``...) are accepted everywhere a
config is built and mapped onto the sections (:data:`FLAT`). A TOML file with the same sections is read by
:meth:`ConvertConfig.from_toml`.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from separify.errors import ConfigError, SeparifyError

__all__ = ["ConvertConfig", "RankSelection", "Calibration", "LatencySettings", "CPSolver", "LayerRule", "LatencyTarget",
           "METHODS", "OBJECTIVES", "DEFAULT_OBJECTIVE", "FLAT"]

METHODS = ("dw-pw", "pw-dw-pw", "auto")
TRACERS = ("auto", "fx", "module")
OBJECTIVES = ("flops", "latency")
#: the objective when none is given: measured time on the target (the default result is never slower)
DEFAULT_OBJECTIVE = "latency"
BACKENDS = ("cpu", "cuda", "onnxruntime")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CP_SWEEPS = 25  # CP-ALS sweeps (pw-dw-pw) by default
CP_SWEEPS_BEFORE_ALS = 5  # ... when the calibration's alternating least squares refits the layer afterwards


@dataclass(frozen=True)
class LatencyTarget:
    """Where and how the converted model will run; candidates are timed that way.

    Attributes:
        backend: ``"cpu"`` (PyTorch eager, ``torch.utils.benchmark``), ``"cuda"`` (PyTorch eager on the current
            GPU, CUDA events) or ``"onnxruntime"`` (each candidate exported with ``torch.onnx.export`` and run in
            ONNX Runtime's CPU execution provider).
        batch_size: batch size to time at (default: the example input's).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (PyTorch backends; float16 on CUDA only).
        channels_last: run the converted model in the channels-last memory format (PyTorch backends): its 4-D
            weights are stored channels-last, so every conv after the first runs channels-last even on a
            contiguous input, and candidates are timed on channels-last inputs. The original is timed both ways and
            its faster reading is the baseline. ``None`` (the default): on for ``"cpu"`` (oneDNN's depthwise and
            1×1 convs run several times faster channels-last), off elsewhere.
        threads: intra-op CPU threads (default: PyTorch's current setting).
        min_run_time: seconds of timed calls per candidate, after warm-up.
    """

    backend: str = "cpu"
    batch_size: int | None = None
    dtype: str = "float32"
    channels_last: bool | None = None
    threads: int | None = None
    min_run_time: float = 0.05

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown latency target {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.backend == "onnxruntime" and (self.dtype != "float32" or self.channels_last):
            raise ConfigError("the onnxruntime target times float32 models in their exported layout; --dtype and "
                              "--channels-last apply to the cpu and cuda targets")
        if self.backend == "cpu" and self.dtype == "float16":
            raise ConfigError("float16 convolutions are for the cuda target; on cpu use float32 or bfloat16")
        for name in ("batch_size", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.min_run_time, bool) or not isinstance(self.min_run_time, (int, float)) \
                or not self.min_run_time > 0:
            raise ConfigError(f"min_run_time must be a positive number of seconds, got {self.min_run_time!r}")

    @property
    def runs_channels_last(self) -> bool:
        """Whether the converted model runs channels-last (``channels_last``, or its default for the backend)."""
        return self.backend == "cpu" if self.channels_last is None else bool(self.channels_last)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def device(self) -> str:
        return "cuda" if self.backend == "cuda" else "cpu"

    def describe(self, batch_size: int | None = None) -> str:
        """E.g. ``"torch-cpu float32, batch 1, 2 threads"``."""
        name = {"cpu": "torch-cpu", "cuda": "torch-cuda", "onnxruntime": "onnxruntime-cpu"}[self.backend]
        parts = [f"{name} {self.dtype}" + (" channels-last" if self.runs_channels_last else "")]
        batch = self.batch_size or batch_size
        if batch:
            parts.append(f"batch {batch}")
        if self.backend != "cuda":
            parts.append(f"{self.threads or torch.get_num_threads()} threads")
        return ", ".join(parts)

    def check_available(self) -> None:
        if self.backend == "cuda" and not torch.cuda.is_available():
            raise SeparifyError("the latency target is cuda, but PyTorch sees no CUDA device here")
        if self.backend == "onnxruntime":
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                raise SeparifyError("the onnxruntime target needs onnxruntime (pip install onnxruntime)") from None



def class_axis(class_dim: int | None, ndim: int) -> int:
    """The class axis of a model output with ``ndim`` dimensions: ``class_dim`` where it is given, else the last
    for outputs of up to 3 dimensions (``(N, C)`` logits, ``(B, T, C)`` or ``(T, B, C)`` sequence logits) and 1 for
    more (``(N, C, H, W)`` dense predictions)."""
    if class_dim is not None:
        return class_dim
    return -1 if ndim <= 3 else 1


def check_class_dim(class_dim: Any, what: str) -> None:
    """``class_dim`` must be ``None`` (:func:`class_axis` decides) or an integer axis."""
    if class_dim is not None and (isinstance(class_dim, bool) or not isinstance(class_dim, int)):
        raise ConfigError(f"{what} must be an integer (the class axis of the output) or None, got {class_dim!r}")


def _check_rank(value: Any, what: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")


def _check_fraction(value: Any, what: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < float(value) <= 1.0):
        raise ConfigError(f"{what} must be a number in (0, 1], got {value!r}")


def _check_method(value: Any) -> None:
    if value is not None and value not in METHODS:
        raise ConfigError(f"unknown method {value!r}; choose one of: {', '.join(METHODS)}")


def _check_int(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{what} must be a non-negative integer, got {value!r}")


def _check_number(value: Any, what: str, *, positive: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and (value > 0 if positive else value >= 0)
    if not ok:
        raise ConfigError(f"{what} must be a {'positive' if positive else 'non-negative'} number, got {value!r}")


@dataclass(frozen=True)
class LayerRule:
    """Settings for the layers whose qualified name matches ``pattern`` (``fnmatch`` syntax, e.g. ``layer4.*``).

    The first matching rule wins. A rule with ``exclude=True`` leaves the layers dense. A rule with ``rank`` or
    ``energy`` fixes those layers' rank; the global FLOPs target is then met with the remaining layers.
    """

    pattern: str
    method: str | None = None
    rank: int | None = None
    energy: float | None = None
    exclude: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ConfigError(f"a layer rule needs a non-empty name pattern, got {self.pattern!r}")
        _check_method(self.method)
        _check_rank(self.rank, f"rank for layers {self.pattern!r}")
        _check_fraction(self.energy, f"energy for layers {self.pattern!r}")
        if self.rank is not None and self.energy is not None:
            raise ConfigError(f"layer rule {self.pattern!r}: give rank or energy, not both")

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)


SELECTIONS = ("rank", "energy", "flops", "latency")


@dataclass(frozen=True)
class RankSelection:
    """Which form, and how its rank is chosen (at most one of the four; with none, ``flops=0.5``).

    Attributes:
        method: ``"pw-dw-pw"`` (CP form, the default: at equal FLOPs it keeps far more accuracy on trained
            networks), ``"dw-pw"`` (depthwise + pointwise, per-channel SVD) or ``"auto"`` (per layer, either form or
            the dense conv, chosen jointly by the FLOPs or latency allocation by each form's predicted output error:
            :mod:`separify.planning.forms`; needs a FLOPs or latency target).
        rank: one fixed rank for every layer (dw-pw: channel multiplier ``K``, clamped per layer to the exact rank
            ``min(out, kh·kw)``; pw-dw-pw: intermediate channels ``R``).
        energy: per layer, the smallest rank keeping this fraction of the kernel's energy ``‖W‖²``.
        flops: keep this fraction of the whole model's FLOPs; ranks allocated across layers
            (:mod:`separify.planning.ranks`).
        latency: keep this fraction of the whole model's time measured on the latency target (implies
            ``objective="latency"``); ranks allocated across layers by measured layer times.
        require_saving: skip layers whose replacement would cost at least the dense conv's FLOPs (``False``
            converts anyway, e.g. to check exactness at full rank).
    """

    method: str = "pw-dw-pw"
    rank: int | None = None
    energy: float | None = None
    flops: float | None = None
    latency: float | None = None
    require_saving: bool = True

    def __post_init__(self) -> None:
        _check_method(self.method)
        _check_rank(self.rank, "rank")
        _check_fraction(self.energy, "energy")
        _check_fraction(self.flops, "the FLOPs target")
        _check_fraction(self.latency, "the latency target")
        given = [n for n in SELECTIONS if getattr(self, n) is not None]
        if len(given) > 1:
            raise ConfigError(f"give only one of rank, energy, flops and latency (got {', '.join(given)})")
        if self.method == "auto" and given and given[0] in ("rank", "energy"):
            raise ConfigError(f"method='auto' chooses each layer's form and rank together; give a FLOPs or latency "
                              f"target instead of {given[0]}")
        if not given:
            object.__setattr__(self, "flops", 0.5)

    @property
    def kind(self) -> str:
        """Which selection is active: ``"rank"``, ``"energy"``, ``"flops"`` or ``"latency"``."""
        return next(n for n in SELECTIONS if getattr(self, n) is not None)

    @property
    def value(self) -> float | int:
        """The active selection's value (the rank, energy, FLOPs or latency fraction)."""
        return getattr(self, self.kind)


#: the values of ``Calibration.precision``
PRECISIONS = ("auto", "float32", "bfloat16")

#: layer-wise reconstruction steps per replacement by default (``Calibration.steps=None``), where it pays
RECONSTRUCTION_STEPS = 200

#: default Adam steps of the output reconstruction (:mod:`separify.calibration.output`)
OUTPUT_STEPS = 100


@dataclass(frozen=True)
class Calibration:
    """How calibration data (``convert(..., calibration=data)``) is used (:mod:`separify.calibration`).

    Attributes:
        limit: at most this many calibration samples are used.
        ridge: relative ridge term of the least-squares refit of each replacement's last 1×1 conv.
        whiten: decompose each kernel whitened by its measured input moments (minimise the predicted output error,
            :func:`separify.core.decompose.whiten`) instead of the weight error. Off by default: on the OCR benchmark
            network it lowered the accuracy after the refit.
        damp: relative damping of that whitening (larger: closer to the weight-space factors).
        ranks: with a FLOPs or latency allocation, allocate by each layer's predicted output error on the data
            (the whitened error curves) instead of its weight error.
        loss_aware: with ``ranks``, weight each layer's predicted error by how much its output error moves the
            model's ``loss`` (:func:`separify.calibration.sensitivity.sensitivity`, on a few calibration samples,
            by backpropagation through the original model; an ONNX model is imported into PyTorch for it with
            onnx2torch, and where that fails every layer weighs the same, with a warning).
        loss: what the loss-aware weights measure: ``"fisher"``, the KL divergence of the softmax over
            ``class_dim`` of the output (classifier or sequence logits), or ``"mse"``, the squared change of every
            output (models whose outputs are not logits).
        class_dim: the class axis of the output logits for ``loss="fisher"``; ``None``: :func:`class_axis` (the
            last for ``(N, C)`` and ``(N, T, C)``, 1 for segmentation ``(N, C, H, W)``).
        memory_gb: bound on the memory kept for the original layers' outputs; beyond it calibration stops with a
            clear error (use fewer samples).
        steps: after the ALS, this many Adam steps (learning rate ``lr``, minibatches of ``batch_size`` samples) on
            all factors of each replacement against the original layer's outputs (layer-wise reconstruction), then
            the least-squares refit. ``None`` (the default): :data:`RECONSTRUCTION_STEPS` for the replacements with a
            factor the ALS does not fit (pw-dw-pw's first 1×1 conv), none for dw-pw (its ALS fits every factor);
            0 turns it off. Costs ``steps`` forward/backward passes of the layer on a minibatch.
        als: before the refit, up to this many iterations of alternating least squares fitting each replacement's
            depthwise conv and last 1×1 conv jointly to the original layer's outputs (closed-form steps from patch
            statistics on at most 4,096 sampled pixels per layer; 0 turns it off).
        lr: learning rate of the layer-wise reconstruction.
        batch_size: samples per minibatch of the layer-wise reconstruction (fewer where they would hold more than
            :data:`~separify.calibration.reconstruct.MINIBATCH_PIXELS` output pixels).
        output_steps: after the layer pass, this many Adam steps (learning rate ``output_lr``, minibatches of
            ``batch_size`` samples, a cosine to 0; images as large as 224² RGB: a crop of one per step) on the
            factors of all replacements together against the original model's outputs (output reconstruction,
            :mod:`separify.calibration.output`; an eighth of the samples held out to check that it lowered the
            output error, else undone). Costs ``output_steps`` forward and backward passes of the converted model
            and forwards of the original on a minibatch; 0 turns it off.
        output_lr: learning rate of the output reconstruction.
        input_key: which entry of the calibration data's items is the model input, where they are dicts (as a
            ``DataLoader`` over a dict dataset yields); the CLI's ``--calib-key`` names the array of a ``.npz``/``.pt``
            file. ``None``: the only floating-point tensor, or the first of
            :data:`~separify.calibration.data.INPUT_KEYS` present.
        precision: the number format of the calibration passes' convolutions (PyTorch models):
            ``"float32"`` (the model's own), ``"bfloat16"`` (autocast; the statistics and fits stay in float32 or
            float64), or ``"auto"``: bfloat16 for a float32 model on hardware with native bfloat16 (x86 CPUs with
            AVX512-BF16 or AMX, CUDA GPUs that support it) when one forward pass over the calibration data costs at
            least :data:`~separify.calibration.precision.AUTO_FLOPS`, else float32
            (:mod:`separify.calibration.precision`). The same rule, on the stage's own FLOPs, sets the number
            format of the output reconstruction's steps (:func:`separify.calibration.output.step_dtype`).
        seconds: a time budget for the conversion (wall clock from its start, less any time spent timing layers on
            a latency target): the two reconstructions' steps (``steps``, ``output_steps``), the only work that can
            stop early, stop where it ends (:mod:`separify.calibration.budget`); the result says how many ran.
            Everything else runs in full, so a conversion whose passes alone take longer ends later, with fewer or
            no steps. ``None`` (the default): no budget, every step runs. A budget makes the result depend on the
            machine's speed and load; on the OCR benchmark network, 30 s cost 0.7–2.6 points of word accuracy on
            a 2-core CPU (benchmarks/RESULTS.md).
    """

    limit: int = 1000
    ridge: float = 1e-6
    whiten: bool = False
    damp: float = 0.01
    ranks: bool = True
    loss_aware: bool = True
    loss: str = "fisher"
    class_dim: int | None = None
    memory_gb: float = 4.0
    steps: int | None = None
    als: int = 10
    lr: float = 3e-3
    batch_size: int = 8
    output_steps: int = OUTPUT_STEPS
    output_lr: float = 6e-4
    input_key: str | None = None
    precision: str = "auto"
    seconds: float | None = None

    def __post_init__(self) -> None:
        # messages name the flat keywords (calib_limit...), which are also the CLI's option names
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit <= 0:
            raise ConfigError(f"calib_limit must be a positive integer, got {self.limit!r}")
        for name in ("ridge", "damp", "memory_gb"):
            _check_number(getattr(self, name), f"calib_{name}")
        if not self.memory_gb > 0:
            raise ConfigError(f"calib_memory_gb must be positive, got {self.memory_gb!r}")
        if self.steps is not None:
            _check_int(self.steps, "calib_steps")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ConfigError(f"calib_batch_size must be a positive integer, got {self.batch_size!r}")
        _check_int(self.als, "calib_als")
        _check_number(self.lr, "calib_lr", positive=True)
        _check_int(self.output_steps, "calib_output_steps")
        _check_number(self.output_lr, "calib_output_lr", positive=True)
        if self.seconds is not None and (isinstance(self.seconds, bool) or not isinstance(self.seconds, (int, float))
                                         or not self.seconds > 0):
            raise ConfigError(f"calib_seconds must be a positive number of seconds or None (no time budget), "
                              f"got {self.seconds!r}")
        if self.loss not in ("fisher", "mse"):
            raise ConfigError(f"calib_loss must be 'fisher' or 'mse', got {self.loss!r}")
        check_class_dim(self.class_dim, "calib_class_dim")
        if self.input_key is not None and not isinstance(self.input_key, str):
            raise ConfigError(f"input_key must be a string, got {self.input_key!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"calib_precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


@dataclass(frozen=True)
class LatencySettings:
    """Whether and where candidates are timed (:mod:`separify.planning.latency`).

    Attributes:
        objective: ``"latency"`` (the default, :data:`DEFAULT_OBJECTIVE`): time every candidate on ``target``,
            keep a layer dense unless a replacement is faster by ``margin``, use each rank's fastest equivalent
            layout, time the planned whole model against the original and drop replacements until it is faster
            (never slower than the original), and time both whole models at the end. ``"flops"``: choose by FLOPs
            and decomposition error alone, nothing timed (for hardware that cannot be timed here).
        target: a :class:`LatencyTarget`, a mapping of its fields, or its backend name (``"cpu"``, ``"cuda"``,
            ``"onnxruntime"``); default: PyTorch on the CPU for a PyTorch model, ONNX Runtime on the CPU for an
            ONNX model. Giving one implies the latency objective.
        margin: a replacement must be at least this fraction faster than the dense conv.
        cache: where measured layer times are kept: ``True`` for the default file
            (:func:`separify.planning.latency.default_cache_path`), a path, or ``False`` for none.
    """

    objective: str | None = None
    target: LatencyTarget | str | Mapping | None = None
    margin: float = 0.05
    cache: bool | str | os.PathLike = True

    def __post_init__(self) -> None:
        target = _as_target(self.target)
        if self.objective is None:  # a target implies the latency objective
            object.__setattr__(self, "objective", "latency" if target is not None else DEFAULT_OBJECTIVE)
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if target is None and self.objective == "latency":
            target = LatencyTarget()
        if target is not None and self.objective != "latency":
            raise ConfigError("a latency target needs objective='latency' (or a latency budget)")
        object.__setattr__(self, "target", target)
        if isinstance(self.margin, bool) or not isinstance(self.margin, (int, float)) or not 0 <= self.margin < 1:
            raise ConfigError(f"margin must be a fraction in [0, 1), got {self.margin!r}")
        if not isinstance(self.cache, (bool, str, os.PathLike)):
            raise ConfigError(f"latency cache must be True, False or a path, got {self.cache!r}")


def _as_target(target: Any) -> LatencyTarget | None:
    if isinstance(target, str):
        return LatencyTarget(target)
    if isinstance(target, Mapping):
        try:
            return LatencyTarget(**dict(target))
        except TypeError as exc:
            raise ConfigError(f"bad latency target {dict(target)!r}: {exc}") from None
    if target is not None and not isinstance(target, LatencyTarget):
        raise ConfigError(f"target must be a LatencyTarget or one of cpu, cuda, onnxruntime, got {target!r}")
    return target


@dataclass(frozen=True)
class CPSolver:
    """The CP-ALS solver of the pw-dw-pw form (:func:`separify.core.decompose.cp_decompose`).

    Attributes:
        max_iter: sweeps; ``None``: 25, or 5 for a layer that calibration's alternating least squares refits
            afterwards (it refits the depthwise and last 1×1 conv to the layer's outputs anyway).
        tol: relative change of the fit below which the sweeps stop.
    """

    max_iter: int | None = None
    tol: float = 1e-4

    def __post_init__(self) -> None:
        if self.max_iter is not None and (isinstance(self.max_iter, bool) or not isinstance(self.max_iter, int)
                                          or self.max_iter < 0):
            raise ConfigError(f"cp_max_iter must be a non-negative integer or None, got {self.max_iter!r}")
        _check_number(self.tol, "cp_tol")


#: flat keyword → (section, field): the flat names accepted by :class:`ConvertConfig` and ``separify.convert``
FLAT: dict[str, tuple[str, str]] = {
    **{n: ("ranks", n) for n in ("method", "rank", "energy", "flops", "latency", "require_saving")},
    **{f"calib_{n}": ("calibration", n) for n in ("limit", "ridge", "whiten", "damp", "ranks", "loss_aware",
                                                    "loss", "class_dim", "memory_gb", "steps", "als", "lr",
                                                    "batch_size", "output_steps", "output_lr", "precision",
                                                    "seconds")},
    "objective": ("latency", "objective"), "target": ("latency", "target"), "margin": ("latency", "margin"),
    "latency_cache": ("latency", "cache"), "input_key": ("calibration", "input_key"),
    "cp_max_iter": ("cp", "max_iter"), "cp_tol": ("cp", "tol"),
}
SECTIONS = {"ranks": RankSelection, "calibration": Calibration, "latency": LatencySettings, "cp": CPSolver}
_TOP = ("exclude", "rules", "fold_bn", "seed", "tracer")


@dataclass(frozen=True, init=False)
class ConvertConfig:
    """How :func:`separify.convert` chooses and builds the replacements.

    Sections: ``ranks`` (:class:`RankSelection`), ``calibration`` (:class:`Calibration`), ``latency``
    (:class:`LatencySettings`), ``cp`` (:class:`CPSolver`). Each may be given as its dataclass or a mapping of its
    fields; flat keywords (:data:`FLAT`, e.g. ``flops=0.5``, ``calib_limit=256``, ``latency=0.6``) override them.

    Whole-pass settings:
        exclude: name patterns of layers to leave dense.
        rules: per-layer :class:`LayerRule` overrides, first match wins (or a mapping pattern → rule fields).
        fold_bn: fold a BatchNorm2d (eval mode) that only follows a conv into that conv before decomposing.
        seed: seed of the CP solver and of random example inputs.
        tracer: ``"auto"`` (torch.fx, falling back to the module tree), ``"fx"`` (fail if tracing fails) or
            ``"module"`` (module tree only; keeps the model's own class, no BatchNorm folding).

    A latency budget (``ranks.latency``) implies ``latency.objective == "latency"``.
    """

    ranks: RankSelection
    calibration: Calibration
    latency: LatencySettings
    cp: CPSolver
    exclude: tuple[str, ...]
    rules: tuple[LayerRule, ...]
    fold_bn: bool
    seed: int
    tracer: str

    def __init__(self, *, ranks: RankSelection | Mapping | None = None, calibration: Calibration | Mapping | None = None,
                 latency: LatencySettings | Mapping | float | None = None, cp: CPSolver | Mapping | None = None,
                 exclude: str | tuple[str, ...] | list[str] = (), rules: Any = (), fold_bn: bool = True,
                 seed: int = 0, tracer: str = "auto", **flat: Any) -> None:
        if latency is not None and _is_budget("latency", latency):  # the flat latency budget
            flat["latency"], latency = latency, None
        unknown = sorted(set(flat) - set(FLAT))
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
        given = {"ranks": ranks, "calibration": calibration, "latency": latency, "cp": cp}
        by_section = {name: {f: v for k, v in flat.items() for s, f in [FLAT[k]] if s == name} for name in SECTIONS}
        for name, cls in SECTIONS.items():
            if name == "latency" and self.ranks.latency is not None:  # a latency budget implies the objective
                by_section[name]["objective"] = "latency"
            object.__setattr__(self, name, _section(cls, given[name], by_section[name]))
        if tracer not in TRACERS:
            raise ConfigError(f"tracer must be one of {', '.join(TRACERS)}, got {tracer!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        object.__setattr__(self, "exclude", _patterns(exclude))
        object.__setattr__(self, "rules", _rules(rules))
        object.__setattr__(self, "fold_bn", bool(fold_bn))
        object.__setattr__(self, "seed", seed)
        object.__setattr__(self, "tracer", tracer)

    # --- what the pipeline asks

    @property
    def selection(self) -> str:
        """Which rank selection is active: ``"rank"``, ``"energy"``, ``"flops"`` or ``"latency"``."""
        return self.ranks.kind

    @property
    def method(self) -> str:
        return self.ranks.method

    @property
    def objective(self) -> str:
        return self.latency.objective

    @property
    def target(self) -> LatencyTarget | None:
        return self.latency.target

    def cp_sweeps(self, refitted: bool) -> int:
        """CP-ALS sweeps for a layer that calibration's alternating least squares will refit (``refitted``: data
        given and the layer within its size bound; ``calibration.als`` is checked here) or not."""
        if self.cp.max_iter is not None:
            return self.cp.max_iter
        return CP_SWEEPS_BEFORE_ALS if refitted and self.calibration.als > 0 else CP_SWEEPS

    def rule_for(self, name: str) -> LayerRule | None:
        """The first rule whose pattern matches ``name``, with ``exclude`` patterns turned into rules."""
        for pattern in self.exclude:
            if fnmatch.fnmatchcase(name, pattern):
                return LayerRule(pattern, exclude=True)
        for rule in self.rules:
            if rule.matches(name):
                return rule
        return None

    # --- building and copying

    def replace(self, **changes: Any) -> "ConvertConfig":
        """A copy with ``changes`` (sections, whole-pass settings or flat keywords); setting one rank selection
        clears the others, and ``objective="flops"`` clears the latency target and budget."""
        ranks = asdict(self.ranks)
        if any(changes.get(k) is not None and (k != "latency" or _is_budget(k, changes[k])) for k in SELECTIONS):
            ranks.update({k: None for k in SELECTIONS})
        sections = {"ranks": ranks, "calibration": asdict(self.calibration),
                    "latency": {f.name: getattr(self.latency, f.name) for f in fields(LatencySettings)},
                    "cp": asdict(self.cp)}
        if changes.get("objective") == "flops":
            sections["latency"]["target"] = None
            ranks["latency"] = None
        top = {k: getattr(self, k) for k in _TOP}
        for key, value in changes.items():
            if key in SECTIONS and not _is_budget(key, value):  # a mapping changes the fields it names
                sections[key] = {**sections[key], **value} if isinstance(value, Mapping) else \
                    {f.name: getattr(value, f.name) for f in fields(value)}
            elif key in FLAT:
                section, name = FLAT[key]
                sections[section][name] = value
            elif key in _TOP:
                top[key] = value
            else:
                raise ConfigError(f"unknown config key {key!r}")
        return ConvertConfig(**sections, **top)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ConvertConfig":
        """Build from plain data (parsed TOML or JSON): sections as tables, whole-pass settings and flat keys at
        the top level; ``rules`` may map patterns to tables of rule fields."""
        data = dict(data)
        unknown = sorted(set(data) - set(SECTIONS) - set(_TOP) - set(FLAT))
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)} (sections: {', '.join(SECTIONS)}; "
                              f"settings: {', '.join(_TOP)})")
        for name, cls_ in SECTIONS.items():
            if name in data and isinstance(data[name], Mapping):
                known = {f.name for f in fields(cls_)}
                bad = sorted(set(data[name]) - known)
                if bad:
                    raise ConfigError(f"unknown key(s) in [{name}]: {', '.join(bad)} (known: {', '.join(sorted(known))})")
        if "latency" in data and isinstance(data["latency"], bool):
            raise ConfigError(f"latency must be a budget in (0, 1] or a [latency] table, got {data['latency']!r}")
        if "latency" in data and not isinstance(data["latency"], Mapping):
            data["latency"] = float(data["latency"]) if isinstance(data["latency"], (int, float)) else data["latency"]
        return cls(**data)

    @classmethod
    def from_toml(cls, path: str | os.PathLike, **overrides: Any) -> "ConvertConfig":
        """Read a TOML file (:meth:`from_dict`); ``overrides`` (flat keywords or sections) win over the file."""
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
        config = cls.from_dict(data)
        return config.replace(**overrides) if overrides else config

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain data in the flat form of :data:`FLAT` plus the whole-pass settings (the
        ``config`` entry of a result's JSON; keys as in earlier versions)."""
        out: dict[str, Any] = {}
        for key, (section, name) in FLAT.items():
            value = getattr(getattr(self, section), name)
            out[key] = asdict(value) if isinstance(value, LatencyTarget) else value
        out.update(exclude=list(self.exclude), rules=[asdict(r) for r in self.rules], fold_bn=self.fold_bn,
                   seed=self.seed, tracer=self.tracer)
        return out

    def sections(self) -> dict[str, Any]:
        """The settings as nested plain data, one table per section (the form :meth:`from_dict` reads)."""
        out = {name: asdict(getattr(self, name)) for name in SECTIONS}
        out.update(exclude=list(self.exclude), rules={r.pattern: {k: v for k, v in asdict(r).items() if k != "pattern"}
                                                      for r in self.rules},
                   fold_bn=self.fold_bn, seed=self.seed, tracer=self.tracer)
        return out


def _is_budget(key: str, value: Any) -> bool:
    """``latency`` names both a section and the flat latency budget (a number or ``None``)."""
    return key == "latency" and (value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)))


def _section(cls: type, given: Any, flat: dict[str, Any]):
    """A section from its dataclass, a mapping of its fields or ``None``, with flat keywords applied on top."""
    if given is None:
        values: dict[str, Any] = {}
    elif isinstance(given, cls):
        values = {f.name: getattr(given, f.name) for f in fields(cls)}
    elif isinstance(given, Mapping):
        values = dict(given)
    else:
        raise ConfigError(f"the {cls.__name__} section must be a {cls.__name__} or a mapping, got {given!r}")
    if cls is RankSelection and any(flat.get(k) is not None for k in SELECTIONS):
        values.update({k: None for k in SELECTIONS})
    values.update(flat)
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"bad {cls.__name__} settings: {exc}") from None


def _patterns(exclude: Any) -> tuple[str, ...]:
    patterns = (exclude,) if isinstance(exclude, str) else exclude
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) and p for p in patterns):
        raise ConfigError(f"exclude must be a name pattern or a list of them, got {exclude!r}")
    return tuple(patterns)


def _rules(rules: Any) -> tuple[LayerRule, ...]:
    """Rules from ``LayerRule`` objects, mappings of their fields, or a mapping pattern → fields."""
    try:
        if isinstance(rules, Mapping):
            rules = [LayerRule(pattern, **dict(spec)) for pattern, spec in rules.items()]
        out = []
        for rule in rules:
            if isinstance(rule, Mapping):
                rule = LayerRule(**dict(rule))
            if not isinstance(rule, LayerRule):
                raise ConfigError(f"rules must be LayerRule objects, got {type(rule).__name__}")
            out.append(rule)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"bad layer rules {rules!r}: each is a pattern with method, rank, energy or exclude "
                          f"({exc})") from None
    return tuple(out)
