"""How long ``method="auto"`` spends choosing forms on ResNet-50: each layer's and form's predicted-error curve.

Run from the repository root (``pip install -e '.[bench]'``)::

    python benchmarks/auto_plan_time.py [--images 64] [--threads 2]

torchvision ResNet-50 with random weights (the time does not depend on them), ``--images`` random 224² calibration
images; ``separify.convert(..., objective="flops", method="auto", flops=0.5, calibration=data)`` stopped after the
plan (nothing is decomposed or fitted). Printed: the seconds from the start of the conversion to the end of the plan
(the observation pass included), then per layer and form the seconds of its curve
(:func:`separify.planning.forms.form_curve`) and the ranks at which it predicted the error. To compare with another
checkout, run the same command with ``PYTHONPATH=<that checkout>``.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torchvision

import separify
import separify.pipeline as pipeline
import separify.planning.forms as forms


class _Planned(Exception):
    """Raised where the pipeline would decompose: the plan is done."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = torchvision.models.resnet50().eval()
    data = [torch.randn(min(16, args.images - i), 3, 224, 224) for i in range(0, args.images, 16)]
    rows, ranks = [], []
    predicted, curve = forms.predicted_error, forms.form_curve

    def counted(mod, *a, **kw):
        ranks.append(mod.rank)
        return predicted(mod, *a, **kw)

    def timed(conv, method, *a, **kw):
        ranks.clear()
        start = time.perf_counter()
        out = curve(conv, method, *a, **kw)
        rows.append((tuple(conv.weight.shape), method, list(ranks), time.perf_counter() - start))
        return out

    def planned(*_a, **_kw):
        raise _Planned

    forms.predicted_error, forms.form_curve, pipeline._decompose = counted, timed, planned
    start = time.perf_counter()
    try:
        separify.convert(model, example_inputs=torch.randn(1, 3, 224, 224), objective="flops", method="auto",
                         flops=0.5, calibration=data)
    except _Planned:
        pass
    print(f"ResNet-50, {args.images} images, {args.threads} threads, separify from {separify.__file__}")
    print(f"start of the conversion to the end of the plan: {time.perf_counter() - start:.1f} s")
    print(f"curves: {sum(r[3] for r in rows):.1f} s in all")
    for shape, method, at, seconds in rows:
        print(f"  {str(shape):18} {method:9} {seconds:6.2f} s  ranks {at}")


if __name__ == "__main__":
    main()
