"""Data for calibration and fine-tuning: tensor files and folders of images, as model inputs.

* Tensor files (:func:`load_tensor_file`, :func:`load_labeled_file`): ``.npy``, ``.npz`` or ``.pt`` holding samples
  ``(N, ...)`` already preprocessed as the model expects (floating point), optionally with integer labels ``(N,)``;
  for calibration (:func:`load_calibration_file`) also one array per sample, where samples differ in shape.
* Image folders (:func:`load_image_folder`, needs ``pip install 'separify[images]'``): a flat folder of images or
  one subfolder per class, decoded and preprocessed as :class:`ImagePreprocessing` describes (or kept at their own
  sizes, for calibration).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from separify.errors import ModelLoadError, SeparifyError, first_line
from separify.io.files import check_input_file, few_names

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImagePreprocessing", "load_calibration_file", "load_image_folder",
           "load_labeled_file", "load_tensor_file"]


def load_labeled_file(path: str | os.PathLike, *,
                      sequences: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inputs as :func:`load_tensor_file` plus integer labels when the file has them (``.npz`` array or ``.pt`` dict
    key ``labels``), else ``None``: classes ``(N,)``, or with ``sequences`` targets ``(N, S)`` (e.g. CTC targets
    padded with the blank)."""
    x = load_tensor_file(path)
    path = Path(path)
    labels = None
    try:
        if path.suffix.lower() == ".npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as archive:
                if "labels" in archive.files:
                    labels = torch.from_numpy(archive["labels"])
        elif path.suffix.lower() in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict) and isinstance(obj.get("labels"), torch.Tensor):
                labels = obj["labels"]
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read labels ({type(exc).__name__}: {first_line(exc)})") from None
    if labels is not None:
        if labels.dim() != 1 + sequences or len(labels) != len(x) or labels.is_floating_point():
            shape = f"({len(x)}, S): padded target sequences" if sequences else f"({len(x)},)"
            raise ModelLoadError(f"{path}: labels must be integers of shape {shape}, got {labels.dtype} "
                                 f"{tuple(labels.shape)}")
        labels = labels.long()
    return x, labels


_KEYS = ("images", "x", "inputs")  # array names read as the samples of a tensor file


