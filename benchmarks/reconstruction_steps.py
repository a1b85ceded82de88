"""Time of the layer-wise reconstruction's steps on ResNet-50's layer shapes, optionally against another checkout.

Run from the repository root (``pip install -e '.[bench]'``)::

    python benchmarks/reconstruction_steps.py [--base PATH] [--steps 60] [--repeats 3] [--targets bfloat16]

For each shape of ResNet-50's 3×3 convs (rank-1 pw-dw-pw replacements, as ``flops=0.5`` gives them), 256 random
input samples in the channels-last layout (as the refit pass hands them over) and targets from the dense conv,
``reconstruct(..., steps=STEPS, batch_size=8)`` is timed inside :func:`~separify.calibration.reuse_freed_memory`,
as the refit pass runs it, including its two checks on 64 samples; the best of ``--repeats`` runs is printed as
milliseconds per step. With ``--base PATH`` (a checkout of another commit), that
checkout's ``separify/calibration/reconstruct.py`` runs too, alternating with this one, with its targets in the
layout that checkout's observation pass keeps them in (``--base-layout``, default ``nchw``, what separify kept
before 2026-12-06), 2 threads. ``--targets bfloat16``: the targets in bfloat16, as the observation pass keeps
them where the passes run under bfloat16 autocast (ResNet-50 on an AVX512-BF16 CPU).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

import separify.calibration.reconstruct as current
from separify.calibration import reuse_freed_memory
from separify.core.modules import PwDwPwConv2d
from _common import load_base

SHAPES = [(64, 56, 1), (128, 56, 2), (128, 28, 1), (256, 14, 1), (512, 7, 1)]  # (channels, input size, stride)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, help="a checkout of another commit to compare with")
    ap.add_argument("--base-layout", choices=["nchw", "channels-last"], default="nchw")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--targets", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cl = torch.channels_last
    versions = [("this checkout", current, cl)]
    if args.base is not None:
        base_layout = cl if args.base_layout == "channels-last" else torch.contiguous_format
        versions.insert(0, ("base", load_base(args.base, "separify/calibration/reconstruct.py"), base_layout))
    for m, size, stride in SHAPES:
        conv = torch.nn.Conv2d(m, m, 3, padding=1, stride=stride)
        start = PwDwPwConv2d.from_conv(conv, rank=1)
        x = torch.randn(256, m, size, size).contiguous(memory_format=cl)
        with torch.no_grad():
            y = conv(x[:64]).repeat(4, 1, 1, 1).to(getattr(torch, args.targets))
        best = {name: float("inf") for name, _, _ in versions}
        for _ in range(args.repeats):
            for name, module, layout in versions:
                layer, target = copy.deepcopy(start), y.contiguous(memory_format=layout)
                with reuse_freed_memory():  # freed blocks reused, as in the refit pass: no fresh pages per step
                    t0 = time.perf_counter()
                    module.reconstruct(layer, [x], [target], steps=args.steps, lr=3e-3, batch_size=8, seed=0)
                    best[name] = min(best[name], time.perf_counter() - t0)
        cells = ", ".join(f"{name}: {seconds / args.steps * 1e3:.2f} ms/step" for name, seconds in best.items())
        print(f"{m} channels, {size}² input, stride {stride}: {cells}", flush=True)


if __name__ == "__main__":
    main()
