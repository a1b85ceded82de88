"""Accuracy of the embedded Fashion-MNIST model after conversion, both forms, several FLOPs targets.

Run from the repository root::

    python benchmarks/bench_embedded.py [--out benchmarks/results/embedded_accuracy.md]

Weight-space initialisation only (no calibration data, no fine-tuning): this is what ``separify convert`` does today.
Accuracy is top-1 on the 1,000 held-out Fashion-MNIST test images shipped with the package. Deterministic (no
timing), so the figures do not depend on the machine beyond floating-point rounding.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

import separify
from _common import write_result
from separify.embedded import load_default_model, load_eval_data
from separify.measure import accuracy

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/embedded_accuracy.md"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = load_default_model()
    images, labels = load_eval_data()
    base = accuracy(model, images, labels)
    lines = [
        f"Embedded FashionResNet, top-1 on {len(images)} held-out images; original: {base:.3f}.",
        "Command: `python benchmarks/bench_embedded.py`", "",
        "| method | FLOPs target | FLOPs after / before | converted layers | mean kernel error | top-1 | convert time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in ("pw-dw-pw", "dw-pw"):
        for target in (0.75, 0.5, 0.35, 0.25):
            t0 = time.perf_counter()
            res = separify.convert(model, example_inputs=images[:1], method=method, flops=target)
            dt = time.perf_counter() - t0
            err = sum(r.rel_error for r in res.converted) / max(len(res.converted), 1)
            lines.append(f"| {method} | {target} | {res.flops_ratio:.3f} | {len(res.converted)}/{len(res.layers)} | "
                         f"{err:.3f} | {accuracy(res.model, images, labels):.3f} | {dt:.2f} |")
            print(lines[-1], flush=True)
    write_result(args.out, lines)


if __name__ == "__main__":
    main()
