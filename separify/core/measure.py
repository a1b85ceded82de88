"""Measurement: FLOPs (``torch.utils.flop_counter.FlopCounterMode``), parameters, conv input shapes, latency
(``torch.utils.benchmark`` on CPU, CUDA events on a GPU, ONNX Runtime on CPU) and quality (top-k accuracy,
agreement with the original).

FLOPs follow PyTorch's convention: one multiply-add counts as 2 FLOPs (FLOPs = 2 × MACs).

Latency is a distribution, not a number: every :class:`Timing` carries the median and the interquartile range of
repeated timed blocks after warm-up, the number of runs, the threads and the batch size, and says when the spread is
too large to trust (``noisy``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import platform
import statistics
import time
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from separify.config import class_axis

__all__ = ["count_flops", "count_params", "conv_input_shapes", "module_flops", "affine_flops", "accuracy",
           "topk_accuracy", "agreement", "first_output", "frozen_mode", "Timing", "time_torch", "time_onnxruntime",
           "export_onnx", "state_dict_bytes", "cpu_name", "param_dtype", "implausible", "NOISY_SPREAD"]

#: A timing whose interquartile range exceeds this fraction of its median is flagged as noisy.
NOISY_SPREAD = 0.10


def _as_tuple(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


@contextmanager
def frozen_mode(*models: nn.Module):
    """Eval mode for every submodule while inside (BatchNorm uses, and never updates, its running statistics;
    dropout is off), then each module's own mode back. Measurement must never change the model it measures."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    for m, _ in saved:
        m.training = False  # set the flag directly: exported graph modules refuse .eval()
    try:
        yield
    finally:
        for m, mode in saved:
            m.training = mode


def count_flops(model: nn.Module, example_inputs, on_call: Callable[[], None] | None = None) -> int:
    """Total FLOPs of one forward pass of ``model`` on ``example_inputs`` (no gradients, eval mode).
    ``on_call()``: after each module call of that pass (for a progress bar)."""
    counter = FlopCounterMode(display=False)
    with ExitStack() as stack, torch.no_grad(), frozen_mode(model), counter:
        if on_call is not None:
            hook = nn.modules.module.register_module_forward_hook(lambda *_: on_call())
            stack.callback(hook.remove)
        model(*_as_tuple(example_inputs))
    return int(counter.get_total_flops())


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def conv_input_shapes(model: nn.Module, example_inputs, names: Iterable[str]) -> dict[str, list[tuple[int, ...]]]:
    """Run ``model`` once and record the input shape of every call of the named submodules.

    A module called several times (shared weights) gets one shape per call; one never called gets an empty list.
    The keys are in the order of each module's first call, then the modules never called.
    """
    shapes: dict[str, list[tuple[int, ...]]] = {}
    order: list[str] = []
    modules = dict(model.named_modules(remove_duplicate=False))
    with ExitStack() as stack, torch.no_grad(), frozen_mode(model):
        for name in names:
            shapes[name] = []

            def hook(_mod, args, _name=name):
                if not shapes[_name]:
                    order.append(_name)
                shapes[_name].append(tuple(args[0].shape))

            stack.callback(modules[name].register_forward_pre_hook(hook).remove)
        model(*_as_tuple(example_inputs))
    return {n: shapes[n] for n in order + [n for n in shapes if not shapes[n]]}


def module_flops(module: nn.Module, input_shapes: Sequence[tuple[int, ...]]) -> int:
    """FLOPs of ``module`` summed over calls with inputs of ``input_shapes``, counted on meta tensors (no compute).

    ``module`` may live on any device; it is never run on real data here.
    """
    meta = module if _is_meta(module) else _meta_copy(module)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        for shape in input_shapes:
            meta(torch.empty(shape, device="meta", dtype=param_dtype(meta)))
    return int(counter.get_total_flops())


