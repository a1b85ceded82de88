"""Convert a torchvision ResNet-18 with the library API, inspect the per-layer record, and save the result.

Run from anywhere after ``pip install -e '.[test]'`` (torchvision is in the test extras)::

    python examples/convert_library.py

Random weights are used (no downloads at run time); with a trained network, load your weights first.
"""

from __future__ import annotations

import torch
import torchvision

import separify
from separify.reporting import print_report


def main() -> None:
    model = torchvision.models.resnet18().eval()  # eval(): BatchNorms are folded into the convs before them
    x = torch.randn(1, 3, 224, 224)

    # Keep 60% of the FLOPs with the CP (pw-dw-pw) form, leave the last stage dense.
    result = separify.convert(
        model,
        example_inputs=x,
        method="pw-dw-pw",
        flops=0.6,
        exclude=("layer4.*",),
    )
    # The before/after report: FLOPs, parameters, latency (PyTorch and ONNX Runtime, per layer too), agreement.
    report = separify.report(model, result, example_inputs=x, min_run_time=0.3)
    print_report(report)
    for rec in result.skipped:
        print(f"kept {rec.name}: {rec.reason}")

    with torch.no_grad():
        ref, out = model(x), result.model(x)
    print(f"relative output error on a random input: {float((out - ref).norm() / ref.norm()):.3f}")

    # A single replacement module, built directly from a conv:
    conv = torch.nn.Conv2d(64, 128, 3, padding=1)
    sep = separify.DwPwConv2d.from_conv(conv, rank=3)
    print(sep, f"kernel error {sep.decomposition_error:.3f}")


if __name__ == "__main__":
    main()
