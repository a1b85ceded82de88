"""Time of the observation pass's input moments on ResNet-50's k×k conv shapes, optionally against another checkout.

Run from the repository root (``pip install -e '.[bench]'``)::

    python benchmarks/observation_moments.py [--base PATH] [--calls 20] [--repeats 3]

For each shape of ResNet-50's 3×3 convs and its 7×7 stem, one batch of 8 random inputs in bfloat16 and the
channels-last layout (what the observation pass hands its hooks under bfloat16 autocast at 224²), the moments of one
hook call (``observation._accumulate``: channel moments over every pixel, patch moments over the sample of patches
a 256-image calibration set gives) are timed with autocast off, as the hook runs them; the best of ``--repeats``
runs of ``--calls`` calls is printed in milliseconds per call, and the sum over ResNet-50's 17 layers at 32 calls
each (256 images in batches of 8). With ``--base PATH`` (a checkout of another commit), that checkout's
``separify/calibration/observation.py`` runs too, alternating with this one, 2 threads.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

import separify.calibration.observation as current
from _common import load_base

# (input channels, input size, kernel, stride, how many of ResNet-50's layers have this shape)
SHAPES = [(3, 224, 7, 2, 1), (64, 56, 3, 1, 3), (128, 56, 3, 2, 1), (128, 28, 3, 1, 3), (256, 28, 3, 2, 1),
          (256, 14, 3, 1, 5), (512, 14, 3, 2, 1), (512, 7, 3, 1, 2)]


def _time(module, conv: nn.Conv2d, x: torch.Tensor, calls: int) -> float:
    acc = module._Moments(256)
    with torch.autocast("cpu", enabled=False):
        module._accumulate(conv, x, acc)  # warm-up
        start = time.perf_counter()
        for _ in range(calls):
            module._accumulate(conv, x, acc)
    return (time.perf_counter() - start) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, help="a checkout of another commit to compare with")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    versions = [("this checkout", current)]
    if args.base is not None:
        versions.insert(0, ("base", load_base(args.base, "separify/calibration/observation.py")))
    totals = {name: 0.0 for name, _ in versions}
    for m, size, k, stride, count in SHAPES:
        conv = nn.Conv2d(m, 64, k, stride=stride, padding=k // 2, bias=False)
        x = torch.randn(8, m, size, size).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        best = {name: float("inf") for name, _ in versions}
        for _ in range(args.repeats):
            for name, module in versions:
                best[name] = min(best[name], _time(module, conv, x, args.calls))
        for name in best:
            totals[name] += best[name] * count * 32
        cells = ", ".join(f"{name}: {seconds * 1e3:.2f} ms/call" for name, seconds in best.items())
        print(f"{m} channels, {size}² input, {k}×{k}, stride {stride}: {cells}", flush=True)
    print("ResNet-50, 256 images (17 layers × 32 calls): " + ", ".join(f"{name}: {seconds:.2f} s"
                                                                       for name, seconds in totals.items()))


if __name__ == "__main__":
    main()
