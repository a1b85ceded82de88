"""Variants of one epoch of fine-tuning of the OCR network near its teacher: does anything stop the early drop?

Run from the repository root (``pip install -e '.[bench]'``; Debian's ``fonts-dejavu-core``)::

    python benchmarks/finetune_variants.py --target 0.25 --lr 1.9e-4 [--others 0.1] [--features 1] [--sgd 0.9]
        [--ema 0.98] [--threads 1]

The setup of ``finetune_trace.py`` (pw-dw-pw, calibrated on 256 rendered words with the defaults, cached in
``--cache`` so that several variants share one conversion; one epoch of 9,600 other rendered words without labels,
batch 32, 300 steps; temperature and hard weight chosen by separify; no kept state, so the end of the run is what is
reported). Word accuracy on the 500 eval strings every 50 steps and at the end. A variant changes one thing:

* ``--lr``: the learning rate (default: separify's range test).
* ``--others F``: the parameters outside the separable replacements train at ``F × lr`` (AdamW parameter groups).
* ``--features W``: the feature term on the converted layers (``result.feature_pairs()``, ``feature_weight=W``).
* ``--sgd M``: SGD with Nesterov momentum ``M`` instead of AdamW, the range test then sweeping up to 10.
* ``--ema D``: also report an exponential moving average of the weights (decay ``D``, warmed up as
  ``min(D, (1 + step) / (10 + step))``); it does not change the run.

``--others`` and ``--sgd`` replace the optimizer that ``separify.finetune`` builds (a patch of its internal trainer:
this is an experiment, not an option of the library).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import torch

import separify
import separify.tuning.defaults as defaults
import separify.tuning.finetune as ftm
from separify.core.modules import SeparableConv2d

sys.path.insert(0, str(Path(__file__).parent))
from bench_accuracy import ocr_setup  # noqa: E402
from bench_calibration import _whole_target  # noqa: E402

warnings.filterwarnings("ignore")


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=0.25)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--others", type=float, default=1.0)
    ap.add_argument("--features", type=float, default=0.0)
    ap.add_argument("--sgd", type=float, default=0.0)
    ap.add_argument("--ema", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/separify_finetune_variants"))
    return ap.parse_args()


def _converted(setup: dict, target: float, cache: Path):
    """The calibrated conversion and its feature pairs, from ``cache`` when an earlier run made them."""
    path = cache / f"conv_{target}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    whole, _ = _whole_target(setup, target)
    res = separify.convert(setup["model"], example_inputs=setup["example"], objective="flops", method="pw-dw-pw",
                           flops=whole, calibration=setup["calib"][:256])
    cache.mkdir(parents=True, exist_ok=True)
    torch.save((res.model, res.feature_pairs()), path)
    return res.model, res.feature_pairs()


def _patch_optimizer(args: argparse.Namespace) -> None:
    """Make separify's trainer use parameter groups (``--others``) or SGD (``--sgd``)."""
    if args.sgd:
        defaults.RANGE_HIGH, defaults.LR_BOUNDS = 10.0, (1e-5, 1.0)
    plain_init = ftm._Trainer.__init__

    def init(self, student, *a, **kw):
        plain_init(self, student, *a, **kw)
        if kw["lr"] == 1.0 and not args.sgd:  # the range test (its rates are the schedule's factors)
            return
        conv = {id(p) for m in student.modules() if isinstance(m, SeparableConv2d) for p in m.parameters()}
        params = [p for p in student.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if id(p) in conv], "lr": kw["lr"]},
                  {"params": [p for p in params if id(p) not in conv], "lr": kw["lr"] * args.others}]
        self.optimizer = (torch.optim.SGD(groups, lr=kw["lr"], momentum=args.sgd, nesterov=True) if args.sgd
                          else torch.optim.AdamW(groups, lr=kw["lr"], weight_decay=0.0))
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, kw["schedule"])

    ftm._Trainer.__init__ = init


def main() -> None:
    args = _args()
    torch.set_num_threads(args.threads)
    setup = ocr_setup(9600)
    model, evaluate = setup["model"], setup["evaluate"]
    student, pairs = _converted(setup, args.target, args.cache)
    _patch_optimizer(args)
    print(args, "start", evaluate(student), flush=True)
    ema = copy.deepcopy(student) if args.ema else None

    def trace(step: int, loss: float) -> None:
        if ema is not None:
            with torch.no_grad():
                decay = min(args.ema, (1 + step) / (10 + step))
                for pe, ps in zip(ema.parameters(), student.parameters()):
                    pe.lerp_(ps.detach(), 1 - decay)
        if step % 50 == 0:
            also = f" ema {evaluate(ema):.3f}" if ema is not None else ""
            print(f"step {step} loss {loss:.3f} eval {evaluate(student):.3f}{also}", flush=True)
            student.train()

    kw = dict(features=pairs, feature_weight=args.features) if args.features else {}
    t0 = time.perf_counter()
    out = separify.finetune(student, model, setup["tune"], epochs=1, class_dim=-1, seed=0, lr=args.lr,
                            callback=trace, keep_best=False, **kw)
    print(f"RESULT {args} lr {out.lr:.2g} eval {evaluate(student):.3f} s {time.perf_counter() - t0:.0f}", flush=True)


if __name__ == "__main__":
    main()
