"""Where a calibrated conversion spends its time: the pipeline's steps, each timed.

Run from the repository root (``pip install -e '.[bench]'``; for ``--ocr`` also ``pip install --no-deps
ddddocr==1.6.1`` and Debian's ``fonts-dejavu-core``)::

    python benchmarks/profile_calibration.py [N] [METHOD] [--ocr] [--flops F] [--seconds S]

torchvision ResNet-50 with random weights (the time does not depend on them) on ``N`` random 224² calibration
images (default 256), or with ``--ocr`` the OCR network (ddddocr ``common.onnx`` through onnx2torch) on ``N``
rendered words (its word accuracy on the held-out words is printed too);
``separify.convert(..., objective="flops", method=METHOD, flops=F, calibration=data)`` with the calibration
defaults (``METHOD`` default pw-dw-pw, ``F`` default 0.5; ``--seconds S``: ``calib_seconds=S``, 0 for none), 2
threads. Also printed: the mean relative output error of the layers after the refit, the memory the observation's
kept outputs take and how many reconstruction steps the time budget left. The backend's steps
(observation, loss-aware weights, refit pass) and the pipeline's (plan, decompose, output reconstruction) are
wrapped with timers, and inside the refit pass the layer-wise reconstruction and the least-squares refits of the
last 1×1 convs, inside the output reconstruction its steps; what the refit pass spends outside those is mostly the
converted model's forward over the calibration samples. A step's time includes the steps it calls.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision

import separify
import separify.calibration.output as output
import separify.calibration.refit_pass as refit_pass
import separify.pipeline as pipeline
from separify.backends.torch.backend import TorchBackend

warnings.filterwarnings("ignore")
TIMES: dict[str, float] = {}
KEPT = [0]  # bytes of the observation's kept outputs


def _count_kept(observe):
    @functools.wraps(observe)
    def counted(self, *args, **kwargs):
        out = observe(self, *args, **kwargs)
        KEPT[0] = sum(y.numel() * y.element_size() for ys in self.obs.outputs.values() for y in ys)
        return out

    return counted


def _timed(owner, name: str, label: str) -> None:
    """Replace ``owner.name`` by a wrapper that adds its wall-clock seconds to ``TIMES[label]``."""
    plain = getattr(owner, name)

    @functools.wraps(plain)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return plain(*args, **kwargs)
        finally:
            TIMES[label] = TIMES.get(label, 0.0) + time.perf_counter() - start

    setattr(owner, name, timed)


def _data(ocr: bool, n: int):
    """``(model, calibration samples, evaluate or None)``."""
    if ocr:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_accuracy import ocr_setup  # noqa: E402 - needs ddddocr, only here

        setup = ocr_setup(0)
        return setup["model"], setup["calib"][:n], setup["evaluate"]
    torch.manual_seed(0)
    return torchvision.models.resnet50().eval(), torch.randn(n, 3, 224, 224), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", nargs="?", type=int, default=256)
    parser.add_argument("method", nargs="?", default="pw-dw-pw")
    parser.add_argument("--ocr", action="store_true")
    parser.add_argument("--flops", type=float, default=0.5)
    parser.add_argument("--seconds", type=float, default=None,
                        help="calib_seconds (default: the library's; 0: no time budget)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    TorchBackend.observe = _count_kept(TorchBackend.observe)
    for name in ("set_calibration", "observe", "sensitivity", "refit", "apply", "result", "discover"):
        _timed(TorchBackend, name, name)
    for name in ("reconstruct", "als_fit", "solve"):
        _timed(refit_pass, name, f"refit/{name}")
    for name in ("_check", "_plan", "_decompose", "_layouts", "_fit_output"):
        _timed(pipeline, name, name)
    _timed(output, "_steps", "_fit_output/steps")
    model, x, evaluate = _data(args.ocr, args.n)
    start = time.perf_counter()
    budget = {} if args.seconds is None else {"calib_seconds": args.seconds or None}
    res = separify.convert(model, example_inputs=x[:1], objective="flops", method=args.method, flops=args.flops,
                           calibration=x, **budget)
    what = "words" if args.ocr else "images"
    print(f"{args.method}, {args.n} {what}: {time.perf_counter() - start:.1f} s in all; FLOPs {res.flops_ratio:.3f}")
    errors = [r.calib_error_after for r in res.converted if r.calib_error_after is not None]
    print(f"  mean layer error after the refit {sum(errors) / max(len(errors), 1):.4f} over {len(errors)} layers; "
          f"kept outputs {KEPT[0] / 2**30:.2f} GiB")
    fit = res.output_fit
    cut = [r.name for r in res.converted if any("time budget" in n.text for n in r.notes)]
    budget = getattr(res.config.calibration, "seconds", None)  # (a checkout from before the budget: none)
    print(f"  time budget {budget}: layer-wise reconstruction stopped early in {len(cut)} layers; output "
          f"reconstruction {fit.steps} of {getattr(fit, 'planned', 0) or fit.steps} steps, held-out error "
          f"{fit.error_before} -> {fit.error_after}")
    for label, seconds in sorted(TIMES.items(), key=lambda kv: -kv[1]):
        print(f"  {label}: {seconds:.1f} s")
    if evaluate is not None:
        print(f"  word accuracy {evaluate(res.model):.3f}")


if __name__ == "__main__":
    main()
