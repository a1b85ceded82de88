"""The floor under calibration time: plain inference of torchvision ResNet-50 (random weights, 224²) over 64
images, by batch size, memory format and precision, on this machine's CPU.

Run from the repository root (``pip install -e '.[bench]'``)::

    python benchmarks/forward_floor.py

A calibrated conversion runs the original model once over its calibration data and the converted model once more,
so these times bound how fast it can be. ``bf16`` is ``torch.autocast("cpu", dtype=torch.bfloat16)``: fast only on
CPUs with native bfloat16 instructions (AVX512-BF16 or AMX).
"""

import time

import torch
import torchvision

CASES = [  # (label, batch size, channels-last, bfloat16 autocast)
    ("contiguous, batch 8", 8, False, False),
    ("contiguous, batch 3 (the observation pass's batch)", 3, False, False),
    ("channels-last, batch 8", 8, True, False),
    ("channels-last, batch 16", 16, True, False),
    ("channels-last, batch 8, bf16", 8, True, True),
]


def seconds(model: torch.nn.Module, x: torch.Tensor, batch: int, channels_last: bool, bf16: bool) -> float:
    """Wall-clock seconds of inference over ``x`` in batches of ``batch``."""
    t0 = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for xb in x.split(batch):
            model(xb.contiguous(memory_format=torch.channels_last) if channels_last else xb)
    return time.perf_counter() - t0


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    x = torch.randn(64, 3, 224, 224)
    plain = torchvision.models.resnet50().eval()
    last = torchvision.models.resnet50().eval().to(memory_format=torch.channels_last)
    seconds(plain, x, 8, False, False)  # warm-up
    for label, batch, channels_last, bf16 in CASES:
        t = seconds(last if channels_last else plain, x, batch, channels_last, bf16)
        print(f"{label}: {t:.2f} s / 64 images ({4 * t:.1f} s / 256)", flush=True)


if __name__ == "__main__":
    main()
