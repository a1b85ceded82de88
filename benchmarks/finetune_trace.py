"""One epoch of fine-tuning of the OCR network, traced: word accuracy every 50 steps, and what the kept state was.

Run from the repository root (``pip install -e '.[bench]'``; Debian's ``fonts-dejavu-core``)::

    python benchmarks/finetune_trace.py --target 0.25 [--hard 0.5] [--train all|converted] [--guard agreement|metric]
        [--threads 2]

The setup of ``bench_finetune_defaults.py`` (pw-dw-pw, calibrated on 256 rendered words with the defaults; one epoch
of 9,600 other rendered words without labels, batch 32, 300 steps; the learning rate and temperature chosen by
separify). ``--target`` is a fraction of the convertible conv FLOPs where the whole model cannot reach it, as there.
Every 50 steps it prints the loss, and on the first four fine-tuning batches the KL to the original and the fraction
of time steps whose largest class is the original's, then the word accuracy on the 500 eval strings and on 300
validation strings (rendered apart from both). ``--guard metric`` scores the kept state by the validation word
accuracy (``evaluate=``), ``agreement`` by separify's default. The tracing does not change the run (it evaluates in
eval mode, without gradients).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import separify

sys.path.insert(0, str(Path(__file__).parent))
import second_model as sm  # noqa: E402
from bench_accuracy import ocr_setup  # noqa: E402
from bench_calibration import _whole_target  # noqa: E402

warnings.filterwarnings("ignore")


def _agreement(model, student, batches) -> tuple[float, float]:
    """Mean KL(original ‖ student) per sample and fraction of agreeing time steps on ``batches``."""
    kl = agree = 0.0
    with torch.no_grad():
        for x in batches:
            t, s = model(x), student.eval()(x)
            kl += float(F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True))
            agree += float((t.argmax(-1) == s.argmax(-1)).float().mean())
    return kl / len(batches), agree / len(batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=0.25)
    ap.add_argument("--hard", type=float, default=None, help="default: separify's")
    ap.add_argument("--train", default="all", choices=("all", "converted"))
    ap.add_argument("--guard", default="agreement", choices=("agreement", "metric"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    setup = ocr_setup(9600)
    model, evaluate = setup["model"], setup["evaluate"]
    whole, label = _whole_target(setup, args.target)
    res = separify.convert(model, example_inputs=setup["example"], objective="flops", method="pw-dw-pw", flops=whole,
                           calibration=setup["calib"][:256])
    student, first = res.model, setup["tune"][:4]
    x, words = sm.calibration_set(256 + 9600 + 300)  # the 300 strings after the fine-tuning ones
    validate = lambda m: sm.word_accuracy(m, x[-300:], words[-300:])  # noqa: E731
    print(f"{label}; step 0: KL, agreement {_agreement(model, student, first)}; eval {evaluate(student):.3f}; "
          f"validation {validate(student):.3f}", flush=True)

    def trace(step: int, loss: float) -> None:
        if step % 50 == 0:
            print(f"step {step}: loss {loss:.3f}; KL, agreement {_agreement(model, student, first)}; eval "
                  f"{evaluate(student):.3f}; validation {validate(student):.3f}", flush=True)
            student.train()

    kw = {"hard": args.hard} if args.hard is not None else {}
    if args.guard == "metric":
        kw["evaluate"] = validate
    t0 = time.perf_counter()
    out = separify.finetune(student, model, setup["tune"], epochs=1, class_dim=-1, seed=0, train=args.train,
                            callback=trace, **kw)
    print(f"lr {out.lr:.2g}, temperature {out.temperature:g}, kept step {out.kept_step} of {out.steps} "
          f"(scores {[(s, round(v, 4)) for s, v in out.scores]}); eval {evaluate(student):.3f} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