def affine_flops(build, input_shapes: Sequence[tuple[int, ...]]) -> tuple[int, int]:
    """``(a, b)`` with FLOPs(rank) = a + b·rank for a replacement built by ``build(rank)`` on the meta device.

    Both separable forms are affine in their rank (every conv's width is the rank or a multiple of it), so two
    counts give the FLOPs of every rank without building each candidate.
    """
    f1, f2 = module_flops(build(1), input_shapes), module_flops(build(2), input_shapes)
    return 2 * f1 - f2, f2 - f1


def _is_meta(module: nn.Module) -> bool:
    p = next(iter(module.parameters()), None)
    return p is not None and p.is_meta


def param_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first parameter (float32 for a module without parameters)."""
    p = next(iter(module.parameters()), None)
    return p.dtype if p is not None else torch.float32


def _meta_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).to("meta")


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``images`` (N, ...) with integer ``labels`` (N,)."""
    return topk_accuracy(model, images, labels, ks=(1,), batch_size=batch_size)[1]


def topk_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5), *,
                  batch_size: int = 256) -> dict[int, float]:
    """``{k: fraction of samples whose label is among the k largest logits}`` for logits (N, C); ``k > C`` is
    left out."""
    hits: dict[int, int] = {}
    with torch.no_grad(), frozen_mode(model):
        for i in range(0, len(images), batch_size):
            logits = first_output(model(images[i : i + batch_size]))
            if logits.dim() != 2:
                raise ValueError(f"top-k accuracy needs logits of shape (N, classes), got {tuple(logits.shape)}")
            top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (B, k)
            hit = top == labels[i : i + batch_size, None].to(top.device)
            for k in ks:
                if k <= logits.shape[1]:
                    hits[k] = hits.get(k, 0) + int(hit[:, :k].any(1).sum())
    return {k: v / max(len(images), 1) for k, v in hits.items()}


def agreement(reference: nn.Module, candidate: nn.Module, inputs: torch.Tensor, *, class_dim: int | None = None,
              batch_size: int = 256) -> tuple[float | None, float]:
    """How closely ``candidate`` follows ``reference`` on ``inputs`` (N, ...).

    Returns ``(top1, rel_error)``: the fraction of predictions (argmax over ``class_dim``, by default
    :func:`~separify.config.class_axis`, at every remaining position) on which the two agree (``None`` when the
    output has no class dimension of size > 1), and ``‖f'(x) − f(x)‖ / ‖f(x)‖`` over all samples.
    Raises ``ValueError`` if the outputs differ in shape.
    """
    same = positions = 0
    err2 = ref2 = 0.0
    top1 = True
    with torch.no_grad(), frozen_mode(reference, candidate):
        for i in range(0, len(inputs), batch_size):
            x = inputs[i : i + batch_size]
            ref, out = first_output(reference(x)), first_output(candidate(x))
            if ref.shape != out.shape:
                raise ValueError(f"the models' outputs differ in shape: {tuple(ref.shape)} vs {tuple(out.shape)}")
            axis = class_axis(class_dim, ref.dim())
            top1 = top1 and ref.dim() >= 2 and ref.shape[axis] > 1
            if top1:
                match = ref.argmax(axis) == out.argmax(axis)
                same, positions = same + int(match.sum()), positions + match.numel()
            err2 += float((out.double() - ref.double()).pow(2).sum())
            ref2 += float(ref.double().pow(2).sum())
    return (same / max(positions, 1) if top1 else None), math.sqrt(err2) / max(math.sqrt(ref2), 1e-30)


def first_output(out):
    """The first output of a model that returns a tuple or list, else the output itself."""
    return out[0] if isinstance(out, (tuple, list)) else out


def cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``; elsewhere what ``platform`` knows), for reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def state_dict_bytes(model: nn.Module) -> int:
    """Size in bytes of ``torch.save(model.state_dict())``: what the weights cost on disk, format overhead included."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


@dataclass(frozen=True)
class Timing:
    """One latency measurement.

    ``median_ms`` and ``iqr_ms`` are over ``blocks`` timed blocks of repeated calls (``runs`` calls in all, after
    warm-up); ``backend`` is ``"torch-cpu"``, ``"torch-cuda"`` or ``"onnxruntime-cpu"``. ``suspect``: the readings
    were implausible (:func:`implausible`) in two runs in a row, so the figure may not be the model's time.
    """

    backend: str
    median_ms: float
    iqr_ms: float
    runs: int
    blocks: int
    threads: int | None
    batch_size: int | None
    suspect: bool = False

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else float("inf")

    @property
    def noisy(self) -> bool:
        """True when the spread exceeds :data:`NOISY_SPREAD` or there were too few blocks to estimate it."""
        return self.spread > NOISY_SPREAD or self.blocks < 5


#: CUDA events time to about half a microsecond (``torch.cuda.Event.elapsed_time``), in ms.
CUDA_EVENT_RESOLUTION_MS = 0.5e-3
#: ``perf_counter``'s resolution (what ``torch.utils.benchmark`` and ``time_onnxruntime`` read), in ms.
CLOCK_RESOLUTION_MS = time.get_clock_info("perf_counter").resolution * 1e3
#: a zero spread is implausible while another model timed in the same run varied by more than this fraction.
PARTNER_SPREAD = 0.05


def _block_stats(block_ms: Sequence[float]) -> tuple[float, float]:
    """``(median, interquartile range)`` of block readings (ms)."""
    q = statistics.quantiles(block_ms, n=4) if len(block_ms) >= 2 else [block_ms[0]] * 3
    return statistics.median(block_ms), q[2] - q[0]


def _same_to_3_digits(block_ms: Sequence[float]) -> bool:
    return len({f"{v:.3g}" for v in block_ms}) == 1


def implausible(blocks: Sequence[Sequence[float]], resolution_ms: float) -> list[bool]:
    """Per model of one interleaved run (``blocks[i]``: model i's per-call time of each block, ms), whether its
    readings are implausible: a zero spread over ≥ 5 blocks while another model of the run has a spread above
    :data:`PARTNER_SPREAD`, or ≥ 3 blocks all equal to 3 significant digits at a per-call time below 10 ×
    ``resolution_ms`` (the clock's resolution: readings quantised by it)."""
    stats = [_block_stats(b) for b in blocks]
    spreads = [iqr / med if med > 0 else float("inf") for med, iqr in stats]
    flags = []
    for i, (b, (med, iqr)) in enumerate(zip(blocks, stats)):
        partner_varied = any(s > PARTNER_SPREAD for j, s in enumerate(spreads) if j != i)
        frozen = iqr == 0 and len(b) >= 5 and partner_varied
        quantised = len(b) >= 3 and med < 10 * resolution_ms and _same_to_3_digits(b)
        flags.append(frozen or quantised)
    return flags


def _summarise(backend: str, block_ms: list[float], runs: int, threads, batch_size, suspect: bool = False) -> Timing:
    median, iqr = _block_stats(block_ms)
    return Timing(backend, median, iqr, runs, len(block_ms), threads, batch_size, suspect)


def _checked(run: Callable[[], list[tuple[list[float], int]]], resolution_ms: float, backend: str, threads,
             batch_size) -> list[Timing]:
    """The timings of ``run()`` (per model: block readings in ms and timed calls); when any reading is
    :func:`implausible`, ``run()`` once more, and the models still implausible then are marked ``suspect``."""
    timed = run()
    if any(implausible([b for b, _ in timed], resolution_ms)):
        timed = run()
        flags = implausible([b for b, _ in timed], resolution_ms)
    else:
        flags = [False] * len(timed)
    return [_summarise(backend, b, n, threads, batch_size, f) for (b, n), f in zip(timed, flags)]


def _time_blocks(fns: Sequence[Callable[[], object]], *, min_run_time: float, warmup: int, threads: int | None,
                 block_s: float = 0.01, min_blocks: int = 7) -> list[tuple[list[float], int]]:
    """Time each of ``fns`` with ``torch.utils.benchmark.Timer``: ``warmup`` untimed calls each, then blocks of
    ``number`` calls (sized to about ``block_s``), **interleaved** (one block of each function in turn, so that drift
    in the machine's speed hits all of them alike) until every function has had ``min_run_time`` seconds and at
    least ``min_blocks`` blocks. Returns, per function, the per-call time of each block in ms and the timed calls."""
    from torch.utils.benchmark import Timer

    timers = [Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads or torch.get_num_threads()) for fn in fns]
    for fn in fns:
        for _ in range(max(warmup, 0)):
            fn()
    numbers = [max(1, int(block_s / max(t.timeit(1).median, 1e-9))) for t in timers]
    blocks: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    while len(blocks[0]) < min_blocks or time.perf_counter() - start < min_run_time * len(fns):
        for timer, number, out in zip(timers, numbers, blocks):
            out.append(timer.timeit(number).median * 1e3)
    return [(b, n * len(b)) for b, n in zip(blocks, numbers)]


def _time_cuda(fns: Sequence[Callable[[], object]], *, min_run_time: float, warmup: int,
               min_blocks: int = 7) -> list[tuple[list[float], int]]:
    """Time each of ``fns`` on the current CUDA device with CUDA events, one synchronised call per block, the
    functions interleaved as in :func:`_time_blocks`."""
    for fn in fns:
        for _ in range(max(warmup, 0)):
            fn()
    torch.cuda.synchronize()
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < min_blocks or time.perf_counter() - start < min_run_time * len(fns):
        for fn, out in zip(fns, times):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            out.append(begin.elapsed_time(end))
    return [(t, len(t)) for t in times]


def time_torch(models: nn.Module | Sequence[nn.Module], inputs: Sequence[torch.Tensor], *, device: str = "cpu",
               threads: int | None = None, min_run_time: float = 0.5, warmup: int = 3) -> Timing | list[Timing]:
    """Latency of ``model(*inputs)`` in PyTorch eager mode (eval, no gradients) on ``device``.

    Given several models (e.g. an original and its conversion), they are timed in the same interleaved loop and a
    list of timings is returned. CPU: ``torch.utils.benchmark.Timer`` with ``threads`` intra-op threads (default:
    the current setting). CUDA: models and inputs are copied to the GPU (the caller's stay where they are) and
    each call is timed with CUDA events after synchronising. The first dimension of the first input is reported as
    the batch size. Implausible readings (:func:`implausible`) are timed once more, and marked ``suspect`` if they
    stay so.
    """
    single = isinstance(models, nn.Module)
    models = [models] if single else list(models)
    inputs = tuple(inputs)
    batch = int(inputs[0].shape[0]) if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() else None
    cuda = device.startswith("cuda")
    if cuda:
        models = [copy.deepcopy(m).to(device) for m in models]
        inputs = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs)
    with torch.no_grad(), frozen_mode(*models):
        fns = [(lambda m=m: m(*inputs)) for m in models]
        if cuda:
            timings = _checked(lambda: _time_cuda(fns, min_run_time=min_run_time, warmup=warmup),
                               CUDA_EVENT_RESOLUTION_MS, "torch-cuda", None, batch)
        else:
            threads = threads or torch.get_num_threads()
            timings = _checked(lambda: _time_blocks(fns, min_run_time=min_run_time, warmup=warmup, threads=threads),
                               CLOCK_RESOLUTION_MS, "torch-cpu", threads, batch)
    return timings[0] if single else timings


