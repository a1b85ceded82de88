"""``load_image_folder`` and ``ImagePreprocessing``: ImageFolder and flat layouts, normalisation checked by hand, a
limit that covers every class, and one clear error for every bad folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
Image = pytest.importorskip("PIL.Image")

from separify.errors import SeparifyError  # noqa: E402
from separify.io.data import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocessing, load_image_folder  # noqa: E402

GRAY = dict(size=(8, 8), channels=1, resize=None, mean=(0.5,), std=(0.25,))


def _png(path: Path, value, size=(8, 8), mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = size + ((3,) if mode == "RGB" else ())
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode).save(path)
    return path


@pytest.fixture
def classes(tmp_path) -> Path:
    root = tmp_path / "data"
    for i in range(3):
        _png(root / "cats" / f"{i}.png", 10 + i)
        _png(root / "dogs" / f"{i}.png", 100 + i)
    _png(root / "dogs" / "extra.png", 200)
    (root / "dogs" / "notes.txt").write_text("not an image")
    _png(root / ".hidden" / "x.png", 0)  # hidden folders are no class
    return root


def test_image_folder_layout(classes):
    x, y, names = load_image_folder(classes, **GRAY, limit=None)
    assert names == ["cats", "dogs"]
    assert x.shape == (7, 1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == [0, 1, 0, 1, 0, 1, 1]  # round-robin across classes
    # first dogs image: pixel 100 → (100/255 - 0.5) / 0.25
    assert x[1, 0, 3, 5].item() == pytest.approx((100 / 255 - 0.5) / 0.25, abs=1e-6)
    assert torch.all(x[1] == x[1, 0, 0, 0])
    assert x[6, 0, 0, 0].item() == pytest.approx((200 / 255 - 0.5) / 0.25, abs=1e-6)


def test_rgb_normalisation_resize_and_crop(tmp_path):
    img = np.zeros((20, 40, 3), dtype=np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 30, 120, 240
    Image.fromarray(img, "RGB").save(tmp_path / "a.png")
    x, y, names = load_image_folder(tmp_path, size=(8, 6), channels=3, resize=10, mean=IMAGENET_MEAN,
                                    std=IMAGENET_STD, limit=None)
    assert y is None and names is None
    assert x.shape == (1, 3, 8, 6)
    expected = [(v / 255 - m) / s for v, m, s in zip((30, 120, 240), IMAGENET_MEAN, IMAGENET_STD)]
    assert x[0, :, 4, 3].tolist() == pytest.approx(expected, abs=1e-5)


def test_flat_folder_has_no_labels(tmp_path):
    for i in range(4):
        _png(tmp_path / f"img{i}.png", 50 * i)
    (tmp_path / "README.txt").write_text("ignored")
    x, y, names = load_image_folder(tmp_path, **GRAY, limit=3)
    assert x.shape == (3, 1, 8, 8) and y is None and names is None
    assert x[:, 0, 0, 0].tolist() == pytest.approx([(50 * i / 255 - 0.5) / 0.25 for i in range(3)], abs=1e-6)


def test_limit_covers_every_class(tmp_path):
    for c in range(3):
        for i in range(5):
            _png(tmp_path / f"class{c}" / f"{i:02d}.png", 10 * c)
    x, y, names = load_image_folder(tmp_path, **GRAY, limit=4)
    assert len(x) == 4 and sorted(set(y.tolist())) == [0, 1, 2]
    assert y.tolist() == [0, 1, 2, 0]
    again = load_image_folder(tmp_path, **GRAY, limit=4)
    assert torch.equal(again[0], x) and torch.equal(again[1], y)  # deterministic


def test_empty_folder(tmp_path):
    with pytest.raises(SeparifyError, match=r"no image files \(accepted extensions: .*\.png"):
        load_image_folder(tmp_path, **GRAY, limit=None)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SeparifyError, match="no image files"):
        load_image_folder(tmp_path, **GRAY, limit=None)


def test_empty_class_folder(tmp_path):
    _png(tmp_path / "cats" / "0.png", 1)
    (tmp_path / "dogs").mkdir()
    with pytest.raises(SeparifyError, match="class folder.* dogs hold no image files"):
        load_image_folder(tmp_path, **GRAY, limit=None)


def test_mixed_layout_is_refused(tmp_path):
    _png(tmp_path / "cats" / "0.png", 1)
    _png(tmp_path / "loose.png", 1)
    with pytest.raises(SeparifyError, match="both image files .*loose.png.* and subfolders"):
        load_image_folder(tmp_path, **GRAY, limit=None)


def test_corrupt_image_names_the_file(classes):
    (classes / "cats" / "3.png").write_bytes(b"this is not a png")
    with pytest.raises(SeparifyError, match=r"^cannot read image cats/3\.png: "):
        load_image_folder(classes, **GRAY, limit=None)


def test_missing_path_and_file(tmp_path):
    with pytest.raises(SeparifyError, match="no such folder"):
        load_image_folder(tmp_path / "nope", **GRAY, limit=None)
    f = _png(tmp_path / "a.png", 1)
    with pytest.raises(SeparifyError, match="not a directory"):
        load_image_folder(f, **GRAY, limit=None)


def test_small_image_without_resize(tmp_path):
    _png(tmp_path / "a.png", 1, size=(4, 4))
    with pytest.raises(SeparifyError, match="a.png is 4×4, smaller than the crop 8×8"):
        load_image_folder(tmp_path, **GRAY, limit=None)
    x, _, _ = load_image_folder(tmp_path, **dict(GRAY, resize=8), limit=None)
    assert x.shape == (1, 1, 8, 8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(channels=2), "1 \\(grayscale\\) or 3"),
    (dict(size=(0, 8)), "image size must be two positive integers"),
    (dict(resize=-1), "resize must be a positive integer"),
    (dict(mean=(0.1, 0.2)), "mean needs 1 value for 1-channel images, got 2"),
    (dict(std=(0.0,)), "std values must be positive"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    _png(tmp_path / "a.png", 1)
    with pytest.raises(SeparifyError, match=match):
        load_image_folder(tmp_path, **dict(GRAY, **kwargs), limit=None)


def test_preprocessing_defaults():
    p = ImagePreprocessing.for_input((1, 3, 224, 224))
    assert (p.size, p.channels, p.resize, p.mean, p.std) == ((224, 224), 3, 256, IMAGENET_MEAN, IMAGENET_STD)
    p = ImagePreprocessing.for_input((1, 1, 28, 28))
    assert (p.size, p.channels, p.resize, p.mean, p.std) == ((28, 28), 1, 28, (0.5,), (0.5,))
    p = ImagePreprocessing.for_input((1, 3, 32, 32), size=(16, 24), resize=0, mean=(0.1,), std=(0.2,))
    assert (p.size, p.resize, p.mean, p.std) == ((16, 24), None, (0.1,) * 3, (0.2,) * 3)
    with pytest.raises(SeparifyError, match="image batch"):
        ImagePreprocessing.for_input((1, 10))
    with pytest.raises(SeparifyError, match="has 4 channels"):
        ImagePreprocessing.for_input((1, 4, 32, 32))


def test_missing_torchvision_says_how_to_install(tmp_path, monkeypatch):
    import sys

    _png(tmp_path / "a.png", 1)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision → ImportError
    with pytest.raises(SeparifyError, match=r"pip install 'separify\[images\]'"):
        load_image_folder(tmp_path, **GRAY, limit=None)
