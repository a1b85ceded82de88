"""Time of the output reconstruction's stage alone, this checkout against another, alternating in one process.

Run from the repository root (``pip install -e '.[bench]'``; for the OCR network also ``pip install --no-deps
ddddocr==1.6.1`` and Debian's ``fonts-dejavu-core``)::

    python benchmarks/output_stage_speed.py --base PATH [--models ocr resnet50] [--pairs 3] [--steps 100]

Each model is converted once with ``calib_output_steps=0`` (FLOPs objective, whole-model FLOPs 0.5, the other
calibration defaults; the OCR network with ``method="auto"`` on 256 rendered words, torchvision ResNet-50 with
random weights with pw-dw-pw on 256 random 224² images). Then
``fit_output`` (:mod:`separify.calibration.output`) runs ``--steps`` steps on a fresh copy of that converted model,
with the arguments the pipeline gives it (the number format of :func:`~separify.calibration.output.step_dtype`
under ``calib_precision="auto"``, channels-last where the model runs in it), from ``PATH``'s
``separify/calibration/output.py`` (a checkout of another commit) and from this checkout's, alternating, ``--pairs``
times. Printed: each run's seconds and held-out output error after it, 2 threads, the CPU's name. The machine's
speed drifts between minutes; runs side by side in one process are the comparison.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision

import separify
import separify.calibration.output as current
from separify.calibration.precision import runs_channels_last
from separify.core.measure import count_flops, cpu_name
from _common import load_base


def _setup(name: str):
    """``(original model, calibration samples, method)``."""
    if name == "ocr":
        sys.path.insert(0, str(Path(__file__).parent))
        import second_model as sm  # noqa: E402 - needs ddddocr, only here

        return sm.load_model().eval(), sm.calibration_inputs(256), "auto"
    torch.manual_seed(0)
    return torchvision.models.resnet50().eval(), torch.randn(256, 3, 224, 224), "pw-dw-pw"


def _compare(name: str, versions, pairs: int, steps: int) -> None:
    teacher, x, method = _setup(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = separify.convert(teacher, example_inputs=x[:1], objective="flops", method=method, flops=0.5,
                               calibration=x, calib_output_steps=0)
    channels_last = runs_channels_last(teacher, x[:2])
    per_value = count_flops(teacher, (x[:1],)) / x[0].numel()
    for _ in range(pairs):
        for label, module in versions:
            student = copy.deepcopy(res.model).eval()
            params = [p for m in student.modules() if isinstance(m, separify.SeparableConv2d) for p in m.parameters()]
            dtype = module.step_dtype("auto", student, [x], steps=steps, batch_size=8, fixed_batch=None,
                                      flops_per_value=per_value)
            t0 = time.perf_counter()
            fit = module.fit_output(student, params, teacher, [x], steps=steps, lr=6e-4, batch_size=8, seed=0,
                                    dtype=dtype, channels_last=channels_last)
            print(f"{name} {label}: {time.perf_counter() - t0:.1f} s, held-out error {fit.error_before:.4f} -> "
                  f"{fit.error_after:.4f} ({fit.precision})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True, help="a checkout of another commit to compare with")
    ap.add_argument("--models", nargs="+", choices=["ocr", "resnet50"], default=["ocr", "resnet50"])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"CPU: {cpu_name()}, 2 threads")
    versions = [("base", load_base(args.base, "separify/calibration/output.py")), ("this checkout", current)]
    for name in args.models:
        _compare(name, versions, args.pairs, args.steps)


if __name__ == "__main__":
    main()
