"""The OCR network's word accuracy after calibration only, over several seeds and a larger eval set.

Run from the repository root (``pip install -e '.[bench]'``, ``pip install --no-deps ddddocr==1.6.1`` and Debian's
``fonts-dejavu-core``)::

    python benchmarks/ocr_seed_spread.py [--method auto] [--flops 0.5] [--seeds 0 1 2] [--eval 2000]

ddddocr's ``common.onnx`` recogniser (through onnx2torch, ``benchmarks/second_model.py``) is converted with 256
rendered calibration words and the calibration defaults (FLOPs objective, whole-model ``--flops``), once per
``seed`` (``convert(..., seed=S)``: the CP solver's start, the reconstructions' minibatches and their order); each
conversion's word accuracy is measured on the first ``--eval`` seeded eval strings (the README's and RESULTS' tables
use the first 500), as is the original's. One word in 2,000 is 0.0005; the spread over seeds is the part of a single
run's figure that is luck. Printed: each seed's accuracy, conversion seconds and held-out output error.
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
    ap.add_argument("--method", default="auto")
    ap.add_argument("--flops", type=float, default=0.5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval", type=int, default=2000)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    model, example, calib = sm.load_model(), sm.example_input(), sm.calibration_inputs(256)
    print(f"original: {sm.evaluate(model, args.eval):.4f} on {args.eval} strings "
          f"({sm.evaluate(model, 500):.3f} on the first 500)", flush=True)
    for seed in args.seeds:
        t0 = time.perf_counter()
        res = separify.convert(model, example_inputs=example, objective="flops", method=args.method,
                               flops=args.flops, calibration=calib, seed=seed)
        seconds = time.perf_counter() - t0
        fit = res.output_fit
        print(f"{args.method}, FLOPs {args.flops}, seed {seed}: {sm.evaluate(res.model, args.eval):.4f} on "
              f"{args.eval} ({sm.evaluate(res.model, 500):.3f} on the first 500), converted in {seconds:.1f} s, "
              f"held-out output error {fit.error_before:.4f} -> {fit.error_after:.4f}", flush=True)


if __name__ == "__main__":
    main()
