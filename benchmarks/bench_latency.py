"""Latency-aware conversion (``objective="latency"``): whole-model latency ratios on each target, and the cost of
a dw-pw block with K = 2 against K = 1 in its fastest equivalent layout.

Run from the repository root (``pip install -e '.[bench]'`` first)::

    python benchmarks/bench_latency.py [--targets cpu,onnxruntime] [--models resnet18,resnet50,embedded]
                                       [--threads 2] [--batch-size 1] [--dtype float32] [--out FILE.md]

On a machine with an NVIDIA GPU the same script measures the cuda target, e.g.
``--targets cuda --dtype bfloat16 --channels-last --batch-size 64``.

Part 1, per model and target: ``separify.convert(model, objective="latency", target=...)`` with the default FLOPs
target 0.5 (ranks allocated only among candidates measured faster than the dense conv, in their fastest layout),
and with a latency budget (``latency=0.6``). Columns: FLOPs ratio; the ratio the sum of isolated layer times
predicted; the whole-model ratio ``convert`` measured at the end (1 s per model); then both models timed again for
5 s each, interleaved, on the target: milliseconds and the latency ratio converted / original. torchvision models carry random weights (no accuracy is
claimed); the embedded model is the trained Fashion-MNIST ResNet. Each conversion uses a fresh in-memory timing
cache (no disk cache), so "convert s" includes timing every candidate.

Part 2, per target: for 3×3 convs of ResNet-18's stages, the dense conv, the dw-pw block at K = 1, and at K = 2 in
each layout (multiplier, split, repeat, branches), ms per call, and best-K=2 / K=1.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402

import separify  # noqa: E402
from separify.io.embedded import load_default_model  # noqa: E402
from separify.planning.latency import LatencyTarget, measure_modules, time_model  # noqa: E402
from separify.core.measure import cpu_name  # noqa: E402
from separify.core.modules import DwPwConv2d  # noqa: E402


def _model(name: str):
    torch.manual_seed(0)
    if name == "embedded":
        return load_default_model().eval(), torch.randn(1, 1, 28, 28)
    return getattr(torchvision.models, name)().eval(), torch.randn(1, 3, 224, 224)


def part1(models, targets, args) -> list[str]:
    lines = ["| model | target | setting | converted layers | FLOPs ratio | predicted | convert's check | ms original "
             "| ms converted | latency ratio | latency / FLOPs | convert s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in models:
        model, x = _model(name)
        for backend in targets:
            target = LatencyTarget(backend, batch_size=args.batch_size, dtype=args.dtype,
                                   channels_last=args.channels_last, threads=args.threads,
                                   min_run_time=args.min_run_time)
            for setting, opts in (("flops 0.5", {}), ("latency 0.6", {"latency": 0.6})):
                start = time.perf_counter()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    res = separify.convert(model, example_inputs=x, objective="latency", target=target,
                                           latency_cache=False, **opts)
                seconds = time.perf_counter() - start
                check = res.latency_ratio
                # the same two models again, timed 5 s each (interleaved) for the table
                before, after = time_model([model, res.model], (x,), replace(target, min_run_time=0.25))
                noisy = "*" if before.noisy or after.noisy else ""
                ratio = after.median_ms / before.median_ms
                lines.append(
                    f"| {name} | {target.describe(x.shape[0])} | {setting} | {len(res.converted)}/{len(res.layers)} "
                    f"| {res.flops_ratio:.3f} | {res.latency_predicted:.3f} | {check:.3f} | {before.median_ms:.3g} | "
                    f"{after.median_ms:.3g} | {ratio:.3f}{noisy} | {ratio / res.flops_ratio:.2f} | {seconds:.0f} |")
                print(lines[-1], flush=True)
                for w in caught:
                    print(f"    warning: {w.message}", flush=True)
    return lines


SHAPES = [(64, 56), (128, 28), (256, 14), (512, 7)]


def part2(targets, args) -> list[str]:
    lines = ["| target | layer | dense | K=1 | " + " | ".join(f"K=2 {x}" for x in DwPwConv2d.LAYOUTS)
             + " | best K=2 / K=1 |", "|---|---|---|---|" + "---|" * len(DwPwConv2d.LAYOUTS) + "---|"]
    for backend in targets:
        target = LatencyTarget(backend, batch_size=args.batch_size, dtype=args.dtype, channels_last=args.channels_last,
                               threads=args.threads, min_run_time=max(args.min_run_time, 0.2))
        for channels, size in SHAPES:
            conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            mods = [conv, DwPwConv2d.like(conv, 1)] + [DwPwConv2d.like(conv, 2).set_layout(layout)
                                                      for layout in DwPwConv2d.LAYOUTS]
            ms = measure_modules(mods, (args.batch_size, channels, size, size), target)
            best = min(ms[2:])
            lines.append(f"| {target.describe(args.batch_size)} | {channels}ch {size}×{size} | "
                         + " | ".join(f"{v:.3g}" for v in ms) + f" | {best / ms[1]:.2f} |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default="cpu,onnxruntime")
    p.add_argument("--models", default="resnet18,resnet50,embedded")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--min-run-time", type=float, default=0.05)
    p.add_argument("--parts", default="1,2")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/latency.md"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    targets = [t for t in args.targets.split(",") if t]
    models = [m for m in args.models.split(",") if m]
    device = torch.cuda.get_device_name() if "cuda" in targets and torch.cuda.is_available() else None
    lines = [f"Machine: {cpu_name()}, {torch.get_num_threads()} threads" + (f", GPU {device}" if device else "")
             + f"; torch {torch.__version__}; batch {args.batch_size}, {args.dtype}"
             + (", channels-last" if args.channels_last else ""), "",
             f"Command: python benchmarks/bench_latency.py {' '.join(sys.argv[1:])}", ""]
    if "1" in args.parts.split(","):
        lines += ["Whole models under objective='latency' (* = a noisy timing, IQR > 10% of the median):", ""]
        lines += part1(models, targets, args) + [""]
    if "2" in args.parts.split(","):
        lines += ["One 3×3 conv (stride 1) and its dw-pw blocks, ms per call:", ""]
        lines += part2(targets, args)
    write_result(args.out, lines)


if __name__ == "__main__":
    main()