def export_onnx(model: nn.Module, inputs: Sequence[torch.Tensor], path: str | os.PathLike) -> str:
    """Export ``model`` at ``inputs``' shapes to an ONNX file with ``torch.onnx.export``; returns which exporter
    worked. The ``torch.export``-based exporter (needs ``onnxscript``) is tried first, the TorchScript one second."""
    errors = []
    with torch.no_grad(), frozen_mode(model), warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()):  # the exporters print progress lines
        warnings.simplefilter("ignore")
        for dynamo in (True, False):
            try:
                program = torch.onnx.export(model, tuple(inputs), None if dynamo else str(path), dynamo=dynamo)
                if dynamo:
                    program.save(str(path))
                return "torch.export" if dynamo else "TorchScript"
            except Exception as exc:  # noqa: BLE001 - try the other exporter, report both failures
                errors.append(f"{'dynamo' if dynamo else 'TorchScript'} exporter: {type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
    raise RuntimeError("; ".join(errors))


def time_onnxruntime(paths: str | os.PathLike | Sequence[str | os.PathLike], inputs: Sequence[torch.Tensor], *,
                     threads: int | None = None, min_run_time: float = 0.5, warmup: int = 3,
                     spinning: bool = True) -> Timing | list[Timing]:
    """Latency of ONNX models in ONNX Runtime's CPU execution provider with ``threads`` intra-op threads (default:
    PyTorch's current setting), all graph optimisations and ONNX Runtime's default thread spinning on; several paths
    are timed in alternating turns of about 0.25 s (A B A B ...), so that drift in the machine's speed hits them alike.

    ``spinning=False`` turns the intra-op threads' spin-waiting off, so that sessions cannot steal the cores from
    each other, and interleaves the models block by block as :func:`time_torch` does. Each run then pays the
    threads' wake-up (more for graphs of several nodes); separify times single layers that way, where spinning
    sessions made the same conv measure anywhere from 0.9 to 7.7 ms on 2 cores. Implausible readings
    (:func:`implausible`) are timed once more, and marked ``suspect`` if they stay so."""
    import onnxruntime as ort

    single = isinstance(paths, (str, os.PathLike))
    paths = [paths] if single else list(paths)
    threads = threads or torch.get_num_threads()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    fns = []
    for path in paths:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        if len(names) != len(inputs):
            raise RuntimeError(f"the ONNX graph has {len(names)} inputs, {len(inputs)} given")
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)}
        fns.append(lambda session=session, feeds=feeds: session.run(None, feeds))
    batch = int(inputs[0].shape[0]) if inputs and inputs[0].dim() else None
    if not spinning:
        run = (lambda: _time_blocks(fns, min_run_time=min_run_time, warmup=warmup, threads=threads))
    else:
        run = (lambda: _ort_turns(fns, min_run_time=min_run_time, warmup=warmup, threads=threads))
    timings = _checked(run, CLOCK_RESOLUTION_MS, "onnxruntime-cpu", threads, batch)
    return timings[0] if single else timings


def _ort_turns(fns: Sequence[Callable[[], object]], *, min_run_time: float, warmup: int,
               threads: int) -> list[tuple[list[float], int]]:
    """Each of ``fns`` in turns of about a quarter of a second (at least two turns each when there are several),
    blocks as in :func:`_time_blocks`; per function, its block readings (ms per call) and timed calls.

    Not interleaved block by block: each ONNX Runtime session's intra-op threads spin for a while after a run and
    would steal the cores from the next session. On shared machines the speed of a small graph can switch between
    two levels for seconds at a time (benchmarks/results/ort_repeat.md); short turns let every model see the same
    mix of them."""
    single = len(fns) == 1
    blocks: list[list[float]] = [[] for _ in fns]
    runs = [0] * len(fns)
    rounds = 1 if single else max(2, round(min_run_time / 0.25))
    for r in range(rounds):
        for i, fn in enumerate(fns):
            (b, n), = _time_blocks([fn], min_run_time=min_run_time / rounds, warmup=warmup if r == 0 else 1,
                                   threads=threads, min_blocks=7 if single else 4)
            blocks[i] += b
            runs[i] += n
    return list(zip(blocks, runs))