def _read_arrays(path: Path, key: str | None) -> torch.Tensor | list[torch.Tensor]:
    """The samples of a tensor file: one array ``(N, ...)``, or (``.npz`` with several arrays and none of
    :data:`_KEYS`; ``.pt`` holding a list) a list of arrays, one sample or batch each."""
    import numpy as np

    suffix = path.suffix.lower()
    if suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False))
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            inputs = [k for k in archive.files if k != "labels"]
            if key is not None and key not in archive.files:
                raise ModelLoadError(f"{path}: no array named {key!r} (found {', '.join(archive.files) or 'none'})")
            names = [key] if key is not None else [k for k in _KEYS if k in archive.files] or inputs
            if not names:
                raise ModelLoadError(f"{path}: holds no array")
            if len(names) == 1:
                return torch.from_numpy(archive[names[0]])
            return [torch.from_numpy(archive[k]) for k in names]  # one array per sample (np.savez order)
    if suffix in (".pt", ".pth"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            if key is not None and key not in obj:
                raise ModelLoadError(f"{path}: no entry named {key!r} (found {', '.join(map(str, obj))})")
            obj = obj[key] if key is not None else next((obj[k] for k in _KEYS if k in obj), None)
        if isinstance(obj, (list, tuple)) and obj and all(isinstance(t, torch.Tensor) for t in obj):
            return list(obj)
        if not isinstance(obj, torch.Tensor):
            raise ModelLoadError(f"{path}: expected a tensor, a list of tensors or a dict with one of "
                                 f"{', '.join(_KEYS)}")
        return obj
    raise ModelLoadError(f"{path}: calibration data must be a .npy, .npz or .pt file")


def _checked(path: Path, data: torch.Tensor, *, batch: bool = True) -> torch.Tensor:
    if data.dim() < (2 if batch else 1) or len(data) == 0:
        raise ModelLoadError(f"{path}: expected samples of shape (N, ...), got {tuple(data.shape)}")
    if not data.is_floating_point():
        raise ModelLoadError(f"{path}: holds {data.dtype} values; store the inputs preprocessed as the model expects "
                             "them (floating point, normalised)")
    return data.float() if data.dtype == torch.float64 else data


def _read(path: str | os.PathLike, key: str | None) -> tuple[Path, torch.Tensor | list[torch.Tensor]]:
    path = Path(path)
    check_input_file(path)
    try:
        return path, _read_arrays(path, key)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read ({type(exc).__name__}: {first_line(exc)})") from None


def load_tensor_file(path: str | os.PathLike, *, key: str | None = None) -> torch.Tensor:
    """Input samples ``(N, ...)`` from a ``.npy``, ``.npz`` (the array ``key``; else one named ``images``, ``x`` or
    ``inputs``, or its only array) or ``.pt`` file (a tensor, or a dict with one of those keys; loaded with
    ``weights_only=True``). The samples must already be preprocessed as the model expects (floating point)."""
    path, data = _read(path, key)
    if isinstance(data, list):
        raise ModelLoadError(f"{path}: expected one array of samples (N, ...), found {len(data)} arrays; name it "
                             f"{' or '.join(_KEYS)}")
    return _checked(path, data)


def load_calibration_file(path: str | os.PathLike, *, key: str | None = None) -> torch.Tensor | list[torch.Tensor]:
    """Calibration samples from a tensor file: as :func:`load_tensor_file`, or a list of arrays where the samples
    differ in shape — an ``.npz`` with several arrays and none of those names (one sample or batch per array, in the
    order they were saved), or a ``.pt`` list of tensors."""
    path, data = _read(path, key)
    if isinstance(data, list):
        return [_checked(path, t, batch=False) for t in data]
    return _checked(path, data)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImagePreprocessing:
    """How :func:`load_image_folder` turns image files into model inputs; :meth:`for_input` fills the defaults from
    the model's example input shape ``(N, C, H, W)``.

    Attributes:
        size: ``(H, W)`` of the centre crop; ``None``: every image at its own size (no resize, no crop).
        channels: 1 (grayscale) or 3 (RGB).
        resize: the shorter image side is resized to this before the crop; ``None``: no resize.
        mean, std: per-channel normalisation of pixels scaled to [0, 1] (one value per channel).
    """

    size: tuple[int, int] | None
    channels: int
    resize: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def for_input(cls, shape: tuple[int, ...], *, size: tuple[int, int] | None = None, resize: int | None = None,
                  mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> "ImagePreprocessing":
        """Defaults: ``size`` = the ``(H, W)`` of ``shape``; ``resize`` = ``round(max(H, W) · 256/224)`` when
        ``max(H, W) >= 64`` (the usual ImageNet 256 → 224 crop ratio), else ``max(H, W)`` (``resize=0``: no resize);
        ``mean``/``std`` = the ImageNet statistics for 3 channels, 0.5/0.5 for 1 channel. Channels come from
        ``shape[1]``. Invalid values raise :class:`SeparifyError`."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 4:
            raise SeparifyError(f"image folders need a model whose example input is an image batch (N, C, H, W); "
                                f"got shape {shape} (give --input-shape)")
        channels = shape[1]
        if channels not in (1, 3):
            raise SeparifyError(f"image folders give 1-channel (grayscale) or 3-channel (RGB) inputs; the model's "
                                f"example input has {channels} channels")
        size = _check_size(size if size is not None else shape[2:])
        if resize is None:
            side = max(size)
            resize = round(side * 256 / 224) if side >= 64 else side
        elif resize == 0:
            resize = None
        _check_resize(resize)
        if mean is None:
            mean = IMAGENET_MEAN if channels == 3 else (0.5,)
        if std is None:
            std = IMAGENET_STD if channels == 3 else (0.5,)
        mean, std = _check_floats("mean", mean, channels), _check_floats("std", std, channels, positive=True)
        return cls(size=size, channels=channels, resize=resize, mean=mean, std=std)

    def describe(self) -> str:
        """One line, e.g. ``resize 256, centre crop 224×224, RGB, mean (0.485, 0.456, 0.406), std (...)``."""
        fmt = lambda v: ", ".join(f"{x:g}" for x in v)  # noqa: E731
        crop = "each at its own size" if self.size is None else f"centre crop {self.size[0]}×{self.size[1]}"
        return ", ".join(([f"resize {self.resize}"] if self.resize is not None else [])
                         + [crop, "grayscale" if self.channels == 1 else "RGB",
                            f"mean ({fmt(self.mean)})", f"std ({fmt(self.std)})"])


def _import_torchvision():
    try:
        import torchvision  # noqa: F401
        from torchvision.datasets import ImageFolder
        from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, has_file_allowed_extension
        from torchvision.transforms import v2
    except ImportError as exc:
        raise SeparifyError(f"reading image folders needs torchvision and Pillow ({first_line(exc)}): "
                            "pip install 'separify[images]'") from None
    except Exception as exc:  # e.g. a torchvision built for another torch version
        raise SeparifyError(f"torchvision failed to import ({type(exc).__name__}: {first_line(exc)}); install a "
                            "torchvision matching your torch: pip install 'separify[images]'") from None
    return ImageFolder, IMG_EXTENSIONS, default_loader, has_file_allowed_extension, v2


def _check_size(size) -> tuple[int, int]:
    try:
        checked = tuple(int(s) for s in size)
    except (TypeError, ValueError):
        checked = ()
    if len(checked) != 2 or any(s <= 0 for s in checked):
        raise SeparifyError(f"image size must be two positive integers (H, W), got {size!r}")
    return checked


def _check_resize(resize) -> None:
    if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize <= 0):
        raise SeparifyError(f"resize must be a positive integer or None, got {resize!r}")


def _check_floats(name: str, values, channels: int, positive: bool = False) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise SeparifyError(f"{name} must be numbers, got {values!r}") from None
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        want = "1 value" if channels == 1 else f"1 or {channels} values (one per channel)"
        raise SeparifyError(f"{name} needs {want} for {channels}-channel images, got {len(values)}")
    if positive and any(not v > 0 for v in values):
        raise SeparifyError(f"{name} values must be positive, got {values}")
    return values


def _check_image_args(size, channels: int, resize, limit, mean, std) -> tuple[tuple[int, int], tuple, tuple]:
    """Validate the arguments of :func:`load_image_folder`; returns the checked ``(size, mean, std)``."""
    size = _check_size(size)
    if channels not in (1, 3):
        raise SeparifyError(f"images can be loaded with 1 (grayscale) or 3 (RGB) channels, not {channels}")
    _check_resize(resize)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise SeparifyError(f"limit must be a positive integer or None, got {limit!r}")
    mean = _check_floats("mean", mean, channels)
    std = _check_floats("std", std, channels, positive=True)
    return size, mean, std


def _class_order(root: Path, image_folder, is_image: Callable[[str], bool],
                 accepted: str) -> tuple[list[tuple[str, int]], list[str]]:
    """``([(file, class index)] in round-robin order across classes, class names)`` of a folder of class
    subfolders, listed by torchvision's ``ImageFolder`` minus hidden folders; every class must hold an image."""

    class _Folder(image_folder):
        def find_classes(self, directory):  # ImageFolder's, minus hidden folders
            names = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
            return names, {name: i for i, name in enumerate(names)}

    try:
        dataset = _Folder(str(root), is_valid_file=is_image, allow_empty=True)
    except Exception as exc:
        raise SeparifyError(f"{root}: cannot list the images ({type(exc).__name__}: {first_line(exc)})") from None
    classes = list(dataset.classes)
    per_class: list[list[str]] = [[] for _ in classes]
    for file, target in dataset.samples:
        per_class[target].append(file)
    if not dataset.samples:
        raise SeparifyError(f"{root}: no image files in its subfolders (accepted extensions: {accepted})")
    empty = [name for name, files in zip(classes, per_class) if not files]
    if empty:
        raise SeparifyError(f"{root}: class folder(s) {few_names(empty)} hold no image files (accepted extensions: "
                            f"{accepted})")
    # the i-th image of every class, for i = 0, 1, ...: consecutive samples mix classes
    order = [(files[i], target) for i in range(max(map(len, per_class)))
             for target, files in enumerate(per_class) if i < len(files)]
    return order, classes


def _image_order(root: Path, image_folder, is_image: Callable[[str], bool],
                 accepted: str) -> tuple[list[tuple[str, int]], list[str] | None]:
    """``([(file, class index or -1)], class names or None)`` of ``root``: class subfolders or a flat folder of
    images (sorted by name); a folder holding both is refused."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise SeparifyError(f"{root}: cannot list the folder ({first_line(exc)})") from None
    subdirs = [e.name for e in entries if not e.name.startswith(".") and e.is_dir()]
    top_images = [e.name for e in entries if e.is_file() and is_image(e.path)]
    if subdirs:
        if top_images:
            raise SeparifyError(f"{root} holds both image files ({few_names(top_images)}) and subfolders "
                                f"({few_names(subdirs)}); use either one subfolder per class or a flat folder of "
                                "images")
        return _class_order(root, image_folder, is_image, accepted)
    if not top_images:
        raise SeparifyError(f"{root}: no image files (accepted extensions: {accepted})")
    return [(str(root / name), -1) for name in top_images], None


def _decode(files: list[str], root: Path, transform, loader, size: tuple[int, int] | None,
            resize: int | None) -> torch.Tensor | list[torch.Tensor]:
    """``(N, C, H, W)``: each file read with ``loader`` and passed through ``transform``; errors name the file
    relative to ``root``. ``size=None``: the images at their own sizes, a list of ``(C, H, W)``."""
    images = []
    for file in files:
        name = Path(file).relative_to(root).as_posix()
        try:
            img = loader(file)
        except Exception as exc:
            raise SeparifyError(f"cannot read image {name}: {type(exc).__name__}: {first_line(exc)}") from None
        if size is not None and resize is None and (img.height < size[0] or img.width < size[1]):
            raise SeparifyError(f"image {name} is {img.height}×{img.width}, smaller than the crop "
                                f"{size[0]}×{size[1]}; resize it first (CLI: --resize)")
        try:
            images.append(transform(img))  # (C, H, W) float32
        except Exception as exc:
            raise SeparifyError(f"cannot preprocess image {name}: {type(exc).__name__}: {first_line(exc)}") from None
    return images if size is None else torch.stack(images)


def load_image_folder(path: str | os.PathLike, *, size: tuple[int, int] | None, channels: int,
                      resize: int | None = None, mean: tuple[float, ...], std: tuple[float, ...],
                      limit: int | None = None
                      ) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor | None, list[str] | None]:
    """Images from a folder as model inputs: ``(images (N, C, H, W) float32, labels (N,) int64 or None, class names
    or None)``; with ``size=None`` the images keep their own sizes (no resize, no crop) and come as a list of
    ``(C, H, W)`` tensors, for calibrating models that take inputs of any size. Needs torchvision and Pillow
    (``pip install 'separify[images]'``).

    Layouts:

    * class subfolders (``torchvision.datasets.ImageFolder``: ``root/cats/1.png``, ``root/dogs/x/2.jpg``): labels are
      class indices, classes in sorted folder-name order as ImageFolder numbers them; each class folder is searched
      recursively and must hold at least one image.
    * a flat folder of images (no subfolders): labels and class names are ``None``.

    A folder holding both image files and class subfolders is refused (ImageFolder would silently ignore the top-level
    images). Names starting with ``.`` (hidden files and folders) are ignored; so are files with other extensions.
    Accepted extensions: torchvision's ``IMG_EXTENSIONS`` (.jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp).

    Order and ``limit``: a flat folder is read in sorted file-name order. With classes the order is round-robin
    across classes (the first image of every class in class order, then the second of every class, ...; images of
    a class in ImageFolder's sorted path order), so consecutive samples mix classes and ``limit`` (a prefix of that
    order) covers every class when ``limit >= number of classes``. Only the selected files are decoded.

    Preprocessing (torchvision ``transforms.v2``, on each image loaded with ``default_loader``, i.e. as RGB):
    ``Resize(resize)`` (shorter side, skipped when ``resize`` is ``None``) → ``CenterCrop(size)`` →
    ``Grayscale()`` when ``channels == 1`` → scale to [0, 1] float32 → ``Normalize(mean, std)``. ``mean``/``std``
    take one value per channel (or one value for all). Without ``resize``, an image smaller than ``size`` is an
    error rather than zero-padded.

    Raises :class:`SeparifyError` with one sentence: missing path or not a directory; no image files (naming the
    accepted extensions) or an empty class folder; mixed layout; an unreadable or corrupt image (naming the file
    relative to ``path``); invalid arguments; torchvision missing.
    """
    root = Path(path)
    if not root.exists():
        raise SeparifyError(f"{root}: no such folder")
    if not root.is_dir():
        raise SeparifyError(f"{root}: not a directory")
    native = size is None
    if native and resize is not None:
        raise SeparifyError("images kept at their own size (size=None) are not resized; give size with resize")
    size, mean, std = _check_image_args((1, 1) if native else size, channels, resize, limit, mean, std)
    ImageFolder, extensions, default_loader, has_ext, v2 = _import_torchvision()

    def is_image(p: str) -> bool:  # hidden files and files in hidden folders are skipped
        return has_ext(p, extensions) and not any(part.startswith(".") for part in Path(p).relative_to(root).parts)

    order, classes = _image_order(root, ImageFolder, is_image, ", ".join(extensions))
    if limit is not None:
        order = order[:limit]
    steps = ([v2.Resize(resize)] if resize is not None else []) + ([] if native else [v2.CenterCrop(list(size))])
    steps += [v2.Grayscale(1)] if channels == 1 else []
    transform = v2.Compose(steps + [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    x = _decode([file for file, _ in order], root, transform, default_loader, None if native else size,
                resize)  # (N, C, H, W), or N × (C, H_i, W_i)
    labels = torch.tensor([target for _, target in order], dtype=torch.int64) if classes is not None else None
    return x, labels, classes
