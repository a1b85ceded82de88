"""A calibrated conversion at the default time budget (``calib_seconds``, 30 s) against one without a budget.

Run from the repository root (``pip install -e '.[bench]'``; for ``ocr`` also ``pip install --no-deps
ddddocr==1.6.1`` and Debian's ``fonts-dejavu-core``)::

    python benchmarks/time_budget.py [--models ocr resnet50] [--methods pw-dw-pw auto] [--seeds 0]
        [--budgets 30 0] [--eval 2000]

``ocr``: ddddocr's ``common.onnx`` recogniser (``benchmarks/second_model.py``) on 256 rendered calibration words;
``resnet50``: torchvision ResNet-50 with random weights on 256 random 224² images. Each is converted with
``separify.convert(..., objective="flops", flops=0.5, method=M, calibration=data, seed=S, calib_seconds=B)`` (``0``:
``None``, no budget), everything else at the defaults, 2 threads, one conversion after the other. Printed per
conversion: its wall-clock seconds, the layer-wise reconstruction's steps (taken of planned, summed over the
layers, from each layer's note where the budget stopped it), the output reconstruction's steps and its held-out
output error before and after, and for ``ocr`` the word accuracy on the first ``--eval`` eval strings.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision

import separify
from separify.calibration.refit_pass import layer_plan

sys.path.insert(0, str(Path(__file__).parent))


def _setup(name: str):
    """``(model, example, calibration data, evaluate or None)``."""
    if name == "ocr":
        import second_model as sm

        return sm.load_model(), sm.example_input(), sm.calibration_inputs(256), sm.evaluate
    torch.manual_seed(0)
    return torchvision.models.resnet50().eval(), torch.randn(1, 3, 224, 224), torch.randn(256, 3, 224, 224), None


def _layer_steps(res) -> tuple[int, int]:
    """Layer-wise reconstruction steps ``(taken, planned)`` over the converted layers: planned as
    :func:`layer_plan` says at the default count; taken from the budget's note where it stopped a layer."""
    taken = planned = 0
    for rec in res.converted:
        mod = res.model.get_submodule(rec.name) if hasattr(res.model, "get_submodule") else None
        if mod is None or not hasattr(mod, "conv_pw_in"):
            continue
        _, steps, _ = layer_plan(mod, 10**9, als=0, steps=res.config.calibration.steps)
        cut = re.search(r"layer-wise reconstruction: (\d+) of (\d+) steps", rec.note or "")
        taken += int(cut.group(1)) if cut else steps
        planned += steps
    return taken, planned


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["ocr", "resnet50"], choices=["ocr", "resnet50"])
    ap.add_argument("--methods", nargs="+", default=["pw-dw-pw"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[30.0, 0.0])
    ap.add_argument("--eval", type=int, default=2000)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    for name in args.models:
        model, example, calib, evaluate = _setup(name)
        if evaluate is not None:
            print(f"{name} original: {evaluate(model, args.eval):.4f} on {args.eval} strings", flush=True)
        for method in args.methods:
            for seed in args.seeds:
                for budget in args.budgets:
                    _one(name, model, example, calib, evaluate, method, seed, budget, args.eval)


def _one(name, model, example, calib, evaluate, method, seed, budget, n_eval) -> None:
    t0 = time.perf_counter()
    res = separify.convert(model, example_inputs=example, objective="flops", flops=0.5, method=method,
                           calibration=calib, seed=seed, calib_seconds=budget or None)
    seconds = time.perf_counter() - t0
    taken, planned = _layer_steps(res)
    fit = res.output_fit
    errors = (f"held-out error {fit.error_before:.4f} -> {fit.error_after:.4f}" if fit.error_before is not None
              else fit.note)
    line = (f"{name} {method} seed {seed} budget {budget or 'none'}: {seconds:.1f} s; layer-wise steps {taken} of "
            f"{planned}; output steps {fit.steps} of {fit.planned or fit.steps}, {errors}")
    if evaluate is not None:
        line += f"; word accuracy {evaluate(res.model, n_eval):.4f} on {n_eval}"
    print(line, flush=True)


if __name__ == "__main__":
    main()
