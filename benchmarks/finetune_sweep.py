"""Fine-tuning settings on the OCR network (pw-dw-pw or dw-pw at FLOPs 0.5, calibrated): one line per setting.

Run from the repository root (``pip install -e '.[bench]'`` and Debian's ``fonts-dejavu-core`` first)::

    python benchmarks/finetune_sweep.py LR:T:FW:STEPS[:head] [...] [--method pw-dw-pw] [--calib-steps 0]

Each setting converts ddddocr's ``common.onnx`` recogniser afresh (``benchmarks/second_model.py``; calibration: 256
rendered images, ``calib_steps`` layer-wise reconstruction steps on top) and fine-tunes it by distillation only
(no labels) with ``separify.tuning.finetune``: learning rate ``LR`` (AdamW, cosine schedule to 0 over ``STEPS``),
temperature ``T``, feature-loss weight ``FW``, ``STEPS`` batches of 32 cycling through 9,600 other rendered images
(300 steps = 1 epoch); ``:head`` freezes the LSTM/linear head. ``--ctc ALPHA`` adds the rendered strings as labels
(CTC loss, ``separify.finetune(..., label_loss=)``), distillation weighted ``ALPHA``. Prints word accuracy on the
500 (``--eval N``) eval strings before and after (and every 300 steps of a longer run).
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
    ap.add_argument("settings", nargs="+", help="LR:T:FW:STEPS[:head]")
    ap.add_argument("--method", default="pw-dw-pw")
    ap.add_argument("--calib-steps", type=int, default=0)
    ap.add_argument("--images", type=int, default=9600)
    ap.add_argument("--ctc", type=float, default=None, metavar="ALPHA",
                    help="also train on the rendered strings (CTC loss), weighting distillation by ALPHA")
    ap.add_argument("--eval", type=int, default=500, help="eval strings (500: the table's)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    x, strings = sm.calibration_set(256 + args.images)  # the first 256 calibrate; the rest fine-tune
    model, example = sm.load_model(), sm.example_input()
    batches = [x[i : i + 32] for i in range(256, len(x), 32)]
    print(f"original: word accuracy {sm.evaluate(model, args.eval):.3f} on {args.eval} strings", flush=True)
    labelled = {}
    if args.ctc is not None:
        batches = [(b, sm.ctc_targets(strings[i : i + 32])) for b, i in zip(batches, range(256, len(x), 32))]
        labelled = dict(alpha=args.ctc, label_loss=sm.ctc_loss)
    for setting in args.settings:
        lr, temperature, fw, steps, *rest = setting.split(":")
        steps = int(steps)
        cal = separify.convert(model, example_inputs=example, method=args.method, flops=0.5, calibration=x[:256],
                               calib_steps=args.calib_steps)
        before = sm.evaluate(cal.model, args.eval)
        if rest == ["head"]:
            for name, p in cal.model.named_parameters():
                p.requires_grad_(not name.startswith("head"))

        def progress(step: int, loss: float, _model=cal.model, _steps=steps) -> None:
            if step % 300 == 0 and _steps > 300:
                print(f"  step {step}: word accuracy {sm.evaluate(_model, args.eval):.3f}", flush=True)
                _model.train()

        t0 = time.perf_counter()
        separify.finetune(cal.model, model, batches, steps=steps, lr=float(lr), temperature=float(temperature),
                          features=cal.feature_pairs(), feature_weight=float(fw), class_dim=-1, seed=0,
                          callback=progress, **labelled)
        cal.model.eval()
        print(f"{args.method} calib_steps={args.calib_steps} ctc={args.ctc} {setting}: {before:.3f} -> "
              f"{sm.evaluate(cal.model, args.eval):.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
