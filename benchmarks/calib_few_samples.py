"""Calibration with few samples: accuracy of the embedded model, and held-out output error of torchvision ResNet-18.

    python benchmarks/calib_few_samples.py [--out benchmarks/results/calib_few_samples.md]

Part 1: the embedded Fashion-MNIST model, top-1 on the first 500 shipped test images, calibrated on n of the other
500 (n = 2, 8, 32, 128), each form at FLOPs 0.5 and 0.25, with the default alternating least squares and without
it (``calib_als=0``). Part 2: torchvision ``resnet18`` with random weights at 64×64, relative error of the logits
on 16 held-out random inputs, calibrated on n random inputs. The figures before the cross-validated refit and the
copy of in-place-modified outputs (commit e85ae89) are in the README, measured with the same calls.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision

import separify
from separify.io import embedded

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

SAMPLES = (2, 8, 32, 128)


def embedded_table() -> list[str]:
    model = embedded.load_default_model().eval()
    x, y = embedded.load_eval_data()
    pool, test_x, test_y = x[500:], x[:500], y[:500]

    def top1(m) -> str:
        with torch.no_grad():
            return f"{float((m(test_x).argmax(1) == test_y).float().mean()):.3f}"

    lines = [f"Embedded FashionResNet, top-1 on 500 test images (original {top1(model)}); calibrated on n images "
             "(default calibration / `calib_als=0`):", "",
             "| form | FLOPs | weight-space | " + " | ".join(f"n = {n}" for n in SAMPLES) + " |",
             "|---|---|---|" + "---|" * len(SAMPLES)]
    for method in ("pw-dw-pw", "dw-pw"):
        for flops in (0.5, 0.25):
            row = [method, f"{flops}", top1(separify.convert(model, example_inputs=x[:1], flops=flops,
                                                              method=method).model)]
            for n in SAMPLES:
                accs = [top1(separify.convert(model, example_inputs=x[:1], flops=flops, method=method,
                                              calibration=pool[:n], calib_als=als).model) for als in (10, 0)]
                row.append(" / ".join(accs))
            lines.append("| " + " | ".join(row) + " |")
            print(lines[-1], flush=True)
    return lines


def resnet_table() -> list[str]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    held = torch.randn(16, 3, 64, 64)
    with torch.no_grad():
        ref = model(held)

    def err(m) -> str:
        with torch.no_grad():
            return f"{float((m(held) - ref).norm() / ref.norm()):.3f}"

    lines = ["torchvision resnet18, random weights, 64×64: relative error of the logits on 16 held-out random "
             "inputs, calibrated on n random inputs (FLOPs 0.5):", "",
             "| form | weight-space | " + " | ".join(f"n = {n}" for n in SAMPLES) + " |",
             "|---|---|" + "---|" * len(SAMPLES)]
    for method in ("dw-pw", "pw-dw-pw"):
        row = [method, err(separify.convert(model, example_inputs=held[:1], flops=0.5, method=method).model)]
        for n in SAMPLES:
            calib = torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(n))
            row.append(err(separify.convert(model, example_inputs=held[:1], flops=0.5, method=method,
                                            calibration=calib).model))
        lines.append("| " + " | ".join(row) + " |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/calib_few_samples.md"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.time()
    lines = ["# Calibration with few samples", "",
             f"`python benchmarks/calib_few_samples.py`, {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}, separify {separify.__version__}", ""]
    lines += embedded_table() + [""] + resnet_table()
    lines += ["", f"Total {time.time() - start:.0f} s."]
    write_result(args.out, lines)


if __name__ == "__main__":
    main()
