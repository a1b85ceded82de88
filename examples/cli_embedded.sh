#!/usr/bin/env bash
# The command line on the embedded Fashion-MNIST model: weight-space conversion, then calibration from an image
# folder, then distillation fine-tuning from a labeled image folder (ImageFolder layout: one subfolder per class).
#
# Needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) for the training images, and
# separify installed with image support (pip install '.[images]'). Run from anywhere; writes into ./cli_example/.
set -euo pipefail
mkdir -p cli_example && cd cli_example

# 1,000 unlabeled calibration images and 10,000 labeled fine-tuning images, as PNG files, from the training split
# (the model is evaluated on held-out test images that ship with separify).
python - <<'PY'
import gzip, pathlib
import numpy as np
from PIL import Image
from separify.io.embedded import CLASSES
src = pathlib.Path("/usr/share/datasets/fashion-mnist")
images = np.frombuffer(gzip.open(src / "train-images-idx3-ubyte.gz").read(), np.uint8, offset=16).reshape(-1, 28, 28)
labels = np.frombuffer(gzip.open(src / "train-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
for i in range(1000):
    pathlib.Path("calib").mkdir(exist_ok=True)
    Image.fromarray(images[i]).save(f"calib/{i:05d}.png")
for i in range(1000, 11000):
    folder = pathlib.Path("tune") / f"{labels[i]}_{CLASSES[labels[i]].replace('/', '-')}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(images[i]).save(folder / f"{i:05d}.png")
PY

# Class folders are numbered in sorted name order, so the "0_..", "1_.." prefixes keep Fashion-MNIST's label order.
separify convert --method dw-pw --flops 0.25 -o plain.pt2 --force
separify convert --method dw-pw --flops 0.25 --calib calib -o calibrated.pt2 --force
separify convert --method dw-pw --flops 0.25 --calib calib --finetune tune --epochs 1 --finetune-batch-size 128 \
    --checkpoint tune.ckpt -o finetuned.pt2 --force
