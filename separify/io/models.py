"""Model I/O: load what users have (``torch.export`` programs, state dicts + architecture, pickled modules) and
write converted models atomically in a form they can load back.

Inputs, told apart by content, not by extension:

* ``.pt2`` — a ``torch.export`` archive (``torch.export.save``). Safe to load (no code runs). Its convs are
  ``aten.conv2d`` calls, which :func:`separify.fx_pass.lift_aten_convs` turns back into modules.
* state dict — ``torch.save(model.state_dict())``, loaded with ``weights_only=True``; needs ``arch="module:callable"``
  (e.g. ``torchvision.models:resnet18``) to build the network.
* pickled module — ``torch.save(model)``. Unpickling runs code from the file, so it is refused unless the caller
  opts in (``allow_pickle=True``, CLI ``--allow-pickle``).

Outputs, by extension: ``.pt2`` (``torch.export``; load with ``torch.export.load(path).module()``, no separify
needed) or ``.pt``/``.pth`` (the whole module pickled; load with ``torch.load(path, weights_only=False)`` with
separify installed). Files are written to a temporary file in the target folder and renamed into place.

Data for calibration and fine-tuning: tensor files (:func:`load_tensor_file`, :func:`load_labeled_file`) or folders
of images (:func:`load_image_folder`, needs ``pip install 'separify[images]'``).
"""

from __future__ import annotations

import ast
import functools
import importlib
import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from separify.errors import ModelLoadError, SeparifyError, first_line

__all__ = ["LoadedModel", "load_model", "save_model", "check_output_path", "atomic_write", "parse_shape",
           "load_tensor_file", "load_labeled_file", "load_image_folder", "ImagePreprocessing", "IMAGENET_MEAN",
           "IMAGENET_STD", "OUTPUT_SUFFIXES"]

OUTPUT_SUFFIXES = (".pt2", ".pt", ".pth", ".onnx")


