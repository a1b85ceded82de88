"""The learning rate the range test chooses on the OCR network, per order of the fine-tuning data and batch size,
with its held-out loss and agreement curves.

Run from the repository root (``pip install -e '.[bench]'``; Debian's ``fonts-dejavu-core``)::

    python benchmarks/range_test_spread.py [--targets 0.5,0.25] [--batches 16,32] [--orders -,1,2]
        [--held-samples 256] [--threads 2] [--out FILE]

The setup of ``bench_finetune_defaults.py --pseudo-labels``: pw-dw-pw calibrated on 256 rendered words with the
defaults (once per target), then ``separify.finetune(converted, original, 9,600 rendered words, epochs=1)`` with
nothing else set but the original's greedy decodings as CTC labels, stopped once the range test has run (the training
itself is skipped). ``--orders``: ``-`` is the data as given, a number the seed of a shuffle before batching
(``bench_finetune_defaults.py --order-seed``). ``--held-samples N``: how many samples the held-out first batches
hold at least (``separify.tuning.finetune.HELD_SAMPLES``).

The test is let run on to three times its starting held-out loss. Recorded after each of its steps: the held-out
loss over its value before the test, and the fraction of held-out words the student decodes (greedy CTC) as the
original does (separify's agreement). Two rates are reported from them: separify's (``defaults.lr_from_held_out``,
from the steps up to where it stops the test), and the one the loss alone gives (a tenth of the first rate after
which the loss stayed above 1.05× its start two steps in a row, the rule before 2026-12-07). A target the whole
model cannot reach is that fraction of its convertible convs' FLOPs.
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
import separify.tuning.finetune as ft
from separify.tuning import defaults

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402
from bench_calibration import _whole_target  # noqa: E402
from bench_finetune_defaults import _rebatch, _setup  # noqa: E402

warnings.filterwarnings("ignore")


def _traced(student, setup: dict, data: list) -> dict:
    """The range test of one run: its held-out losses and agreements (before, then after each step), the batches
    held out and the seconds it took. Training is skipped (``finetune._run`` replaced); the test is let run on to
    three times its starting loss."""
    seen: dict = {}
    harmed, run = defaults.harmed, ft._run

    def record(held, start, agreement, start_agreement):  # after every step: stop only far past harm
        seen.update(held=list(held), start=start, agreement=[start_agreement, *agreement])
        return len(held) - 1 if not held[-1] < 3 * start else None

    defaults.harmed, ft._run = record, lambda *a, **k: None
    t0 = time.perf_counter()
    try:
        res = ft.finetune(student, setup["model"], data, epochs=1, class_dim=setup["class_dim"], seed=0,
                          label_loss=setup["label_loss"], pseudo_labels=setup["pseudo_labels"])
    finally:
        defaults.harmed, ft._run = harmed, run
    seen.update(hold=res.held_out, secs=time.perf_counter() - t0,
                steps=defaults.range_steps(len(data) - res.held_out))  # the length of the skipped run
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="0.5,0.25")
    ap.add_argument("--batches", default="16,32")
    ap.add_argument("--orders", default="-,1,2")
    ap.add_argument("--held-samples", type=int, default=ft.HELD_SAMPLES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/range_test_spread.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ft.HELD_SAMPLES = args.held_samples
    setup = _setup("ocr", pseudo=True)
    rows, curves = [], []
    for target in [float(t) for t in args.targets.split(",")]:
        flops, label = _whole_target(setup, target)
        res = separify.convert(setup["model"], example_inputs=setup["example"], objective="flops",
                               method="pw-dw-pw", flops=flops, calibration=setup["calib"])
        for batch in [int(b) for b in args.batches.split(",")]:
            for order in args.orders.split(","):
                seen = _traced(res.model, setup, _rebatch(setup["tune"], batch, None if order == "-" else int(order)))
                agree0, *agree = seen["agreement"]
                chosen = defaults.lr_from_held_out(seen["held"], seen["start"], seen["steps"], agree, agree0)
                by_loss = defaults.lr_from_held_out(seen["held"], seen["start"], seen["steps"])
                rows.append(f"| {label} | {batch} | {order} | {seen['hold']} ({seen['hold'] * batch} words) | "
                            f"{chosen:.2g} | {by_loss:.2g} | {seen['secs']:.0f} |")
                curves.append(f"{label}, batch {batch}, order {order}: loss "
                              + " ".join(f"{h / seen['start']:.3f}" for h in seen["held"])
                              + "; words agreeing " + " ".join(f"{a:.3f}" for a in seen["agreement"]))
                print(rows[-1], flush=True)
    write_result(args.out, [f"Command: `python benchmarks/range_test_spread.py {' '.join(sys.argv[1:])}`; "
                            f"{args.threads} threads, CPU ({platform.processor() or platform.machine()}), torch "
                            f"{torch.__version__}.", "",
                            "| target | batch | data order | held out | lr chosen (agreement) | lr by the loss alone "
                            "| s |", "|---|---|---|---|---|---|---|", *rows, "",
                            "The held-out loss after each step of the range test over its value before the test "
                            "(the rate of step i: 1e-6 · 1e5^(i / (steps − 1))), and the fraction of held-out words "
                            "decoded as the original decodes them, before the test and after each step:", "",
                            *[f"- {c}" for c in curves]])


if __name__ == "__main__":
    main()
