"""Latency-aware conversion: time every candidate replacement on the target and choose by measured time.

Fewer FLOPs are not less time. A depthwise conv reads and writes as much memory as it computes, so on many targets a
separable block is slower than the dense conv it replaces, and how much slower depends on the layout: a depthwise
conv with channel multiplier 2 can take several times a multiplier-1 conv on the same channels. So, with
``objective="latency"``, :func:`separify.convert`:

1. times, for every convertible layer at its real input shape (the target's batch size, dtype and memory format),
   the dense conv and each candidate replacement in each of its equivalent layouts
   (:meth:`separify.core.modules.SeparableConv2d.layouts`), keeping the fastest layout per rank;
2. drops every candidate that is not faster than the dense conv by ``margin``; a layer with none left stays dense,
   and its record says what was measured;
3. allocates ranks among the remaining candidates: to meet a FLOPs target (the default) or, with ``latency=L``, a
   whole-model time of ``L`` × the original's, minimising the summed squared relative error (kernel error, or the
   predicted output error on calibration data) with :func:`separify.planning.ranks.allocate_options`;
4. with a latency budget, builds the planned model with untrained factors, times it whole against the original
   and plans again with a corrected budget until it meets the budget (:func:`separify.planning.plan.meet_latency`);
5. measures both whole models on the target and reports the ratio.

Candidate ranks: every rank for dw-pw (``K`` is small); for pw-dw-pw a geometric grid of multiples of 16 (channel
counts that blocked CPU layouts and tensor cores handle without remainder loops; 8 for small layers). The sum of
isolated layer times is only a model of the whole network's time; steps 4 and 5 measure the network itself.

Timings are cached on disk (:class:`LatencyCache`), keyed by the machine, software versions, threads, input shape,
batch size, dtype, memory format, module configuration and layout, so a second conversion on the same machine
reuses them. A test or a user may inject their own timing function (``timer=``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from separify.config import BACKENDS, DTYPES, LatencyTarget
from separify.core.measure import cpu_name
from separify.errors import ConfigError, SeparifyError, first_line
from separify.core.modules import FORMS, SeparableConv2d
from separify.records import Reason

__all__ = ["LatencyTarget", "LatencyCache", "Timer", "LayerTimes", "measure_modules", "time_model", "module_spec",
           "injected_timings",
           "rank_grid", "BACKENDS", "DTYPES"]

#: changes whenever what a cached time means changes (e.g. how ONNX Runtime layers are timed)
TIMING_METHOD = ("layers-v4: torch interleaved, whole models on contiguous inputs, the original at its best "
                 "memory format; onnxruntime torchscript-export (split as Concat), no spinning, minus a one-node run")

#: ``timer(modules, input_shape, target) -> milliseconds per call of each module`` (input shape incl. the batch)
Timer = Callable[[Sequence[nn.Module], tuple, "LatencyTarget"], list[float]]


def machine_key(target: LatencyTarget) -> dict:
    """What identifies the timing environment in the cache: device, software versions, threads."""
    key = {"backend": target.backend, "torch": torch.__version__, "dtype": target.dtype,
           "channels_last": target.runs_channels_last, "method": TIMING_METHOD}
    if target.backend == "cuda":
        key.update(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "no cuda",
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   cudnn_benchmark=torch.backends.cudnn.benchmark, cudnn_tf32=torch.backends.cudnn.allow_tf32,
                   matmul_precision=torch.get_float32_matmul_precision())
    else:
        key.update(device=cpu_name(), cores=os.cpu_count(), threads=target.threads or torch.get_num_threads(),
                   mkldnn=torch.backends.mkldnn.enabled)
    if target.backend == "onnxruntime":
        import onnxruntime

        key["onnxruntime"] = onnxruntime.__version__
    return key


# --------------------------------------------------------------------------------------------------------------
# Timing


def fold_batchnorms(model: nn.Module) -> nn.Module:
    """``model`` (in eval mode) with every BatchNorm2d that only follows an ``nn.Conv2d`` folded into it
    (``torch.fx.experimental.optimization.fuse``, in place on a ``GraphModule``; other models are traced first and
    returned as a new ``GraphModule``). Unchanged where tracing fails or a module is training."""
    from torch import fx
    from torch.fx.experimental.optimization import fuse

    if model.training or not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) \
            or any(m.training for m in model.modules()):
        return model
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if isinstance(model, fx.GraphModule):
                return fuse(model, inplace=True, no_trace=True)
            return fuse(model, inplace=True)
    except Exception:  # noqa: BLE001 - not traceable: timed as it is (original and converted alike)
        return model


def _prepare(module: nn.Module, target: LatencyTarget, *, channels_last: bool | None = None) -> nn.Module:
    """A copy of ``module`` as it runs best on ``target``: eval mode, BatchNorm folded into the conv before it,
    the target's device and dtype, its 4-D weights channels-last where the target runs channels-last (or as
    ``channels_last`` says). Original and converted models are prepared alike, so a reported speed-up is the
    replacement's, not a fusion's."""
    module = fold_batchnorms(copy.deepcopy(module).eval())
    module = module.to(device=target.device, dtype=target.torch_dtype)
    if target.runs_channels_last if channels_last is None else channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module.eval()


def _input(shape: tuple, target: LatencyTarget) -> torch.Tensor:
    """A layer's input: channels-last where the target runs channels-last (inside such a model every conv after the
    first sees channels-last activations)."""
    x = torch.randn(shape, dtype=target.torch_dtype, device=target.device)
    return x.contiguous(memory_format=torch.channels_last) if target.runs_channels_last and x.dim() == 4 else x


def _export_small(module: nn.Module, x: torch.Tensor, path: str) -> None:
    """Export one layer: the TorchScript exporter takes a fraction of a second for a few convs; the
    ``torch.export``-based one (``measure.export_onnx``) is the fallback."""
    from separify.core.measure import export_onnx

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (x,), path, dynamo=False)
    except Exception:  # noqa: BLE001 - the other exporter says why if it fails too
        export_onnx(module, (x,), path)


def measure_modules(modules: Sequence[nn.Module], input_shape: tuple, target: LatencyTarget) -> list[float]:
    """Median milliseconds per call of each of ``modules`` on an input of ``input_shape``, timed on ``target``
    in the same interleaved run (:mod:`separify.core.measure`). For ONNX Runtime, the cost of a session run itself
    (measured on a one-node graph) is subtracted."""
    from separify.core.measure import time_onnxruntime, time_torch

    if target.backend == "onnxruntime":
        # Every session run pays a fixed cost (binding the input, allocating the output) that a layer inside a
        # model does not: it is measured on a one-node graph (a ReLU) in the same run and subtracted. The ReLU's
        # own pass over the input is subtracted with it, which favours the candidates slightly (all by the same ms).
        x = torch.randn(input_shape)
        with tempfile.TemporaryDirectory(prefix="separify-latency-") as tmp:
            paths = []
            for i, module in enumerate([nn.ReLU(), *modules]):
                paths.append(os.path.join(tmp, f"m{i}.onnx"))
                _export_small(copy.deepcopy(module).to("cpu", torch.float32).eval(), x, paths[-1])
            timings = time_onnxruntime(paths, [x], threads=target.threads, min_run_time=target.min_run_time,
                                       spinning=False)
        base, times = timings[0].median_ms, [t.median_ms for t in timings[1:]]
        return [max(t - base, 0.05 * t) for t in times]
    else:
        prepared = [_prepare(m, target) for m in modules]
        timings = time_torch(prepared, [_input(input_shape, target)], device=target.device, threads=target.threads,
                             min_run_time=target.min_run_time)
    timings = timings if isinstance(timings, list) else [timings]
    return [t.median_ms for t in timings]


def time_model(models: Sequence[nn.Module], inputs: tuple, target: LatencyTarget, *, scale: float = 1.0,
               run_time: float | None = None, either_format: Sequence[bool] = ()):
    """Whole-model :class:`~separify.core.measure.Timing` of each of ``models`` on ``target`` (interleaved, for
    ``run_time`` seconds of timed calls each, default ``scale`` × 20 × the target's ``min_run_time`` and at least
    ``scale`` seconds), at the target's batch size (the inputs' first sample repeated). The one timing protocol of
    the conversion's check and the report.

    PyTorch targets: the inputs stay as given (contiguous, as a user calls the model); where the target runs
    channels-last, the models' 4-D weights are, so their convs run channels-last. A model flagged in
    ``either_format`` (the original) is also timed with contiguous weights in the same run, and the faster of its
    two readings is returned: the baseline is the original at its own best, not in a format that suits separify."""
    from separify.core.measure import export_onnx, frozen_mode, time_onnxruntime, time_torch

    inputs = tuple(_at_batch(t, target.batch_size) for t in inputs)
    run_time = run_time if run_time is not None else scale * max(20 * target.min_run_time, 1.0)
    if target.backend == "onnxruntime":
        with tempfile.TemporaryDirectory(prefix="separify-latency-") as tmp:
            paths = []
            for i, model in enumerate(models):
                paths.append(os.path.join(tmp, f"model{i}.onnx"))
                with frozen_mode(model):
                    export_onnx(model, inputs, paths[-1])
            return time_onnxruntime(paths, list(inputs), threads=target.threads, min_run_time=run_time)
    prepared, owner = [], []  # owner[i]: which of ``models`` prepared[i] is
    for i, m in enumerate(models):
        prepared.append(_prepare(m, target))
        owner.append(i)
        if target.runs_channels_last and i < len(either_format) and either_format[i]:
            prepared.append(_prepare(m, target, channels_last=False))
            owner.append(i)
    xs = tuple(t.to(device=target.device, dtype=target.torch_dtype) if t.is_floating_point() else t for t in inputs)
    timed = time_torch(prepared, xs, device=target.device, threads=target.threads, min_run_time=run_time)
    best: dict[int, Any] = {}
    for i, t in zip(owner, timed):
        if i not in best or t.median_ms < best[i].median_ms:
            best[i] = t
    return [best[i] for i in range(len(models))]


def _at_batch(t: torch.Tensor, batch: int | None) -> torch.Tensor:
    if batch is None or not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] == batch:
        return t
    return t[:1].expand(batch, *t.shape[1:]).clone()


# --------------------------------------------------------------------------------------------------------------
# The cache


def injected_timings(models: Sequence[nn.Module], shape: tuple, target: LatencyTarget, timer: Timer,
                     backend: str) -> list:
    """Whole-model times from an injected ``timer(models, input_shape, target)``, checked, as
    :class:`~separify.core.measure.Timing` (one exact reading each)."""
    from separify.core.measure import Timing

    ms = list(timer(list(models), shape, target))
    if len(ms) != len(models) or not all(isinstance(v, (int, float)) and 0 < v < float("inf") for v in ms):
        raise SeparifyError(f"the timing function returned {ms!r} for {len(models)} whole models; expected that "
                            "many positive milliseconds")
    return [Timing(backend, float(v), 0.0, 1, 1, target.threads, target.batch_size) for v in ms]


def module_spec(module: nn.Module) -> dict | None:
    """Everything about ``module`` that its speed depends on (not its weights); ``None`` if not a conv or a
    separable replacement."""
    if isinstance(module, SeparableConv2d):
        return {"op": module.method, "in": module.in_channels, "out": module.out_channels,
                "kernel": list(module.kernel_size), "stride": list(module.stride),
                "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
                "dilation": list(module.dilation), "padding_mode": module.padding_mode,
                "bias": module.bias is not None, "rank": module.rank, "layout": module.layout}
    if type(module) is nn.Conv2d:
        return {"op": "conv", "in": module.in_channels, "out": module.out_channels,
                "kernel": list(module.kernel_size), "stride": list(module.stride),
                "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
                "dilation": list(module.dilation), "groups": module.groups, "padding_mode": module.padding_mode,
                "bias": module.bias is not None}
    return None


def default_cache_path() -> Path:
    """``$SEPARIFY_CACHE_DIR/latency.json``, else ``$XDG_CACHE_HOME/separify/latency.json``, else
    ``~/.cache/separify/latency.json``."""
    if os.environ.get("SEPARIFY_CACHE_DIR"):
        return Path(os.environ["SEPARIFY_CACHE_DIR"]) / "latency.json"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "separify" / "latency.json"


class LatencyCache:
    """Measured times on disk: one JSON object ``{key: milliseconds}`` for layers, ``{key: Timing fields}`` for
    whole models.

    A layer's key holds the machine and software (:func:`machine_key`), the input shape incl. batch size, and the
    module configuration and layout (:func:`module_spec`); a whole model's key (:meth:`models_key`) the structures of the models timed together
    instead, so that a second conversion of the same model on the same machine times nothing. Writes are atomic and merge with what another
    process wrote meanwhile; an unreadable file is ignored with a warning (and replaced on the next save).
    ``LatencyCache(None)`` keeps the times in memory only.
    """

    VERSION = 2

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, float | dict] = self._read() if self.path is not None else {}
        self.hits = self.misses = 0
        self._new: dict[str, float | dict] = {}

    def _read(self) -> dict[str, float | dict]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") != self.VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {self.VERSION}")
            return {str(k): v if isinstance(v, dict) else float(v) for k, v in data["times_ms"].items()}
        except Exception as exc:  # noqa: BLE001 - a damaged cache must not stop a conversion
            warnings.warn(f"ignoring the latency cache {self.path}: {first_line(exc)}", stacklevel=3)
            return {}

    @staticmethod
    def key(target: LatencyTarget, spec: dict, input_shape: tuple) -> str:
        return json.dumps({"machine": machine_key(target), "module": spec, "input": list(input_shape)}, sort_keys=True)

    @staticmethod
    def models_key(target: LatencyTarget, fingerprints: Sequence[str], input_shapes: Sequence[tuple],
                   run_time: float) -> str:
        """The key of whole models timed together (interleaved): the machine, each model's structure
        (``fingerprints``; weights left out, speed does not depend on them), the input shapes and the run time.
        Models timed together are cached together, so a ratio always compares readings of one run."""
        return json.dumps({"machine": machine_key(target), "models": list(fingerprints), "batch": target.batch_size,
                           "inputs": [list(s) for s in input_shapes], "run_time": run_time}, sort_keys=True)

    def get_timings(self, key: str) -> list | None:
        """Cached whole-model :class:`~separify.core.measure.Timing` s, in the order timed (``None``: not cached)."""
        from separify.core.measure import Timing

        value = self.entries.get(key)
        try:
            timings = [Timing(**t) for t in value["timings"]] if isinstance(value, dict) else None
        except (TypeError, KeyError):  # written by another version
            timings = None
        if timings is None:
            self.misses += 1
        else:
            self.hits += 1
        return timings

    def put_timings(self, key: str, timings: Sequence) -> None:
        self.put(key, {"timings": [dataclasses.asdict(t) for t in timings]})

    def get(self, key: str) -> float | None:
        value = self.entries.get(key)
        if not isinstance(value, float):
            value = None
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str, ms: float | dict) -> None:
        self.entries[key] = ms
        self._new[key] = ms

    def save(self) -> None:
        """Write the new entries (merged into the file's current content) atomically."""
        if self.path is None or not self._new:
            return
        from separify.io.files import atomic_write

        merged = self._read()
        merged.update(self._new)
        text = json.dumps({"version": self.VERSION, "times_ms": merged}, indent=0, sort_keys=True)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))
        except OSError as exc:
            warnings.warn(f"could not write the latency cache {self.path}: {first_line(exc)}", stacklevel=2)
            return
        self.entries.update(merged)
        self._new.clear()


