"""The embedded default: a small ResNet-style network trained on Fashion-MNIST, shipped with the package.

``separify convert`` with no model argument converts this network, so a new user sees the whole job (conversion,
per-layer table, before/after accuracy) without downloading anything.

* Architecture: :class:`FashionResNet` (a stem 3×3 conv and three residual stages of 3×3 convs, 64/128/256 channels
  as in ResNet-18's first three stages, input ``(B, 1, 28, 28)``), defined here so that the shipped state dict loads
  without pickled code. Narrower stages (32/64/128) run their convs in 0.1–0.2 ms on a 2-core CPU, where a separable
  block cannot be faster; at this width the conversion demonstrates a measured speed-up.
* Weights: ``assets/fashion_resnet.pt``, a plain state dict trained by ``examples/train_fashion_mnist.py`` on Debian's
  ``dataset-fashion-mnist`` (Expat licence).
* Evaluation subset: ``assets/fashion_eval.npz``, the first images of the Fashion-MNIST test split as uint8
  (``images (n, 28, 28)``, ``labels (n,)``), never seen in training.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch
from torch import nn

__all__ = ["FashionResNet", "load_default_model", "load_eval_data", "CLASSES", "MEAN", "STD"]

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Per-pixel statistics of the Fashion-MNIST training split (pixels scaled to [0, 1]).
MEAN, STD = 0.2860, 0.3530

WEIGHTS_FILE = "fashion_resnet.pt"
EVAL_FILE = "fashion_eval.npz"


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN pairs with an identity (or 1×1 projection) shortcut, as in torchvision's ResNet."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


class FashionResNet(nn.Module):
    """ResNet-style classifier for 1×28×28 images: (B, 1, 28, 28) → logits (B, 10).

    Stages run at 28², 14² and 7² with 64, 128 and 256 channels; seven 3×3 convs are eligible for conversion (the stem
    has one input channel, the two 1×1 shortcut projections are never converted).
    """

    def __init__(self, widths: tuple[int, int, int] = (64, 128, 256), num_classes: int = 10) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.stem = nn.Sequential(nn.Conv2d(1, w1, 3, padding=1, bias=False), nn.BatchNorm2d(w1), nn.ReLU())
        self.layer1 = BasicBlock(w1, w1)
        self.layer2 = BasicBlock(w1, w2, stride=2)
        self.layer3 = BasicBlock(w2, w3, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _asset(name: str):
    return resources.files("separify") / "assets" / name


def load_default_model() -> FashionResNet:
    """The shipped trained FashionResNet, in eval mode, float32, on the CPU."""
    model = FashionResNet()
    with resources.as_file(_asset(WEIGHTS_FILE)) as path:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def normalize(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 images (n, 28, 28) → normalised float32 tensor (n, 1, 28, 28)."""
    x = torch.from_numpy(np.asarray(images_uint8, dtype=np.float32) / 255.0).unsqueeze(1)
    return (x - MEAN) / STD


def load_eval_data(limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The shipped evaluation subset of the Fashion-MNIST test split: images (n, 1, 28, 28) float32, labels (n,) int64."""
    with resources.as_file(_asset(EVAL_FILE)) as path, np.load(path) as data:
        images, labels = data["images"], data["labels"]
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return normalize(images), torch.from_numpy(labels.astype(np.int64))
