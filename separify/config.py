"""Conversion settings: one frozen dataclass, validated on construction, with per-layer rules by name pattern."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

import torch

from separify.errors import ConfigError, SeparifyError

__all__ = ["ConvertConfig", "LayerRule", "LatencyTarget", "METHODS", "OBJECTIVES"]

METHODS = ("dw-pw", "pw-dw-pw")
TRACERS = ("auto", "fx", "module")
OBJECTIVES = ("flops", "latency")
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
        channels_last: time in the channels-last memory format (PyTorch backends).
        threads: intra-op CPU threads (default: PyTorch's current setting).
        min_run_time: seconds of timed calls per candidate, after warm-up.
    """

    backend: str = "cpu"
    batch_size: int | None = None
    dtype: str = "float32"
    channels_last: bool = False
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
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def device(self) -> str:
        return "cuda" if self.backend == "cuda" else "cpu"

    def describe(self, batch_size: int | None = None) -> str:
        """E.g. ``"torch-cpu float32, batch 1, 2 threads"``."""
        name = {"cpu": "torch-cpu", "cuda": "torch-cuda", "onnxruntime": "onnxruntime-cpu"}[self.backend]
        parts = [f"{name} {self.dtype}" + (" channels-last" if self.channels_last else "")]
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


@dataclass(frozen=True)
class ConvertConfig:
    """How :func:`separify.convert` chooses and builds the replacements.

    Rank selection (at most one of the four; with none, ``flops=0.5``):
        rank: one fixed rank for every layer (dw-pw: channel multiplier ``K``, clamped per layer to the exact rank
            ``min(out, kh·kw)``; pw-dw-pw: intermediate channels ``R``).
        energy: per layer, the smallest rank keeping this fraction of the kernel's energy ``‖W‖²``.
        flops: keep this fraction of the whole model's FLOPs; ranks allocated across layers (see
            :mod:`separify.ranks`).
        latency: keep this fraction of the whole model's time measured on ``target`` (implies
            ``objective="latency"``); ranks allocated across layers by measured layer times.

    Latency (see :mod:`separify.latency`):
        objective: ``"flops"`` (the default: choose by FLOPs and decomposition error alone) or ``"latency"``: time
            every candidate on ``target``, keep a layer dense unless a replacement is faster by ``margin``, use
            each rank's fastest equivalent layout, and measure both whole models at the end.
        target: a :class:`~separify.latency.LatencyTarget`, or just its backend name (``"cpu"``, ``"cuda"``,
            ``"onnxruntime"``); default cpu.
        margin: a replacement must be at least this fraction faster than the dense conv (default 0.05).
        latency_cache: where measured layer times are kept: ``True`` for the default file
            (:func:`separify.latency.default_cache_path`), a path, or ``False`` for none.

    Other settings:
        method: ``"pw-dw-pw"`` (CP form, the default: at equal FLOPs it keeps far more accuracy on trained networks)
            or ``"dw-pw"`` (depthwise + pointwise, per-channel SVD).
        exclude: name patterns of layers to leave dense.
        rules: per-layer :class:`LayerRule` overrides, first match wins.
        fold_bn: fold a BatchNorm2d (eval mode) that only follows a conv into that conv before decomposing.
        require_saving: skip layers whose replacement would cost at least the dense conv's FLOPs (set False to
            convert anyway, e.g. to check exactness at full rank).
        cp_max_iter, cp_tol, seed: controls of the CP solver (pw-dw-pw). ``cp_max_iter=None`` (the default): 25
            sweeps, or 5 for a layer that the alternating least squares will refit (calibration data given,
            ``calib_als > 0``, and the layer not skipped by it for its size), since that refits the depthwise and
            last 1×1 conv to the layer's outputs anyway: on both benchmark networks the calibrated accuracy did not
            change (README, "Measured"), and a ResNet-50's conversion took about 8 s less.
        calib_limit: at most this many calibration samples are used (when ``convert`` gets calibration data).
        calib_ridge: relative ridge term of the least-squares refit.
        calib_whiten: with calibration data, decompose the kernel whitened by its measured input moments (minimise
            the predicted output error, :func:`separify.decompose.whiten`) instead of the weight error. Off by
            default: it lowered accuracy after the refit on the OCR benchmark network (README, "Measured").
        calib_damp: relative damping of that whitening (larger: closer to the weight-space factors).
        calib_ranks: with calibration data and a FLOPs target, allocate ranks by the predicted output error of each
            layer on that data (the whitened error curves) instead of the weight error.
        calib_memory_gb: bound on the memory used to keep the original layers' outputs for the refit; calibration
            stops with a clear error (use fewer samples) rather than exceed it.
        calib_steps: with calibration data, after the least-squares refit, this many Adam steps (learning rate
            ``calib_lr``, minibatches of 32 samples) on all factors of each replacement against the original layer's
            outputs (layer-wise reconstruction; 0, the default, skips it). Costs ``calib_steps`` forward/backward
            passes per layer; it is what makes very low ranks usable (README, "Measured").
        calib_als: with calibration data, before the least-squares refit of each replacement, up to this many
            iterations of alternating least squares fitting its depthwise conv and last 1×1 conv jointly to the
            original layer's outputs (:func:`separify.calibrate.als_dw_pw`: closed-form steps from patch statistics
            gathered once on at most 4,096 sampled pixels per layer; for pw-dw-pw the first 1×1 conv stays as
            decomposed; layers whose depthwise conv reads over 8,192 values per pixel are skipped with a note; 0
            turns it off). Both the torch and the ONNX paths. It is what makes dw-pw usable after calibration on
            the OCR benchmark network (README, "Measured").
        tracer: ``"auto"`` (torch.fx, falling back to the module tree), ``"fx"`` (fail if tracing fails) or
            ``"module"`` (module tree only; keeps the model's own class, no BatchNorm folding).
    """

    method: str = "pw-dw-pw"
    rank: int | None = None
    energy: float | None = None
    flops: float | None = None
    exclude: tuple[str, ...] = ()
    rules: tuple[LayerRule, ...] = ()
    fold_bn: bool = True
    require_saving: bool = True
    cp_max_iter: int | None = None
    cp_tol: float = 1e-4
    seed: int = 0
    tracer: str = "auto"
    calib_limit: int = 1000
    calib_ridge: float = 1e-6
    calib_whiten: bool = False
    calib_damp: float = 0.01
    calib_ranks: bool = True
    calib_memory_gb: float = 4.0
    calib_steps: int = 0
    calib_als: int = 10
    calib_lr: float = 1e-3
    objective: str = "flops"
    latency: float | None = None
    target: LatencyTarget | str | None = None
    margin: float = 0.05
    latency_cache: bool | str = True

    def __post_init__(self) -> None:
        _check_method(self.method)
        _check_rank(self.rank, "rank")
        _check_fraction(self.energy, "energy")
        _check_fraction(self.flops, "the FLOPs target")
        _check_fraction(self.latency, "the latency target")
        given = [n for n in ("rank", "energy", "flops", "latency") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ConfigError(f"give only one of rank, energy, flops and latency (got {', '.join(given)})")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.latency is not None:
            object.__setattr__(self, "objective", "latency")
        target = self.target
        if isinstance(target, str):
            target = LatencyTarget(target)
        elif isinstance(target, Mapping):
            try:
                target = LatencyTarget(**dict(target))
            except TypeError as exc:
                raise ConfigError(f"bad latency target {dict(target)!r}: {exc}") from None
        elif target is None and self.objective == "latency":
            target = LatencyTarget()
        if target is not None and not isinstance(target, LatencyTarget):
            raise ConfigError(f"target must be a LatencyTarget or one of cpu, cuda, onnxruntime, got {target!r}")
        if target is not None and self.objective != "latency":
            raise ConfigError("a latency target needs objective='latency' (or a latency budget)")
        object.__setattr__(self, "target", target)
        if isinstance(self.margin, bool) or not isinstance(self.margin, (int, float)) or not 0 <= self.margin < 1:
            raise ConfigError(f"margin must be a fraction in [0, 1), got {self.margin!r}")
        if not isinstance(self.latency_cache, (bool, str, os.PathLike)):
            raise ConfigError(f"latency_cache must be True, False or a path, got {self.latency_cache!r}")
        if self.tracer not in TRACERS:
            raise ConfigError(f"tracer must be one of {', '.join(TRACERS)}, got {self.tracer!r}")
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "rules", tuple(self.rules))
        for rule in self.rules:
            if not isinstance(rule, LayerRule):
                raise ConfigError(f"rules must be LayerRule objects, got {type(rule).__name__}")
        if self.cp_max_iter is not None and (isinstance(self.cp_max_iter, bool) or not isinstance(self.cp_max_iter, int)
                                             or self.cp_max_iter < 0):
            raise ConfigError(f"cp_max_iter must be a non-negative integer or None, got {self.cp_max_iter!r}")
        if isinstance(self.calib_limit, bool) or not isinstance(self.calib_limit, int) or self.calib_limit <= 0:
            raise ConfigError(f"calib_limit must be a positive integer, got {self.calib_limit!r}")
        for name in ("calib_ridge", "calib_damp", "calib_memory_gb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"{name} must be a non-negative number, got {value!r}")
        if isinstance(self.calib_steps, bool) or not isinstance(self.calib_steps, int) or self.calib_steps < 0:
            raise ConfigError(f"calib_steps must be a non-negative integer, got {self.calib_steps!r}")
        if isinstance(self.calib_als, bool) or not isinstance(self.calib_als, int) or self.calib_als < 0:
            raise ConfigError(f"calib_als must be a non-negative integer, got {self.calib_als!r}")
        if isinstance(self.calib_lr, bool) or not isinstance(self.calib_lr, (int, float)) or not self.calib_lr > 0:
            raise ConfigError(f"calib_lr must be a positive number, got {self.calib_lr!r}")
        if not self.calib_memory_gb > 0:
            raise ConfigError(f"calib_memory_gb must be positive, got {self.calib_memory_gb!r}")
        if not given:
            object.__setattr__(self, "flops", 0.5)

    def cp_sweeps(self, refitted: bool) -> int:
        """CP-ALS sweeps for a layer that calibration's alternating least squares will refit (``refitted``: data
        given and the layer within its size bound; ``calib_als`` is checked here) or not (see ``cp_max_iter``)."""
        if self.cp_max_iter is not None:
            return self.cp_max_iter
        return CP_SWEEPS_BEFORE_ALS if refitted and self.calib_als > 0 else CP_SWEEPS

    @property
    def selection(self) -> str:
        """Which rank selection is active: ``"rank"``, ``"energy"``, ``"flops"`` or ``"latency"``."""
        for name in ("rank", "energy", "latency"):
            if getattr(self, name) is not None:
                return name
        return "flops"

    def rule_for(self, name: str) -> LayerRule | None:
        """The first rule whose pattern matches ``name``, with ``exclude`` patterns turned into rules."""
        for pattern in self.exclude:
            if fnmatch.fnmatchcase(name, pattern):
                return LayerRule(pattern, exclude=True)
        for rule in self.rules:
            if rule.matches(name):
                return rule
        return None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ConvertConfig":
        """Build from plain data, e.g. parsed JSON; ``rules`` may map patterns to dicts of rule fields."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
        data = dict(data)
        rules = data.get("rules", ())
        if isinstance(rules, Mapping):
            data["rules"] = tuple(LayerRule(pattern, **dict(spec)) for pattern, spec in rules.items())
        else:
            data["rules"] = tuple(r if isinstance(r, LayerRule) else LayerRule(**dict(r)) for r in rules)
        if "exclude" in data:
            data["exclude"] = tuple(data["exclude"]) if not isinstance(data["exclude"], str) else (data["exclude"],)
        return cls(**data)

    def replace(self, **changes: Any) -> "ConvertConfig":
        """A copy with ``changes``; setting one rank selection clears the others."""
        if any(k in changes for k in ("rank", "energy", "flops", "latency")):
            base = {k: None for k in ("rank", "energy", "flops", "latency")}
            base.update(changes)
            changes = base
        if changes.get("objective") == "flops":  # back to FLOPs: the latency settings go with it
            changes.setdefault("target", None)
            changes["latency"] = None
        return replace(self, **changes)