# --------------------------------------------------------------------------------------------------------------
# Candidates


def rank_grid(method: str, saving_ranks: Sequence[int], *, multiples: Sequence[int] = (16, 8), ratio: float = 1.5,
              max_points: int = 12) -> list[int]:
    """The ranks to time for one layer, from the ranks that save FLOPs (ascending).

    dw-pw: every saving ``K`` (at most ``max_points``, geometrically spaced). pw-dw-pw: multiples of the first of
    ``multiples`` that has any (16: AVX-512's blocked layouts in oneDNN and ONNX Runtime, tensor-core tiles; then 8),
    geometrically spaced by about ``ratio``, always with the largest; a layer too small for any multiple gets its
    saving ranks, thinned the same way.
    """
    ranks = [int(r) for r in saving_ranks]
    if not ranks:
        return []
    if method == "pw-dw-pw":
        for multiple in multiples:
            friendly = [r for r in ranks if r % multiple == 0]
            if friendly:
                ranks = friendly
                break
    picked = [ranks[0]]
    for r in ranks[1:]:
        if r >= picked[-1] * ratio or (method == "dw-pw" and len(ranks) <= max_points):
            picked.append(r)
    if picked[-1] != ranks[-1]:
        picked.append(ranks[-1])
    if len(picked) > max_points:  # keep both ends, thin the middle evenly
        idx = sorted({round(i * (len(picked) - 1) / (max_points - 1)) for i in range(max_points)})
        picked = [picked[i] for i in idx]
    return picked


