"""Where the time goes: ``torch.profiler`` on an original model and its conversion, by op kind and by layer.

Run from the repository root (``pip install -e '.[bench]'`` first)::

    python benchmarks/profile_layers.py [--model embedded|resnet18|resnet50] [--latency X] [--iters 50]
                                        [--out benchmarks/results/profile_<model>.md]

The model (as in ``benchmarks/bench_speed.py``: the embedded Fashion-MNIST ResNet with its calibration data, or a
torchvision ResNet with random weights) is converted for PyTorch on the CPU, batch 1, 2 threads —
``separify.convert(model, example_inputs=x, target=LatencyTarget("cpu", threads=2, batch_size=1))`` with the
library's defaults, or with ``latency=X``. Then, single-threaded Python, 2 intra-op threads, batch 1, no gradients:

1. Op kinds. ``--iters`` calls of each model under ``torch.profiler`` (CPU activity, input shapes recorded), after
   ``--warmup`` calls. Every top-level ATen op (one not called by another op) is put in a kind by its name and,
   for convolutions, by its weight shape: dense conv (groups 1, kernel larger than 1×1), depthwise conv
   (groups == input channels), pointwise 1×1 conv, grouped conv (other groups), batch norm, activation, add,
   other; its CPU time (its own and its callees', i.e. the summed self CPU time of its subtree) is added to that
   kind. "outside ops" is the rest of each call's time (Python, module dispatch). Columns: the original as given,
   the original with every conv→BatchNorm pair folded (``separify.planning.latency.fold_batchnorms``, how
   separify times the original: the converted model has its BatchNorms folded too), and the converted model; ms
   per call and share of that model's total.
2. Layers. Once more with a ``record_function`` range around every layer (module forward hooks): each separable
   replacement as one layer, every other leaf module as one. The ten layers of the converted model that take the
   most time, with the same layer of the original where it has one. Hooks and the profiler add a few µs per op and
   per layer, so profiled totals exceed the unprofiled times printed at the top (``time_model``, interleaved).
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402

import bench_speed as bs  # noqa: E402  (models, calibration data, the API checks)
import separify  # noqa: E402
from separify.core import measure  # noqa: E402
from separify.core.modules import SeparableConv2d  # noqa: E402

ITER = "separify-profile::call"
LAYER = "separify-layer::"
KINDS = ("dense conv", "depthwise conv", "pointwise 1×1 conv", "grouped conv", "batch norm", "activation", "add",
         "other", "outside ops")
ACTIVATIONS = {"relu", "relu_", "silu", "silu_", "sigmoid", "sigmoid_", "hardswish", "hardswish_", "hardsigmoid",
               "hardsigmoid_", "gelu", "leaky_relu", "leaky_relu_", "clamp", "clamp_", "clamp_min", "clamp_min_",
               "hardtanh", "hardtanh_", "threshold", "threshold_", "elu", "elu_", "mish", "tanh", "tanh_", "relu6",
               "prelu"}
ADDS = {"add", "add_"}


def conv_kind(x_shape, w_shape) -> str:
    """Kind of a 2-D convolution from its input (N, C, H, W) and weight (O, C/groups, kh, kw) shapes."""
    if len(x_shape) < 2 or len(w_shape) < 4 or not w_shape[1]:
        return "dense conv"
    groups = x_shape[1] // w_shape[1]
    if groups == 1:
        return "pointwise 1×1 conv" if tuple(w_shape[2:]) == (1, 1) else "dense conv"
    return "depthwise conv" if groups == x_shape[1] else "grouped conv"


def op_kind(evt) -> str:
    name = evt.name.split("::", 1)[-1].split(".", 1)[0]
    if "conv" in name:
        shapes = evt.input_shapes or []
        if len(shapes) >= 2 and shapes[0] and shapes[1]:
            return conv_kind(shapes[0], shapes[1])
        for child in evt.cpu_children:  # shapes not recorded at this level: look one op down
            if "conv" in child.name and len(child.input_shapes or []) >= 2:
                return conv_kind(child.input_shapes[0], child.input_shapes[1])
        return "dense conv"
    if "batch_norm" in name:
        return "batch norm"
    if name in ACTIVATIONS:
        return "activation"
    if name in ADDS:
        return "add"
    return "other"


def _is_range(evt) -> bool:
    return evt.name == ITER or evt.name.startswith(LAYER)


def _top_level(evt) -> bool:
    """An op with no op above it (only our ranges)."""
    if _is_range(evt):
        return False
    p = evt.cpu_parent
    while p is not None:
        if not _is_range(p):
            return False
        p = p.cpu_parent
    return True


# --------------------------------------------------------------------------------------------------- profiling


@dataclass
class Profile:
    per_call_ms: float
    kinds: dict = field(default_factory=dict)  # kind → ms per call
    layers: dict = field(default_factory=dict)  # layer name → ms per call
    outside_layers_ms: float = 0.0


def layer_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Each separable replacement whole, and every other leaf module (not inside a replacement)."""
    out: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, mod in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(mod, SeparableConv2d):
            out[name] = mod
            inside.append(name)
        elif not any(True for _ in mod.children()):
            out[name] = mod
    return out


