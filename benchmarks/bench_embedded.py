"""Accuracy of the embedded Fashion-MNIST model after conversion, both forms, several FLOPs targets.

Run from the repository root::

    python benchmarks/bench_embedded.py [--out benchmarks/results/embedded_accuracy.md]

Two initialisations: weight-space decomposition only, and calibration-aware (``calibration=`` 512 images of the
Fashion-MNIST *training* split, read from Debian's ``dataset-fashion-mnist`` if installed); then distillation
fine-tuning of the calibrated models for one epoch over 10,000 training images. Accuracy
is top-1 on the 1,000 held-out Fashion-MNIST test images shipped with the package. Accuracies are deterministic;
times are wall-clock on this machine.
"""

from __future__ import annotations

import argparse
import gzip
import time
import warnings
from pathlib import Path

import torch

import separify
from _common import write_result
from separify.embedded import load_default_model, load_eval_data, normalize
from separify.measure import accuracy

TRAIN_IMAGES = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


TRAIN_LABELS = Path("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz")


def _train_split(n: int):
    """The first ``n`` training images (never in the evaluation subset), normalised, with labels; None if absent."""
    import numpy as np

    if not (TRAIN_IMAGES.exists() and TRAIN_LABELS.exists()):
        return None
    with gzip.open(TRAIN_IMAGES) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(TRAIN_LABELS) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return normalize(images[:n]), torch.from_numpy(labels[:n].astype(np.int64))

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/embedded_accuracy.md"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = load_default_model()
    images, labels = load_eval_data()
    base = accuracy(model, images, labels)
    train = _train_split(10_000)
    calib = train[0][:512] if train is not None else None
    lines = [
        f"Embedded FashionResNet, top-1 on {len(images)} held-out images; original: {base:.3f}. Calibration: "
        + ("512 Fashion-MNIST training images." if calib is not None else "not measured (dataset not installed)."),
        f"Command: `python benchmarks/bench_embedded.py` ({torch.get_num_threads()} threads)", "",
        "| method | FLOPs target | FLOPs after / before | converted layers | top-1, weight-space init | "
        "top-1, calibrated | convert time (s), weight-space / calibrated |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in ("pw-dw-pw", "dw-pw"):
        for target in (0.75, 0.5, 0.35, 0.25):
            t0 = time.perf_counter()
            res = separify.convert(model, example_inputs=images[:1], method=method, flops=target)
            dt = time.perf_counter() - t0
            acc_cal, dt_cal = "not measured", ""
            if calib is not None:
                t0 = time.perf_counter()
                cal = separify.convert(model, example_inputs=images[:1], method=method, flops=target,
                                       calibration=calib)
                dt_cal = f" / {time.perf_counter() - t0:.2f}"
                acc_cal = f"{accuracy(cal.model, images, labels):.3f}"
            lines.append(f"| {method} | {target} | {res.flops_ratio:.3f} | {len(res.converted)}/{len(res.layers)} | "
                         f"{accuracy(res.model, images, labels):.3f} | {acc_cal} | {dt:.2f}{dt_cal} |")
            print(lines[-1], flush=True)
    if train is not None:
        lines += ["", "Calibrated, then distillation fine-tuning (`separify.finetune`, labels used, 1 epoch over the "
                  "first 10,000 training images, batch 128, lr 1e-4, seed 0):", "",
                  "| method | FLOPs target | top-1, calibrated | top-1, + fine-tune | fine-tune time (s) |",
                  "|---|---|---|---|---|"]
        x, y = train
        batches = [(x[i : i + 128], y[i : i + 128]) for i in range(0, len(x), 128)]
        for method in ("pw-dw-pw", "dw-pw"):
            for target in (0.5, 0.25):
                cal = separify.convert(model, example_inputs=images[:1], method=method, flops=target,
                                       calibration=calib)
                acc_cal = accuracy(cal.model, images, labels)
                t0 = time.perf_counter()
                separify.finetune(cal.model, model, batches, epochs=1, lr=1e-4, seed=0)
                dt = time.perf_counter() - t0
                lines.append(f"| {method} | {target} | {acc_cal:.3f} | {accuracy(cal.model, images, labels):.3f} | "
                             f"{dt:.1f} |")
                print(lines[-1], flush=True)
    write_result(args.out, lines)


if __name__ == "__main__":
    main()