def layout_width(rank: int, layout: str) -> int:
    """The number of intermediate channels a layout runs with (``padN`` rounds the rank up to a multiple of N)."""
    if layout.startswith("pad") and layout[3:].isdigit():
        n = int(layout[3:])
        return -(-rank // n) * n
    return rank


@dataclass
class LayerTimes:
    """Measured times of one layer: the dense conv and, per rank, the fastest layout.

    ``all`` holds every (rank, layout, ms) timed, for the record and the benchmark.
    """

    dense_ms: float
    best: dict[int, tuple[str, float]] = field(default_factory=dict)
    all: list[tuple[int, str, float]] = field(default_factory=list)

    def allowed(self, margin: float) -> dict[int, tuple[str, float]]:
        """The ranks whose fastest layout beats the dense conv by at least ``margin`` (a fraction)."""
        return {r: v for r, v in self.best.items() if v[1] <= (1.0 - margin) * self.dense_ms}

    def fastest(self) -> tuple[int, str, float] | None:
        if not self.best:
            return None
        r = min(self.best, key=lambda k: self.best[k][1])
        return r, *self.best[r]


class LayerTimer:
    """Times layers on a target through the cache (or an injected timing function, uncached)."""

    def __init__(self, target: LatencyTarget, *, cache: LatencyCache | None = None, timer: Timer | None = None):
        self.target = target
        self.cache = cache if cache is not None else LatencyCache(None)
        self.timer = timer

    def time(self, conv: nn.Conv2d, method_cls: type[SeparableConv2d], ranks: Sequence[int], input_shape: tuple,
             *, example_batch: int | None = None, width_ok: Callable[[int], bool] | None = None) -> LayerTimes:
        """Time ``conv`` and its replacements at ``ranks`` in each layout at ``input_shape``. With a target batch
        size, the leading dimension is scaled by target batch / ``example_batch`` (a conv may see B·T samples);
        ``width_ok(width)`` filters the padded layouts by the width they give. Candidates carry random weights:
        speed does not depend on the values."""
        batch = input_shape[0]
        if self.target.batch_size:
            batch = input_shape[0] * self.target.batch_size // example_batch if example_batch else \
                self.target.batch_size
        shape = (batch, *input_shape[1:])
        candidates: list[tuple[int | None, str | None, nn.Module]] = [(None, None, conv)]
        for r in ranks:
            probe = method_cls.like(conv, r, device="meta")
            for layout in probe.layouts():
                if width_ok is not None and layout != probe.LAYOUTS[0] and not width_ok(layout_width(r, layout)):
                    continue
                candidates.append((r, layout, method_cls.like(conv, r, device="cpu").set_layout(layout)))
        if self.timer is not None:  # injected: no cache, the function decides
            ms = list(self.timer([c for _, _, c in candidates], shape, self.target))
        else:
            keys = [LatencyCache.key(self.target, module_spec(c), shape) for _, _, c in candidates]
            ms = [self.cache.get(k) for k in keys]
            todo = [i for i, v in enumerate(ms) if v is None]
            if todo:
                try:
                    measured = measure_modules([candidates[i][2] for i in todo], shape, self.target)
                except Exception as exc:  # noqa: BLE001 - an export or device failure: one clear message
                    raise SeparifyError(f"could not time the candidates of a {tuple(conv.weight.shape)} conv on "
                                        f"{self.target.describe()}: {type(exc).__name__}: {first_line(exc)}") from None
                for i, v in zip(todo, measured):
                    ms[i] = v
                    self.cache.put(keys[i], v)
        if len(ms) != len(candidates) or not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0
                                                 for v in ms):
            raise SeparifyError(f"the timing function returned {ms!r} for {len(candidates)} modules; expected that "
                                "many positive milliseconds")
        times = LayerTimes(float(ms[0]))
        for (r, layout, _), v in zip(candidates[1:], ms[1:]):
            times.all.append((r, layout, float(v)))
            if r not in times.best or v < times.best[r][1]:
                times.best[r] = (layout, float(v))
        return times


