"""The output reconstruction's steps in bfloat16 against float32: conversion time, the stage's time, accuracy.

Run from the repository root (``pip install -e '.[bench]'``, ``pip install --no-deps ddddocr==1.6.1`` and Debian's
``fonts-dejavu-core`` for the OCR network)::

    python benchmarks/bench_output_precision.py [--targets 0.5,0.25] [--forms dw-pw,pw-dw-pw,auto] [--resnet50]

The OCR network (ddddocr ``common.onnx`` through onnx2torch, the PyTorch path), 256 calibration words, FLOPs
objective, each target and form converted twice with the calibration defaults, once with
``calib_precision="float32"`` and once with the default ``"auto"`` (bfloat16 steps where the CPU computes bfloat16
natively and the stage costs at least ``AUTO_FLOPS``), in that order. On this network the calibration passes run in
float32 under both settings (one pass over 256 words is below ``AUTO_FLOPS``), so only the output reconstruction's
number format differs. ``--resnet50``: torchvision ResNet-50 (random weights, 224², 256 random images), pw-dw-pw at
FLOPs 0.5, the same two settings; there ``"float32"`` also keeps the calibration passes in float32. Wall-clock
seconds, calibration included, evaluation excluded; compare within one run (the machine's speed drifts).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

import separify
from _common import write_result
from separify.calibration.precision import native_bfloat16
from separify.core.measure import cpu_name

sys.path.insert(0, str(Path(__file__).parent))
from bench_calibration import _setup, _whole_target  # noqa: E402

warnings.filterwarnings("ignore")
PRECISIONS = ("float32", "auto")


def _cell(res: separify.ConvertResult, seconds: float, accuracy: str) -> str:
    fit = res.output_fit
    return (f"{accuracy} ({seconds:.1f} s; stage {fit.seconds:.1f} s, {fit.precision}, "
            f"E {fit.error_before:.4f} → {fit.error_after:.4f})")


def ocr_rows(lines: list[str], targets: list[float], forms: list[str]) -> None:
    setup = _setup("ocr")
    model, example, evaluate, data = setup["model"], setup["example"], setup["evaluate"], setup["calib"]
    lines += ["", f"### {setup['name']}", "", f"Original **{evaluate(model):.3f}**; {setup['calib_note']}. Cells: "
              "accuracy (conversion s; output reconstruction s, its number format, held-out E before → after).",
              "", "| target | form | calib_precision='float32' | 'auto' (default) |", "|---|---|---|---|"]
    for target in targets:
        whole, label = _whole_target(setup, target)
        for method in forms:
            cells = []
            for precision in PRECISIONS:
                t0 = time.perf_counter()
                res = separify.convert(model, example_inputs=example, objective="flops", method=method, flops=whole,
                                       calibration=data, calib_precision=precision)
                seconds = time.perf_counter() - t0
                cells.append(_cell(res, seconds, f"{evaluate(res.model):.3f}"))
            lines.append(f"| {label} | {method} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)


def resnet50_rows(lines: list[str]) -> None:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    data = torch.randn(256, 3, 224, 224)
    lines += ["", "### torchvision ResNet-50 (random weights), 224², 256 calibration images, pw-dw-pw, FLOPs 0.5", "",
              "| calib_precision | conversion (stage s, its number format, held-out E before → after) |",
              "|---|---|"]
    for precision in PRECISIONS:
        t0 = time.perf_counter()
        res = separify.convert(model, example_inputs=data[:1], objective="flops", method="pw-dw-pw", flops=0.5,
                               calibration=data, calib_precision=precision)
        lines.append(f"| {precision} | {_cell(res, time.perf_counter() - t0, '-')} |")
        print(lines[-1], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="0.5,0.25")
    ap.add_argument("--forms", default="dw-pw,pw-dw-pw,auto")
    ap.add_argument("--resnet50", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/output_precision_2026-12-07.md"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    cpu = cpu_name()
    native = "native bfloat16" if native_bfloat16(torch.device("cpu")) else "no native bfloat16"
    lines = [f"Command: `python benchmarks/bench_output_precision.py --targets {args.targets} --forms {args.forms}"
             f"{' --resnet50' if args.resnet50 else ''}`; {torch.get_num_threads()} threads, {cpu} ({native}), "
             f"torch {torch.__version__}, separify {separify.__version__}. No fine-tuning."]
    ocr_rows(lines, [float(t) for t in args.targets.split(",")], args.forms.split(","))
    if args.resnet50:
        resnet50_rows(lines)
    write_result(args.out, lines)


if __name__ == "__main__":
    main()