def _hook(model: nn.Module) -> list:
    handles, stack = [], []
    for name, mod in layer_modules(model).items():
        def pre(_m, _inp, name=name):
            rf = record_function(LAYER + name)
            rf.__enter__()
            stack.append(rf)

        def post(_m, _inp, _out):
            stack.pop().__exit__(None, None, None)

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    return handles


def run_profile(model: nn.Module, x: torch.Tensor, iters: int, warmup: int, layers: bool) -> Profile:
    model = copy.deepcopy(model).eval()
    handles = _hook(model) if layers else []
    try:
        with torch.no_grad():
            for _ in range(warmup):
                model(x)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                    for _ in range(iters):
                        with record_function(ITER):
                            model(x)
    finally:
        for h in handles:
            h.remove()
    events = prof.events()
    calls = [e for e in events if e.name == ITER]
    total_us = sum(e.cpu_time_total for e in calls)
    kinds: dict[str, float] = defaultdict(float)
    for e in events:
        if _top_level(e):
            kinds[op_kind(e)] += e.cpu_time_total
    kinds["outside ops"] = max(total_us - sum(kinds.values()), 0.0)
    out = Profile(total_us / 1e3 / iters, {k: v / 1e3 / iters for k, v in kinds.items()})
    if layers:
        per_layer: dict[str, float] = defaultdict(float)
        for e in events:
            if e.name.startswith(LAYER):
                per_layer[e.name[len(LAYER):]] += e.cpu_time_total
        out.layers = {k: v / 1e3 / iters for k, v in per_layer.items()}
        out.outside_layers_ms = max(out.per_call_ms - sum(out.layers.values()), 0.0)
    return out


def describe_layer(mod: nn.Module | None) -> str:
    if mod is None:
        return ""
    if isinstance(mod, SeparableConv2d):
        return f"{type(mod).__name__} rank {mod.rank}, {mod.layout} ({mod.in_channels}→{mod.out_channels}, " \
               f"{'×'.join(map(str, mod.kernel_size))}, stride {mod.stride[0]})"
    if isinstance(mod, nn.Conv2d):
        w = mod.weight.shape
        kind = conv_kind((1, mod.in_channels), tuple(w))
        return f"{kind} {mod.in_channels}→{mod.out_channels} {'×'.join(map(str, mod.kernel_size))}" \
               f"{', stride ' + str(mod.stride[0]) if mod.stride[0] != 1 else ''}"
    return type(mod).__name__