class LatencyPlanner:
    """The latency side of rank selection (used by :func:`separify.planning.plan.choose_ranks`): times each layer's
    candidates and says which are allowed, recording the times and the reasons on the layer records."""

    def __init__(self, layer_timer: LayerTimer, margin: float, *, original_ms: float | None = None,
                 batch_size: int | None = None, on_layer: Callable[[str], None] | None = None) -> None:
        self.timer = layer_timer
        self.on_layer = on_layer  # called with each layer's name before its candidates are timed
        self.margin = margin
        self.example_batch = batch_size
        self.original_ms = original_ms  # whole original model on the target (latency budgets only)
        self.budget_scale = 1.0  # the layer-time budget's correction from whole-model measurements
        self.where = layer_timer.target.describe(batch_size)

    def options(self, rec, conv: nn.Conv2d, input_shapes: Sequence[tuple], ranks: Sequence[int],
                width_ok: Callable[[int], bool] | None = None, *, method: str | None = None,
                refused: Callable[[str], None] | None = None) -> dict[int, tuple[str, float]]:
        """``{rank: (fastest layout, ms)}`` of the form ``method`` (default the plan's) for the ranks measured faster
        than the dense conv by the margin; with none, the record is skipped with
        :attr:`~separify.records.Reason.NOT_FASTER` and what was measured, or, with ``refused``, that text is
        handed to it instead (the record stays planned). Sets the plan's ``time_before_ms``. A layer called several
        times is timed at its first call's shape, times the number of calls."""
        method = method or rec.method
        if self.on_layer is not None:
            self.on_layer(rec.name)
        times = self.timer.time(conv, FORMS[method], ranks, input_shapes[0], example_batch=self.example_batch,
                                width_ok=width_ok)
        calls = len(input_shapes)
        if calls > 1:
            times = LayerTimes(times.dense_ms * calls, {r: (lay, ms * calls) for r, (lay, ms) in times.best.items()},
                               [(r, lay, ms * calls) for r, lay, ms in times.all])
        rec.plan.time_before_ms = times.dense_ms
        allowed = times.allowed(self.margin)
        if not allowed:
            best = times.fastest()
            what = f"rank {best[0]} {best[1]}: {best[2]:.3g} ms" if best else "none"
            text = (f"no replacement measured faster than the dense conv by {self.margin:.0%} on {self.where} "
                    f"(dense {times.dense_ms:.3g} ms; fastest {method} {what})")
            if refused is None:
                rec.skip_with(Reason.NOT_FASTER, text)
            else:
                refused(text)
        return allowed

    def save(self) -> None:
        self.timer.cache.save()
