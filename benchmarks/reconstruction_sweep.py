"""Layer-wise reconstruction settings on the OCR network at whole-model FLOPs 0.5: accuracy against conversion time.

Run from the repository root (``pip install -e '.[bench]'`` and Debian's ``fonts-dejavu-core``)::

    python benchmarks/reconstruction_sweep.py [--method pw-dw-pw] STEPS:BATCH:LR [...]

Each setting converts ddddocr's ``common.onnx`` recogniser (``benchmarks/second_model.py``) with 256 rendered
calibration words and the calibration defaults except ``calib_steps=STEPS, calib_batch_size=BATCH, calib_lr=LR``
(FLOPs objective), and prints the conversion time and the word accuracy on the 500 eval strings.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

import separify

sys.path.insert(0, str(Path(__file__).parent))
import second_model as sm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("settings", nargs="+", help="STEPS:BATCH:LR")
    ap.add_argument("--method", default="pw-dw-pw")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    model, example, calib = sm.load_model(), sm.example_input(), sm.calibration_inputs(256)
    for setting in args.settings:
        steps, batch, lr = setting.split(":")
        t0 = time.perf_counter()
        res = separify.convert(model, example_inputs=example, objective="flops", method=args.method, flops=0.5,
                               calibration=calib, calib_steps=int(steps), calib_batch_size=int(batch),
                               calib_lr=float(lr))
        seconds = time.perf_counter() - t0
        print(f"{args.method} {setting}: convert {seconds:.1f} s, word accuracy {sm.evaluate(res.model, 500):.3f}",
              flush=True)


if __name__ == "__main__":
    main()
