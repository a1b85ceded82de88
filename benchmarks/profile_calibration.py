"""Where a calibrated conversion of ResNet-50 spends its time: the pipeline's steps, each timed.

Run from the repository root (``pip install -e '.[bench]'``)::

    python benchmarks/profile_calibration.py [N] [METHOD]

torchvision ResNet-50 with random weights (the time does not depend on them), ``N`` random 224² calibration images
(default 256), ``separify.convert(..., objective="flops", method=METHOD, flops=0.5, calibration=images)`` with the
calibration defaults, 2 threads. Also printed: the mean relative output error of the layers after the refit and
the memory the observation's kept outputs take. The backend's steps (observation, loss-aware weights, refit pass)
and the pipeline's (plan, decompose, output reconstruction) are wrapped with timers, and inside the refit pass the
layer-wise reconstruction and the least-squares refits of the last 1×1 convs; what the refit pass spends outside
those is mostly the converted model's forward over the calibration images. A step's time includes the steps it
calls.
"""

from __future__ import annotations

import functools
import sys
import time
import warnings

import torch
import torchvision

import separify
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


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    method = sys.argv[2] if len(sys.argv) > 2 else "pw-dw-pw"
    torch.set_num_threads(2)
    TorchBackend.observe = _count_kept(TorchBackend.observe)
    for name in ("set_calibration", "observe", "sensitivity", "refit", "apply", "result", "discover"):
        _timed(TorchBackend, name, name)
    for name in ("reconstruct", "als_fit", "solve"):
        _timed(refit_pass, name, f"refit/{name}")
    for name in ("_check", "_plan", "_decompose", "_layouts", "_fit_output"):
        _timed(pipeline, name, name)
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(n, 3, 224, 224)
    start = time.perf_counter()
    res = separify.convert(model, example_inputs=x[:1], objective="flops", method=method, flops=0.5, calibration=x)
    print(f"{method}, {n} images: {time.perf_counter() - start:.1f} s in all; FLOPs {res.flops_ratio:.3f}")
    errors = [r.calib_error_after for r in res.converted if r.calib_error_after is not None]
    print(f"  mean layer error after the refit {sum(errors) / max(len(errors), 1):.4f} over {len(errors)} layers; "
          f"kept outputs {KEPT[0] / 2**30:.2f} GiB")
    for label, seconds in sorted(TIMES.items(), key=lambda kv: -kv[1]):
        print(f"  {label}: {seconds:.1f} s")


if __name__ == "__main__":
    main()
