"""How much the layer-wise reconstruction lowers each layer's output error, per network.

Run from the repository root (``pip install -e '.[bench]'``; Debian's ``dataset-fashion-mnist`` and
``fonts-dejavu-core``)::

    python benchmarks/reconstruction_gain.py {ocr,embedded,resnet50} [--flops F]

Converts the network with pw-dw-pw at whole-model FLOPs ``F`` (default 0.5) and the calibration defaults, 256
calibration samples (OCR: rendered words; embedded: Fashion-MNIST training images; ResNet-50: random weights and
random 224² images), and prints, for every replacement the reconstruction ran on, its squared error on the check
samples (up to 64) before and after the 200 steps, and the relative decrease; then the accuracy where the network
has an evaluation set. 2 threads.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

import separify
import separify.calibration.reconstruct as reconstruct_module
import separify.calibration.refit_pass as refit_pass

sys.path.insert(0, str(Path(__file__).parent))


def _network(name: str):
    """``(model, example input, calibration samples, evaluate or None)``."""
    if name == "resnet50":
        import torchvision

        torch.manual_seed(0)
        x = torch.randn(256, 3, 224, 224)
        return torchvision.models.resnet50().eval(), x[:1], x, None
    if name == "embedded":
        from bench_accuracy import _fashion_train, embedded_setup

        setup = embedded_setup()
        return setup["model"], setup["example"], _fashion_train(256)[0], setup["evaluate"]
    import second_model as sm

    return sm.load_model(), sm.example_input(), sm.calibration_inputs(256), sm.evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("network", choices=["ocr", "embedded", "resnet50"])
    ap.add_argument("--flops", type=float, default=0.5)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    checks: list[float] = []
    check, plain = reconstruct_module._check_loss, refit_pass.reconstruct

    def recorded_check(*a):
        checks.append(check(*a))
        return checks[-1]

    def reported(module, xs, ys, **kw):
        first = len(checks)
        plain(module, xs, ys, **kw)
        before, after = checks[first], checks[first + 1]
        print(f"  input {tuple(xs[0].shape[1:])}, rank {module.rank}: {before:.4g} -> {after:.4g} "
              f"({(before - after) / before:+.1%})", flush=True)

    reconstruct_module._check_loss, refit_pass.reconstruct = recorded_check, reported
    model, example, calib, evaluate = _network(args.network)
    res = separify.convert(model, example_inputs=example, objective="flops", method="pw-dw-pw", flops=args.flops,
                           calibration=calib)
    if evaluate is not None:
        print(f"accuracy {evaluate(res.model):.3f}")


if __name__ == "__main__":
    main()
