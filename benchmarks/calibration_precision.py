"""Calibration in float32 against bfloat16 autocast: conversion time and what the fits reach, on two networks.

Run from the repository root (``pip install -e '.[bench]'``; Debian's ``fonts-dejavu-core`` for the OCR network's
rendered words)::

    python benchmarks/calibration_precision.py [--models ocr,resnet50] [--precisions float32,bfloat16,auto]

Per network and ``calib_precision``: ``separify.convert(..., objective="flops", method="pw-dw-pw", flops=0.5,
calibration=256 samples)`` with every other calibration default, 2 threads. Printed: the conversion's wall-clock
seconds, the mean over the converted layers of their relative output error after the refit
(``calib_error_after``, measured in full precision on the activations the pass gave), and for the OCR network the
word accuracy on 500 eval strings (measured in float32). ResNet-50 has random weights (no accuracy), 256 random
224² images. bfloat16 is only fast where the CPU has it natively (AVX512-BF16 or AMX).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

import separify
from separify.calibration.precision import native_bfloat16

sys.path.insert(0, str(Path(__file__).parent))
warnings.filterwarnings("ignore")


def _setup(name: str):
    if name == "ocr":
        import second_model as sm

        return sm.load_model(), sm.calibration_inputs(256), sm.example_input(), lambda m: sm.evaluate(m, 500)
    import torchvision

    torch.manual_seed(0)
    x = torch.randn(256, 3, 224, 224)
    return torchvision.models.resnet50().eval(), x, x[:1], None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="ocr,resnet50")
    ap.add_argument("--precisions", default="float32,bfloat16,auto")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 2 threads, native bfloat16: "
          f"{native_bfloat16(torch.device('cpu'))}")
    print("| network | calib_precision | convert s | mean layer error after refit | word accuracy |")
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        model, x, example, evaluate = _setup(name)
        for precision in args.precisions.split(","):
            start = time.perf_counter()
            res = separify.convert(model, example_inputs=example, objective="flops", method="pw-dw-pw", flops=0.5,
                                   calibration=x, calib_precision=precision)
            seconds = time.perf_counter() - start
            errors = [r.calib_error_after for r in res.layers if r.calib_error_after is not None]
            acc = f"{evaluate(res.model):.3f}" if evaluate else "–"
            print(f"| {name} | {precision} | {seconds:.1f} | {sum(errors) / len(errors):.4f} | {acc} |", flush=True)


if __name__ == "__main__":
    main()
