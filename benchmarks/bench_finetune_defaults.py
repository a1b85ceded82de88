"""One epoch of fine-tuning at the defaults (learning rate from the range test, temperature from the teacher's
outputs, warm-up and cosine decay) after a calibrated conversion with the defaults, FLOPs objective.

Run from the repository root (``pip install -e '.[bench]'``; Debian's ``dataset-fashion-mnist`` and
``fonts-dejavu-core``)::

    python benchmarks/bench_finetune_defaults.py [--models ocr,embedded] [--targets 0.5,0.25] [--method pw-dw-pw]
        [--old-defaults] [--guard-metric] [--labels | --pseudo-labels] [--alpha A] [--lr LR] [--batch B]
        [--order-seed S] [--eval N] [--threads 2]

Per network and FLOPs target: ``separify.convert(..., calibration=256 samples)`` then
``separify.finetune(converted, original, data, epochs=1)`` with nothing else set (``lr`` and ``temperature`` chosen
by separify), as ``separify convert --finetune DATA`` does; ``--old-defaults`` gives the settings that were the
defaults before (``lr=1e-4, temperature=4.0, warmup=0.0, hard=0.0``: soft targets only, a cosine schedule without
warm-up), as a control. The run keeps the state that scored best (``keep_best``): by default, on the first four
fine-tuning batches, the loss on their labels where they carry labels, else the student's agreement with the
original; with ``--guard-metric`` the task's metric on a validation
set apart from both the fine-tuning data and the reported evaluation set (``evaluate=``). Data:

* OCR network (ddddocr ``common.onnx``): calibration on 256 rendered words; fine-tuning on 9,600 other rendered words
  without labels (distillation only), batch 32 (300 steps); with ``--labels`` the batches are ``(images, CTC
  targets of their strings)`` and ``label_loss`` is the CTC loss (``second_model.ctc_loss``: a sequence model's
  labels need the task's loss), every other setting still separify's (``--alpha A`` sets the weight of the
  distillation term against the labels, ``1 − A`` on the labels); with ``--pseudo-labels`` the batches carry no
  labels and each gets the original's greedy CTC decodings as labels (``pseudo_labels=separify.ctc_greedy_targets``,
  ``label_loss=separify.ctc_loss``: sequence-level distillation); word accuracy on 500 eval strings (``--eval N``:
  the first N);
  validation: 300 more rendered words of the calibration stream.
* embedded FashionResNet: calibration on 256 training images; fine-tuning on 10,000 labeled training images, batch
  128 (79 steps); top-1 on the 1,000 held-out test images; validation: the next 1,000 training images.

``--batch 32`` re-batches the embedded model's fine-tuning data to the command line's default batch size
(``--finetune-batch-size``; the OCR data is in batches of 32 already).

A target the whole OCR model cannot reach is replaced by the same fraction of its convertible convs' FLOPs (as in
``bench_calibration.py``). Times are wall-clock on this machine with nothing else running.
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
from separify.core.measure import accuracy

sys.path.insert(0, str(Path(__file__).parent))
from bench_accuracy import _fashion_train, embedded_setup, ocr_setup  # noqa: E402
from bench_calibration import _whole_target  # noqa: E402

warnings.filterwarnings("ignore")
CALIB = 256


def _setup(name: str, labels: bool = False, pseudo: bool = False, n_eval: int = 500) -> dict:
    if name == "embedded":
        setup = embedded_setup()
        setup["calib"] = _fashion_train(CALIB)[0]
        x, y = _fashion_train(11_000)
        setup["validate"] = lambda m: accuracy(m, x[10_000:], y[10_000:])
        return setup
    import second_model as sm

    setup = ocr_setup(9600)
    setup["calib"] = setup["calib"][:CALIB]
    setup["evaluate"] = lambda m: sm.evaluate(m, n_eval)
    setup["name"] = setup["name"].replace("500 rendered strings", f"{n_eval} rendered strings")
    x, words = sm.calibration_set(256 + 9600 + 300)  # the 300 strings after the fine-tuning ones
    setup["validate"] = lambda m: sm.word_accuracy(m, x[-300:], words[-300:])
    if labels:  # the same 9,600 fine-tuning images (ocr_setup's slice of the stream), with their strings
        tune_x, tune_words = x[256:256 + 9600], words[256:256 + 9600]
        setup["tune"] = [(tune_x[i:i + 32], sm.ctc_targets(tune_words[i:i + 32])) for i in range(0, 9600, 32)]
        setup["label_loss"] = sm.ctc_loss
    if pseudo:  # label-free batches, labelled by the original's decodings
        setup["label_loss"], setup["pseudo_labels"] = separify.ctc_loss, separify.ctc_greedy_targets
    return setup


def _rebatch(batches: list, size: int | None, order_seed: int | None = None) -> list:
    """The same samples (and labels) in batches of ``size`` (``None``: the size of the first batch): in the same
    order, or shuffled by a generator seeded with ``order_seed``."""
    parts = [b if isinstance(b, tuple) else (b,) for b in batches]
    size = size or len(parts[0][0])
    cols = [torch.cat([p[i] for p in parts]) for i in range(len(parts[0]))]
    if order_seed is not None:
        order = torch.randperm(len(cols[0]), generator=torch.Generator().manual_seed(order_seed))
        cols = [c[order] for c in cols]
    out = [tuple(c[k:k + size] for c in cols) for k in range(0, len(cols[0]), size)]
    return [b if len(b) > 1 else b[0] for b in out]


OLD_DEFAULTS = dict(lr=1e-4, temperature=4.0, warmup=0.0, hard=0.0)


def _row(setup: dict, method: str, target: float, label: str, settings: dict) -> str:
    model, evaluate = setup["model"], setup["evaluate"]
    t0 = time.perf_counter()
    res = separify.convert(model, example_inputs=setup["example"], objective="flops", method=method, flops=target,
                           calibration=setup["calib"])
    convert_s, before = time.perf_counter() - t0, evaluate(res.model)
    t0 = time.perf_counter()
    for key in ("label_loss", "pseudo_labels"):
        if key in setup:
            settings = dict(settings, **{key: setup[key]})
    out = separify.finetune(res.model, model, setup["tune"], epochs=1, class_dim=setup["class_dim"], seed=0,
                            **settings)
    tune_s = time.perf_counter() - t0
    res.model.eval()
    return (f"| {label} | {method} | {res.flops_ratio:.3f} | {before:.3f} ({convert_s:.0f} s) | "
            f"{out.lr:.2g} | {out.temperature:g} | {out.kept_step} of {out.steps} | "
            f"**{evaluate(res.model):.3f}** ({tune_s:.0f} s) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="ocr,embedded")
    ap.add_argument("--targets", default="0.5,0.25")
    ap.add_argument("--method", default="pw-dw-pw")
    ap.add_argument("--old-defaults", action="store_true",
                    help="lr 1e-4, temperature 4, no warm-up, soft targets only (a control)")
    ap.add_argument("--guard-metric", action="store_true",
                    help="keep the state with the best task metric on a validation set (evaluate=)")
    ap.add_argument("--labels", action="store_true", help="OCR: fine-tune on the strings too (CTC label loss)")
    ap.add_argument("--pseudo-labels", action="store_true",
                    help="OCR: the original's greedy CTC decodings as labels of the label-free batches")
    ap.add_argument("--alpha", type=float, default=None, help="weight of the distillation term (1 − label weight)")
    ap.add_argument("--lr", type=float, default=None, help="a fixed learning rate instead of the range test's")
    ap.add_argument("--batch", type=int, default=None,
                    help="re-batch the fine-tuning data to this size (default: 128 embedded, 32 OCR)")
    ap.add_argument("--order-seed", type=int, default=None,
                    help="shuffle the fine-tuning samples with this seed before batching (another draw of the data's "
                         "order, to see the spread of one epoch)")
    ap.add_argument("--eval", type=int, default=500, help="OCR: word accuracy on the first N eval strings")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/finetune_defaults_2026-12-06.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines = [f"Command: `python benchmarks/bench_finetune_defaults.py --models {args.models} --targets "
             f"{args.targets} --method {args.method}{' --old-defaults' if args.old_defaults else ''}"
             f"{' --guard-metric' if args.guard_metric else ''}{' --labels' if args.labels else ''}"
             f"{' --pseudo-labels' if args.pseudo_labels else ''}"
             f"{f' --alpha {args.alpha:g}' if args.alpha is not None else ''}"
             f"{f' --batch {args.batch}' if args.batch else ''}{f' --lr {args.lr:g}' if args.lr else ''}"
             f"{f' --order-seed {args.order_seed}' if args.order_seed is not None else ''}"
             f"{f' --eval {args.eval}' if args.eval != 500 else ''}`; "
             f"{torch.get_num_threads()} threads, CPU "
             f"({platform.processor() or platform.machine()}), torch {torch.__version__}, separify "
             f"{separify.__version__}."]
    for name in args.models.split(","):
        setup = _setup(name, args.labels, args.pseudo_labels, args.eval)
        if args.batch or args.order_seed is not None:
            setup["tune"] = _rebatch(setup["tune"], args.batch, args.order_seed)
        lines += ["", f"### {setup['name']}", "", f"Original: **{setup['evaluate'](setup['model']):.3f}**.", "",
                  "| target | form | FLOPs after / before | calibrated (convert s) | lr | temperature | "
                  "kept step of 1 epoch | + fine-tune, 1 epoch (s) |", "|---|---|---|---|---|---|---|---|"]
        for t in (float(t) for t in args.targets.split(",")):
            whole, label = _whole_target(setup, t)
            settings = dict(OLD_DEFAULTS if args.old_defaults else {})
            if args.guard_metric:
                settings["evaluate"] = setup["validate"]
            if args.alpha is not None:
                settings["alpha"] = args.alpha
            if args.lr is not None:
                settings["lr"] = args.lr
            lines.append(_row(setup, args.method, whole, label, settings))
            print(lines[-1], flush=True)
    write_result(args.out, lines)


if __name__ == "__main__":
    main()
