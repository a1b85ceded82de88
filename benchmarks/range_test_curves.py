"""The learning-rate range test on the OCR network, traced: the training loss of each step and the loss on the
held-out batches after it, and the rate each rule chooses.

Run from the repository root (``pip install -e '.[bench]'``; Debian's ``fonts-dejavu-core``)::

    python benchmarks/range_test_curves.py [--targets 0.5,0.25] [--labels] [--threads 2] [--out FILE]

The setup of ``bench_finetune_defaults.py``: pw-dw-pw calibrated on 256 rendered words with the defaults, then
``separify.finetune(converted, original, 9,600 rendered words in batches of 32, epochs=1)`` with nothing else set
(``--labels``: with the strings as CTC targets), stopped once the range test has chosen its rate. The range test is
separify's own; this script only records what it measures (``defaults.hurts`` and ``defaults.lr_from_losses`` are
wrapped to see their arguments, and the test is let run to the end of its sweep or to a non-finite loss). A target
the whole model cannot reach is that fraction of its convertible convs' FLOPs, as there.
"""

from __future__ import annotations

import argparse
import platform
import sys
import warnings
from pathlib import Path

import torch

import separify
from separify.tuning import defaults

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402
from bench_calibration import _whole_target  # noqa: E402
from bench_finetune_defaults import CALIB, _setup  # noqa: E402

warnings.filterwarnings("ignore")


class _Chosen(Exception):
    """The range test has chosen its rate: the run stops there."""


def _traced(setup: dict, student, steps_seen: dict) -> tuple[list[float], list[float], float]:
    """``(training losses, held-out losses, held-out loss at the start)`` of the range test of one run."""
    seen: dict = {}
    hurts, from_losses = defaults.hurts, defaults.lr_from_losses

    def record_hurts(held, start):  # after every step, with every held-out loss so far: stop only far past harm
        seen["held"], seen["start"] = list(held), start
        return len(held) - 1 if not held[-1] < 20 * start else None

    def record_losses(losses, steps):  # called once, when the test has ended
        seen["train"], steps_seen["steps"] = list(losses), steps
        raise _Chosen

    defaults.hurts, defaults.lr_from_losses = record_hurts, record_losses
    try:
        separify.finetune(student, setup["model"], setup["tune"], epochs=1, class_dim=setup["class_dim"], seed=0,
                          **({"label_loss": setup["label_loss"]} if "label_loss" in setup else {}))
    except _Chosen:
        pass
    finally:
        defaults.hurts, defaults.lr_from_losses = hurts, from_losses
    return seen["train"], seen.get("held", []), seen.get("start", float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="0.5,0.25")
    ap.add_argument("--labels", action="store_true", help="fine-tune on the strings too (CTC label loss)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/range_test_curves.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    setup = _setup("ocr", args.labels)
    lines = [f"Command: `python benchmarks/range_test_curves.py --targets {args.targets}"
             f"{' --labels' if args.labels else ''}`; {torch.get_num_threads()} threads, CPU "
             f"({platform.processor() or platform.machine()}), torch {torch.__version__}, separify "
             f"{separify.__version__}; {CALIB} calibration words."]
    for t in (float(t) for t in args.targets.split(",")):
        whole, label = _whole_target(setup, t)
        res = separify.convert(setup["model"], example_inputs=setup["example"], objective="flops",
                               method="pw-dw-pw", flops=whole, calibration=setup["calib"])
        steps_seen: dict = {}
        train, held, start = _traced(setup, res.model, steps_seen)
        steps = steps_seen["steps"]
        lines += ["", f"### {label}: calibrated {setup['evaluate'](res.model):.3f}, held-out loss at the start "
                  f"{start:.4f}", "", "| step | rate | training loss (before the step) | held-out loss after it | "
                  "held-out / start |", "|---|---|---|---|---|"]
        for i, loss in enumerate(train):
            h = held[i] if i < len(held) else float("nan")
            lines.append(f"| {i} | {defaults.range_lr(i, steps):.2e} | {loss:.4f} | {h:.4f} | {h / start:.3f} |")
        lines += ["", f"Chosen: held-out rule {defaults.lr_from_held_out(held, start, steps):.2g}; training-loss "
                  f"rule {defaults.lr_from_losses(train, steps):.2g} (its first divergence in these losses)."]
        print("\n".join(lines[-len(train) - 6:]), flush=True)
    write_result(args.out, lines)


if __name__ == "__main__":
    main()