@dataclass
class LoadedModel:
    """A model ready for :func:`separify.convert`.

    Attributes:
        model: the module, in eval mode where that is possible.
        example_inputs: inputs stored with the model (``.pt2``), else ``None``.
        kind: ``"pt2"``, ``"state-dict"``, ``"pickle"`` or ``"embedded"``.
    """

    model: nn.Module
    example_inputs: tuple | None
    kind: str


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` → ``(1, 3, 224, 224)``; :class:`SeparifyError` on anything else."""
    try:
        shape = tuple(int(p) for p in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise SeparifyError(f"--input-shape must be positive integers separated by commas (e.g. 1,3,224,224), got {text!r}")
    return shape


def _sniff(path: Path) -> str:
    """``"pt2"``, ``"torch-zip"``, ``"torch-legacy"``, ``"onnx"`` or ``"unknown"``."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise ModelLoadError(f"{path}: corrupt or truncated archive ({exc})") from None
        if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
            return "pt2"
        if any(n.endswith("data.pkl") for n in names):
            return "torch-zip"
        return "unknown"
    if head[:1] == b"\x80":
        return "torch-legacy"
    if path.suffix.lower() == ".onnx" or head[:1] == b"\x08":  # ModelProto starts with field 1 (ir_version)
        return "onnx"
    return "unknown"


def is_onnx(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like an ONNX model (by its first byte or its extension); it is checked when loaded."""
    path = Path(path)
    _check_input_file(path)
    return _sniff(path) == "onnx"


def _check_input_file(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, expected a model file")
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"{path}: not readable")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: empty file")


def _arch_kwargs(arch: str) -> tuple[str, dict[str, Any]]:
    """``"pkg.mod:fn(num_classes=10, width=0.5)"`` → ``("pkg.mod:fn", {"num_classes": 10, "width": 0.5})``.

    Only keyword arguments with literal values (numbers, strings, booleans, None, tuples/lists/dicts of them) are
    accepted: they are read with :func:`ast.literal_eval`, never executed."""
    name, paren, rest = arch.partition("(")
    if not paren:
        return arch, {}
    try:
        call = ast.parse(f"f({rest}", mode="eval").body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "f"):
            raise ValueError("not a call")
        if call.args:
            raise ValueError("positional arguments are not accepted")
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        if None in kwargs:
            raise ValueError("**kwargs are not accepted")
    except (SyntaxError, ValueError) as exc:
        raise ModelLoadError(f"--arch {arch!r}: its arguments must be keyword=literal pairs, e.g. "
                             f"'torchvision.models:resnet18(num_classes=10)' ({exc})") from None
    return name.strip(), kwargs


def _import_arch(arch: str) -> Callable[[], nn.Module]:
    """The callable named by ``arch`` (``package.module:callable``, optionally with literal keyword arguments:
    ``package.module:callable(num_classes=10)``), bound to those arguments."""
    arch, kwargs = _arch_kwargs(arch)
    module_name, sep, attr = arch.partition(":")
    if not sep or not module_name or not attr:
        raise ModelLoadError(f"--arch must look like 'package.module:callable' (e.g. torchvision.models:resnet18), got {arch!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ModelLoadError(f"--arch {arch!r}: cannot import {module_name!r} ({type(exc).__name__}: {exc})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(f"--arch {arch!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelLoadError(f"--arch {arch!r} is not callable")
    return functools.partial(obj, **kwargs) if kwargs else obj


def _unwrap_state_dict(obj) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return obj
    return None


def _eval(model: nn.Module) -> nn.Module:
    try:
        return model.eval()
    except (NotImplementedError, RuntimeError):  # exported GraphModules refuse .eval(); they are inference graphs
        return model


def load_model(path: str | os.PathLike, *, arch: str | None = None, allow_pickle: bool = False) -> LoadedModel:
    """Load a model file (see the module docstring for the formats). Raises :class:`ModelLoadError` with one clear
    sentence for missing, corrupt, unknown or mismatched files. The file is only read."""
    path = Path(path)
    _check_input_file(path)
    kind = _sniff(path)
    if kind == "onnx":
        raise ModelLoadError(f"{path} is an ONNX model; this command takes PyTorch models (separify convert and "
                             "separify report take ONNX files)")
    if kind == "unknown":
        raise ModelLoadError(f"{path}: unknown format; expected a torch.export .pt2 archive or a torch.save file")
    if kind == "pt2":
        if arch:
            raise ModelLoadError(f"{path} is a torch.export program; it carries its own architecture, drop --arch")
        try:
            ep = torch.export.load(str(path))
        except Exception as exc:
            raise ModelLoadError(f"{path}: cannot load the torch.export program ({type(exc).__name__}: {exc})") from None
        from separify.backends.torch.fx_pass import lift_aten_convs

        gm = ep.module()
        lift_aten_convs(gm)
        example = getattr(ep, "example_inputs", None)
        inputs = tuple(example[0]) if example else None
        return LoadedModel(gm, inputs, "pt2")

    # torch.save file: a state dict (safe) or a pickled module (runs code).
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise ModelLoadError(f"{path}: corrupt or truncated torch file ({first_line(exc)})") from None
        if not allow_pickle:
            raise ModelLoadError(
                f"{path} is a pickled Python object (e.g. torch.save(model)); loading it runs code stored in the file. "
                "If you trust its source, pass --allow-pickle (library: allow_pickle=True); otherwise save a "
                "state dict and pass --arch, or export a .pt2 with torch.export"
            ) from None
        if arch:
            raise ModelLoadError(f"{path} is a pickled module, not a state dict; drop --arch") from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise ModelLoadError(f"{path}: cannot unpickle ({type(exc2).__name__}: {first_line(exc2)})") from None
        if not isinstance(obj, nn.Module):
            raise ModelLoadError(f"{path}: the pickle holds a {type(obj).__name__}, not an nn.Module")
        return LoadedModel(_eval(obj), None, "pickle")
    except Exception as exc:
        raise ModelLoadError(f"{path}: corrupt or truncated torch file ({type(exc).__name__}: {first_line(exc)})") from None

    state = _unwrap_state_dict(obj)
    if state is None:
        raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    if not arch:
        raise ModelLoadError(f"{path} is a state dict; pass --arch package.module:callable to build the network "
                             "(e.g. --arch torchvision.models:resnet18)")
    factory = _import_arch(arch)
    try:
        model = factory()
    except Exception as exc:
        raise ModelLoadError(f"--arch {arch!r}: calling it failed ({type(exc).__name__}: {exc})") from None
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"--arch {arch!r} returned a {type(model).__name__}, not an nn.Module")
    own = model.state_dict()
    shape_errors = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                    if k in own and own[k].shape != v.shape]
    if shape_errors:
        hint = "" if "(" in arch else (f"; if the architecture takes arguments (e.g. another number of classes), "
                                       f"pass them: --arch '{arch}(num_classes=...)'")
        raise ModelLoadError(f"{path} does not match --arch {arch!r}: shape mismatch for {_few(shape_errors)}{hint}")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {_few(result.missing_keys)}")
        if result.unexpected_keys:
            parts.append(f"unexpected {_few(result.unexpected_keys)}")
        raise ModelLoadError(f"{path} does not match --arch {arch!r}: " + "; ".join(parts))
    return LoadedModel(_eval(model), None, "state-dict")


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def check_output_path(out: str | os.PathLike, *, inputs: tuple[str | os.PathLike | None, ...] = (),
                      force: bool = False, suffixes: tuple[str, ...] = OUTPUT_SUFFIXES) -> Path:
    """Refuse an output that would overwrite an input, that exists (unless ``force``), whose extension is not one of
    ``suffixes`` (default: the model formats), or whose folder is missing or not writable. Call before any work so
    that no time is wasted."""
    out = Path(out)
    if out.suffix.lower() not in suffixes:
        if suffixes == OUTPUT_SUFFIXES:
            raise SeparifyError(f"output {out}: use a .pt2 (torch.export), .pt/.pth (pickled module) or .onnx file name")
        raise SeparifyError(f"output {out}: the file name must end in {' or '.join(suffixes)}")
    for src in inputs:
        if src is None:
            continue
        src = Path(src)
        same = out.resolve() == src.resolve() or (src.exists() and out.exists() and os.path.samefile(src, out))
        if same:
            raise SeparifyError(f"output {out} is the input file; choose another name (the input is never overwritten)")
    if out.is_dir():
        raise SeparifyError(f"output {out} is a directory")
    if out.exists() and not force:
        raise SeparifyError(f"output {out} exists; pass --force to replace it")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise SeparifyError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SeparifyError(f"output folder {folder} is not writable")
    return out


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (0600); give it a normal new file's mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _export(model: nn.Module, inputs: tuple) -> "torch.export.ExportedProgram":
    """``torch.export`` with a dynamic batch dimension when the model allows it, else at the exact example shapes.

    A batch of 1 would be specialised by the exporter, so the examples are repeated to a batch of 2 first.
    """
    tensors = all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in inputs)
    if tensors:
        batched = tuple(t.expand(2, *t.shape[1:]).clone() if t.shape[0] == 1 else t for t in inputs)
        batch = torch.export.Dim("batch")
        try:
            return torch.export.export(model, batched, dynamic_shapes=tuple({0: batch} for _ in batched))
        except Exception:  # noqa: BLE001 - e.g. a model that fixes its batch size; fall back to static shapes
            pass
    return torch.export.export(model, inputs)


def save_model(model: nn.Module, path: str | os.PathLike, example_inputs: tuple) -> None:
    """Write ``model`` to ``path``: ``.pt2`` via ``torch.export`` (batch dimension dynamic where possible), ``.pt``/``.pth``
    as a pickled module. Atomic: on any failure the target is untouched."""
    path = Path(path)
    if path.suffix.lower() == ".pt2":
        try:
            ep = _export(model, tuple(example_inputs))
        except Exception as exc:
            raise SeparifyError(f"torch.export could not export the converted model ({type(exc).__name__}: "
                                f"{first_line(exc)}); save as .pt instead") from None
        atomic_write(path, lambda tmp: torch.export.save(ep, tmp))
    else:
        try:
            atomic_write(path, lambda tmp: torch.save(model, tmp))
        except (pickle.PicklingError, AttributeError, TypeError) as exc:
            raise SeparifyError(f"cannot pickle the converted model ({first_line(exc)}); write a .pt2 instead") from None


def load_labeled_file(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inputs as :func:`load_tensor_file` plus integer labels ``(N,)`` when the file has them (``.npz`` array or
    ``.pt`` dict key ``labels``), else ``None``."""
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
        if labels.dim() != 1 or len(labels) != len(x) or labels.is_floating_point():
            raise ModelLoadError(f"{path}: labels must be integers of shape ({len(x)},), got {labels.dtype} "
                                 f"{tuple(labels.shape)}")
        labels = labels.long()
    return x, labels


def load_tensor_file(path: str | os.PathLike) -> torch.Tensor:
    """Input samples ``(N, ...)`` from a ``.npy``, ``.npz`` (key ``images``, ``x`` or ``inputs``, or its only array)
    or ``.pt`` file (a tensor, or a dict with one of those keys; loaded with ``weights_only=True``). The samples must
    already be preprocessed as the model expects (floating point)."""
    path = Path(path)
    _check_input_file(path)
    keys = ("images", "x", "inputs")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            import numpy as np

            data = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == ".npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as archive:
                inputs = [k for k in archive.files if k != "labels"]
                names = [k for k in keys if k in archive.files] or (inputs if len(inputs) == 1 else [])
                if not names:
                    raise ModelLoadError(f"{path}: expected an array named one of {', '.join(keys)} "
                                         f"(found {', '.join(archive.files) or 'none'})")
                data = torch.from_numpy(archive[names[0]])
        elif suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                obj = next((obj[k] for k in keys if k in obj), None)
            if not isinstance(obj, torch.Tensor):
                raise ModelLoadError(f"{path}: expected a tensor or a dict with one of {', '.join(keys)}")
            data = obj
        else:
            raise ModelLoadError(f"{path}: calibration data must be a .npy, .npz or .pt file")
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read ({type(exc).__name__}: {first_line(exc)})") from None
    if data.dim() < 2 or len(data) == 0:
        raise ModelLoadError(f"{path}: expected samples of shape (N, ...), got {tuple(data.shape)}")
    if not data.is_floating_point():
        raise ModelLoadError(f"{path}: holds {data.dtype} values; store the inputs preprocessed as the model expects "
                             "them (floating point, normalised)")
    return data.float() if data.dtype == torch.float64 else data


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImagePreprocessing:
    """How :func:`load_image_folder` turns image files into model inputs; :meth:`for_input` fills the defaults from
    the model's example input shape ``(N, C, H, W)``.

    Attributes:
        size: ``(H, W)`` of the centre crop.
        channels: 1 (grayscale) or 3 (RGB).
        resize: the shorter image side is resized to this before the crop; ``None``: no resize.
        mean, std: per-channel normalisation of pixels scaled to [0, 1] (one value per channel).
    """

    size: tuple[int, int]
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
        return ", ".join(([f"resize {self.resize}"] if self.resize is not None else [])
                         + [f"centre crop {self.size[0]}×{self.size[1]}", "grayscale" if self.channels == 1 else "RGB",
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


def load_image_folder(path: str | os.PathLike, *, size: tuple[int, int], channels: int, resize: int | None = None,
                      mean: tuple[float, ...], std: tuple[float, ...], limit: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None]:
    """Images from a folder as model inputs: ``(images (N, C, H, W) float32, labels (N,) int64 or None, class names
    or None)``. Needs torchvision and Pillow (``pip install 'separify[images]'``).

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
    size = _check_size(size)
    if channels not in (1, 3):
        raise SeparifyError(f"images can be loaded with 1 (grayscale) or 3 (RGB) channels, not {channels}")
    _check_resize(resize)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise SeparifyError(f"limit must be a positive integer or None, got {limit!r}")
    mean = _check_floats("mean", mean, channels)
    std = _check_floats("std", std, channels, positive=True)
    ImageFolder, extensions, default_loader, has_ext, v2 = _import_torchvision()

    def is_image(p: str) -> bool:  # hidden files and files in hidden folders are skipped
        return has_ext(p, extensions) and not any(part.startswith(".") for part in Path(p).relative_to(root).parts)

    accepted = ", ".join(extensions)
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise SeparifyError(f"{root}: cannot list the folder ({first_line(exc)})") from None
    subdirs = [e.name for e in entries if not e.name.startswith(".") and e.is_dir()]
    top_images = [e.name for e in entries if e.is_file() and is_image(e.path)]

    labels: torch.Tensor | None = None
    classes: list[str] | None = None
    if subdirs:
        if top_images:
            raise SeparifyError(f"{root} holds both image files ({_few(top_images)}) and subfolders "
                                f"({_few(subdirs)}); use either one subfolder per class or a flat folder of images")

        class _Folder(ImageFolder):
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
            raise SeparifyError(f"{root}: class folder(s) {_few(empty)} hold no image files (accepted extensions: "
                                f"{accepted})")
        order = [(files[i], target) for i in range(max(map(len, per_class)))
                 for target, files in enumerate(per_class) if i < len(files)]
    else:
        if not top_images:
            raise SeparifyError(f"{root}: no image files (accepted extensions: {accepted})")
        order = [(str(root / name), -1) for name in top_images]
    if limit is not None:
        order = order[:limit]

    steps = ([v2.Resize(resize)] if resize is not None else []) + [v2.CenterCrop(list(size))]
    steps += [v2.Grayscale(1)] if channels == 1 else []
    transform = v2.Compose(steps + [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    images = []
    for file, _ in order:
        name = Path(file).relative_to(root).as_posix()
        try:
            img = default_loader(file)
        except Exception as exc:
            raise SeparifyError(f"cannot read image {name}: {type(exc).__name__}: {first_line(exc)}") from None
        if resize is None and (img.height < size[0] or img.width < size[1]):
            raise SeparifyError(f"image {name} is {img.height}×{img.width}, smaller than the crop "
                                f"{size[0]}×{size[1]}; resize it first (CLI: --resize)")
        try:
            images.append(transform(img))
        except Exception as exc:
            raise SeparifyError(f"cannot preprocess image {name}: {type(exc).__name__}: {first_line(exc)}") from None
    x = torch.stack(images)
    if classes is not None:
        labels = torch.tensor([target for _, target in order], dtype=torch.int64)
    return x, labels, classes
