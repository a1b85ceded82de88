"""Convert → calibrate → fine-tune → evaluate → save, inside your own script. Copy this file and swap in your model
and data.

Here the model is separify's embedded Fashion-MNIST network and the data is Debian's ``dataset-fashion-mnist``
(``apt-get install dataset-fashion-mnist``); run from anywhere::

    python examples/convert_finetune_script.py [--flops 0.25] [--method dw-pw] [--feature-weight 1] [--out converted.pt2]

Your own training loop instead of ``separify.tuning.finetune``: use ``separify.distillation_loss(student_logits,
teacher_logits, labels)`` as the loss, with the original model (eval mode, no gradients) as the teacher; add
``separify.feature_loss(student_features, teacher_features)`` over the layer pairs of ``result.feature_pairs()`` for a
per-layer term.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
import torch

import separify
from separify.io.embedded import load_default_model, load_eval_data, normalize
from separify.core.measure import accuracy
from separify.io.models import save_model

DATA = Path("/usr/share/datasets/fashion-mnist")


def train_split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    with gzip.open(DATA / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    with gzip.open(DATA / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
    return normalize(images), torch.from_numpy(labels.astype(np.int64))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="pw-dw-pw", choices=["pw-dw-pw", "dw-pw"])
    ap.add_argument("--flops", type=float, default=0.25)
    ap.add_argument("--feature-weight", type=float, default=0.0, help="weight of the per-layer feature term (0: off)")
    ap.add_argument("--out", type=Path, default=Path("converted.pt2"))
    args = ap.parse_args()

    teacher = load_default_model()                      # 1. your trained model, in eval mode
    test_x, test_y = load_eval_data()                   # held-out data, for evaluation only
    train_x, train_y = train_split(10_000)              # training data, for calibration and fine-tuning

    # 2. convert, with calibration data (a few hundred inputs) so each layer fits the original outputs
    result = separify.convert(teacher, example_inputs=train_x[:1], method=args.method, flops=args.flops,
                              calibration=train_x[:1000])
    student = result.model
    print(f"FLOPs {result.flops_ratio:.3f} of the original; top-1 {accuracy(teacher, test_x, test_y):.3f} → "
          f"{accuracy(student, test_x, test_y):.3f} after calibration")

    # 3. distillation fine-tuning (learning rate and temperature chosen from the data); rerunning with the same
    # checkpoint resumes where it stopped
    batches = [(train_x[i : i + 128], train_y[i : i + 128]) for i in range(0, len(train_x), 128)]
    run = separify.finetune(student, teacher, batches, epochs=1, checkpoint="finetune.ckpt",
                            features=result.feature_pairs(), feature_weight=args.feature_weight, progress=True)
    if run.stopped:
        print("fine-tuning stopped early:", run.stopped)
    student.eval()
    print(f"after {run.steps} fine-tuning steps (lr {run.lr:.2g}, temperature {run.temperature:g}): "
          f"top-1 {accuracy(student, test_x, test_y):.3f}")

    # 4. save: a torch.export program that loads without separify
    save_model(student, args.out, (test_x[:1],))
    print(f"wrote {args.out}; load with torch.export.load({str(args.out)!r}).module()")


if __name__ == "__main__":
    main()