# --------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded", choices=["embedded", "resnet18", "resnet50"])
    ap.add_argument("--latency", type=float, default=None, help="convert with latency=X (default: library defaults)")
    ap.add_argument("--iters", type=int, default=50, help="profiled calls per model")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--run-time", type=float, default=2.0, help="seconds per model of the unprofiled timing")
    ap.add_argument("--calib-limit", type=int, default=None, help="calibration samples (embedded; default 1000)")
    ap.add_argument("--out", type=Path, default=None, help="write the tables as markdown here")
    args = ap.parse_args(argv)
    if args.iters <= 0 or args.warmup < 0 or args.run_time <= 0:
        raise SystemExit("--iters and --run-time must be positive, --warmup non-negative")

    torch.set_num_threads(bs.THREADS)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    bs.say(f"{command}  ({measure.cpu_name()}, {bs.THREADS} threads)")
    busy = bs.load_warning()
    if busy:
        bs.say(busy)
    subject = bs.load_subject(args.model, None, args.calib_limit)
    setting = "default" if args.latency is None else f"latency{args.latency:g}"
    bs.say(f"{args.model}: converting ({setting}; calibration: {subject.calib_note}) ...")
    t0 = time.perf_counter()
    try:
        result = bs.convert(subject, "cpu", setting)
    except bs.Unsupported as exc:
        raise SystemExit(f"cannot convert with {setting}: {exc}; give --latency X") from None
    seconds = time.perf_counter() - t0
    bs.say(f"converted in {seconds:.1f} s: {len(result.converted)}/{len(result.layers)} layers, FLOPs ratio "
           f"{result.flops_ratio:.3f}, check ratio {bs._fmt(result.latency_ratio)}")
    for w in result.warnings:
        bs.say(f"warning: {w}")

    from separify.planning.latency import fold_batchnorms, time_model

    x = subject.example
    original, converted = subject.model.eval(), result.model.eval()
    folded = fold_batchnorms(copy.deepcopy(original))
    bs.say(f"unprofiled timing, {args.run_time:g} s each, interleaved ...")
    t_orig, t_conv = time_model([original, converted], (x,), bs.latency_target("cpu"), run_time=args.run_time,
                                either_format=[True, False])
    models = {"original": original, "original, BN folded": folded, "converted": converted}
    profiles = {}
    for label, model in models.items():
        bs.say(f"profiling {label}: {args.iters} calls by op kind ...")
        profiles[label] = run_profile(model, x, args.iters, args.warmup, layers=False)
    bs.say(f"profiling original and converted by layer ({args.iters} calls each) ...")
    by_layer = {label: run_profile(models[label], x, args.iters, args.warmup, layers=True)
                for label in ("original", "converted")}

    lines = [f"# Where the time goes: {args.model}, {setting}", "", f"Command: `{command}`", "",
             f"Machine: {measure.cpu_name()}; torch {torch.__version__}, separify {separify.__version__}; "
             f"{bs.THREADS} threads, batch 1, input {tuple(x.shape)}. {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
             *([busy] if busy else []), "",
             f"Conversion ({seconds:.0f} s): {len(result.converted)}/{len(result.layers)} convs replaced, FLOPs ratio "
             f"{result.flops_ratio:.3f}, the conversion's check ratio {bs._fmt(result.latency_ratio)}. Unprofiled "
             f"(`time_model`, {args.run_time:g} s each, interleaved, BatchNorms folded in both): original "
             f"{t_orig.median_ms:.3f} ms, converted {t_conv.median_ms:.3f} ms, ratio "
             f"{bs.ratio_text(t_orig, t_conv)}.", "",
             f"CPU time per call by op kind ({args.iters} profiled calls each):", "",
             "| op kind | " + " | ".join(f"{label} ms | share" for label in profiles) + " |",
             "|---|" + "---:|---:|" * len(profiles)]
    for kind in KINDS:
        if all(p.kinds.get(kind, 0.0) == 0.0 for p in profiles.values()):
            continue
        cells = [f"{p.kinds.get(kind, 0.0):.3f} | {100 * p.kinds.get(kind, 0.0) / p.per_call_ms:.1f}%"
                 for p in profiles.values()]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(f"**{p.per_call_ms:.3f}** | 100%" for p in profiles.values()) + " |")

    conv_layers = layer_modules(converted)
    orig_layers = layer_modules(original)
    lo, lc = by_layer["original"], by_layer["converted"]
    converted_names = {r.name for r in result.converted}
    top = sorted(lc.layers.items(), key=lambda kv: -kv[1])[:10]
    lines += ["", f"Top 10 layers of the converted model by CPU time (profiled with a range per layer: converted "
                  f"total {lc.per_call_ms:.3f} ms per call, original {lo.per_call_ms:.3f} ms):", "",
              "| layer | converted: module | converted ms | share | original: module | original ms |",
              "|---|---|---:|---:|---|---:|"]
    for name, ms in top:
        mark = " (replaced)" if name in converted_names else ""
        orig_ms = lo.layers.get(name)
        lines.append(f"| {name}{mark} | {describe_layer(conv_layers.get(name))} | {ms:.3f} | "
                     f"{100 * ms / lc.per_call_ms:.1f}% | {describe_layer(orig_layers.get(name))} | "
                     f"{'' if orig_ms is None else f'{orig_ms:.3f}'} |")
    lines.append(f"| (outside layers: functional ops such as adds, Python) | | {lc.outside_layers_ms:.3f} | "
                 f"{100 * lc.outside_layers_ms / lc.per_call_ms:.1f}% | | {lo.outside_layers_ms:.3f} |")
    gone = [n for n in orig_layers if n not in conv_layers]
    if gone:
        lines += ["", f"Layers of the original not in the converted model (folded BatchNorms): {len(gone)} "
                      f"({', '.join(gone[:8])}{' ...' if len(gone) > 8 else ''}), "
                      f"{sum(lo.layers.get(n, 0.0) for n in gone):.3f} ms in the original."]
    text_out = args.out
    if text_out is not None:
        write_result(text_out, lines)
    else:
        print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
