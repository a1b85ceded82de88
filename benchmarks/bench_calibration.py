"""Accuracy at aggressive ratios without fine-tuning: weight-space init, calibration, loss-aware allocation and
layer-wise reconstruction, for each form and ``method="auto"``, with conversion times.

Run from the repository root (``pip install -e '.[bench]'``; Debian's ``dataset-fashion-mnist`` for the embedded
model's calibration images, ``fonts-dejavu-core`` for the OCR network's rendered words)::

    python benchmarks/bench_calibration.py [--models embedded,ocr] [--targets 0.5,0.25]

For each model, FLOPs target and form (``dw-pw``, ``pw-dw-pw``, ``auto``), five conversions under the FLOPs
objective (nothing timed on the target, so the accuracy does not depend on this machine's speed):

* weight-space: ``convert`` without data;
* calibrated: 256 calibration samples, ``calib_loss_aware=False, calib_steps=0, calib_output_steps=0`` (the
  defaults before issue 21: the allocation by each layer's own predicted output error, ALS and the least-squares
  refit);
* loss-aware: the same with the Fisher loss-aware weights (``calib_steps=0, calib_output_steps=0``);
* layer reconstruction: loss-aware plus the default layer-wise reconstruction (200 Adam steps on each pw-dw-pw
  replacement, none on dw-pw, whose ALS fits every factor), ``calib_output_steps=0``;
* defaults: all of that plus the output reconstruction (100 Adam steps on all replacements together against the
  original model's outputs).

A target the whole model cannot reach (the OCR network's BiLSTM and linear head carry FLOPs no conv conversion
removes) is replaced by the same fraction of the convertible convs' FLOPs, and the table says so. Conversion
times are wall-clock on this machine with nothing else running, calibration included, evaluation excluded.
``--models resnet50`` times calibrated conversions of torchvision's ResNet-50 (random weights, 224², 256 images).
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
from _common import write_result

sys.path.insert(0, str(Path(__file__).parent))
from bench_accuracy import _fashion_train, embedded_setup, ocr_setup  # noqa: E402

warnings.filterwarnings("ignore")
FORMS = ("dw-pw", "pw-dw-pw", "auto")
CALIB = 256


def _setup(name: str) -> dict:
    if name == "embedded":
        setup = embedded_setup()
        setup["calib"], setup["calib_note"] = _fashion_train(CALIB)[0], f"{CALIB} training images"
        return setup
    setup = ocr_setup(0)
    setup["calib"], setup["calib_note"] = setup["calib"][:CALIB], f"{CALIB} rendered words"
    return setup


def _whole_target(setup: dict, target: float) -> tuple[float, str]:
    """The whole-model FLOPs target, or, where the whole model cannot reach ``target``, the whole-model fraction
    that leaves ``target`` of the convertible convs' FLOPs."""
    res = separify.convert(setup["model"], example_inputs=setup["example"], objective="flops", rank=1)
    convs = sum(r.flops_before for r in res.converted)
    lowest = (res.flops_before - convs + sum(r.flops_after for r in res.converted)) / res.flops_before
    if lowest < target * 0.9:
        return target, f"{target:g} of the whole model"
    whole = (res.flops_before - convs + target * convs) / res.flops_before
    return whole, f"{target:g} of the convertible conv FLOPs (whole model {whole:.3f})"


def _row(setup: dict, method: str, target: float) -> list[str]:
    model, example, evaluate, data = setup["model"], setup["example"], setup["evaluate"], setup["calib"]
    cells = []
    for extra in ({}, dict(calibration=data, calib_loss_aware=False, calib_steps=0, calib_output_steps=0),
                  dict(calibration=data, calib_steps=0, calib_output_steps=0),
                  dict(calibration=data, calib_output_steps=0), dict(calibration=data)):
        t0 = time.perf_counter()
        res = separify.convert(model, example_inputs=example, objective="flops", method=method, flops=target,
                               **extra)
        seconds = time.perf_counter() - t0
        cells.append(f"{evaluate(res.model):.3f} ({seconds:.1f} s)")
        forms = sorted({r.method for r in res.converted})
    reached = f"{res.flops_ratio:.3f}" + (f", forms {'+'.join(forms)}" if method == "auto" else "")
    return [reached] + cells


def resnet50_times(lines: list[str], forms: list[str], samples: int = CALIB) -> None:
    """Calibrated conversion time of torchvision ResNet-50 (random weights, 224²) on ``samples`` random images (the
    time does not depend on what they show), each form and ``auto`` at whole-model FLOPs 0.5 with the calibration
    defaults, FLOPs objective (the latency objective adds the timing of candidates, cached after the first run)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    data = torch.randn(samples, 3, 224, 224)
    lines += ["", f"### torchvision ResNet-50 (random weights), 224², {samples} calibration images", "",
              "| form | FLOPs after / before | convert s, calibrated (defaults) | of which the output reconstruction | "
              "convert s without data |", "|---|---|---|---|---|"]
    for method in forms:
        kw = dict(example_inputs=data[:1], objective="flops", method=method, flops=0.5)
        t0 = time.perf_counter()
        separify.convert(model, **kw)
        plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = separify.convert(model, calibration=data, **kw)
        fit = res.output_fit
        lines.append(f"| {method} | {res.flops_ratio:.3f} | {time.perf_counter() - t0:.1f} | "
                     f"{fit.seconds:.1f} ({fit.steps} steps) | {plain:.1f} |")
        print(lines[-1], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="embedded,ocr", help="embedded, ocr and/or resnet50 (conversion time only)")
    ap.add_argument("--targets", default="0.5,0.25")
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/calibration_2026-12-07.md"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    lines = [f"Command: `python benchmarks/bench_calibration.py --models {args.models} --targets {args.targets} "
             f"--forms {args.forms}`; {torch.get_num_threads()} threads, CPU "
             f"({platform.processor() or platform.machine()}), torch {torch.__version__}, separify "
             f"{separify.__version__}. Accuracy (conversion seconds), no fine-tuning."]
    for name in args.models.split(","):
        if name == "resnet50":
            resnet50_times(lines, args.forms.split(","))
            continue
        setup = _setup(name)
        lines += ["", f"### {setup['name']}", "", f"Original: **{setup['evaluate'](setup['model']):.3f}**. "
                  f"Calibration: {setup['calib_note']}.", "",
                  "| target | form | FLOPs after / before | weight-space | calibrated (before) | + loss-aware | "
                  "+ layer reconstruction | + output reconstruction (defaults) |", "|---|---|---|---|---|---|---|---|"]
        for t in (float(t) for t in args.targets.split(",")):
            whole, label = _whole_target(setup, t)
            for method in args.forms.split(","):
                lines.append("| " + " | ".join([label, method] + _row(setup, method, whole)) + " |")
                print(lines[-1], flush=True)
    write_result(args.out, lines)


if __name__ == "__main__":
    main()
