"""Model I/O: load what users have (``torch.export`` programs, state dicts + architecture, pickled modules) and
write converted models atomically in a form they can load back.

Inputs, told apart by content, not by extension (:func:`separify.io.files.sniff_format`):

* ``.pt2`` — a ``torch.export`` archive (``torch.export.save``). Safe to load (no code runs). Its convs are
  ``aten.conv2d`` calls, which :func:`separify.backends.torch.fx_pass.lift_aten_convs` turns back into modules.
* state dict — ``torch.save(model.state_dict())``, loaded with ``weights_only=True``; needs ``arch="module:callable"``
  (e.g. ``torchvision.models:resnet18``) to build the network.
* pickled module — ``torch.save(model)``. Unpickling runs code from the file, so it is refused unless the caller
  opts in (``allow_pickle=True``, CLI ``--allow-pickle``).

Outputs, by extension: ``.pt2`` (``torch.export``; load with ``torch.export.load(path).module()``, no separify
needed) or ``.pt``/``.pth`` (the whole module pickled; load with ``torch.load(path, weights_only=False)`` with
separify installed). Files are written with :func:`separify.io.files.atomic_write`.

Data files and image folders are read by :mod:`separify.io.data`; output-path checks live in
:mod:`separify.io.files`.
"""

from __future__ import annotations

import ast
import functools
import importlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from separify.errors import ModelLoadError, SeparifyError, first_line
from separify.io.files import atomic_write, check_input_file, few_names, sniff_format

__all__ = ["LoadedModel", "load_model", "save_model", "parse_shape"]


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


def _load_pt2(path: Path, arch: str | None) -> LoadedModel:
    """A ``torch.export`` archive, its ``aten.conv2d`` calls lifted back into conv modules."""
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


def _load_pickled(path: Path, arch: str | None, allow_pickle: bool) -> LoadedModel:
    """A pickled module (``torch.save(model)``), unpickled only with ``allow_pickle``."""
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


def _build_from_state(path: Path, obj: Any, arch: str | None) -> LoadedModel:
    """The network ``arch`` builds, with the state dict held by ``obj`` loaded strictly (shapes and keys)."""
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
        raise ModelLoadError(f"{path} does not match --arch {arch!r}: shape mismatch for {few_names(shape_errors)}{hint}")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {few_names(result.missing_keys)}")
        if result.unexpected_keys:
            parts.append(f"unexpected {few_names(result.unexpected_keys)}")
        raise ModelLoadError(f"{path} does not match --arch {arch!r}: " + "; ".join(parts))
    return LoadedModel(_eval(model), None, "state-dict")


def load_model(path: str | os.PathLike, *, arch: str | None = None, allow_pickle: bool = False) -> LoadedModel:
    """Load a model file (see the module docstring for the formats). Raises :class:`ModelLoadError` with one clear
    sentence for missing, corrupt, unknown or mismatched files. The file is only read."""
    path = Path(path)
    check_input_file(path)
    kind = sniff_format(path)
    if kind == "onnx":
        raise ModelLoadError(f"{path} is an ONNX model; this command takes PyTorch models (separify convert and "
                             "separify report take ONNX files)")
    if kind == "unknown":
        raise ModelLoadError(f"{path}: unknown format; expected a torch.export .pt2 archive or a torch.save file")
    if kind == "pt2":
        return _load_pt2(path, arch)
    # torch.save file: a state dict (safe) or a pickled module (runs code).
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise ModelLoadError(f"{path}: corrupt or truncated torch file ({first_line(exc)})") from None
        return _load_pickled(path, arch, allow_pickle)
    except Exception as exc:
        raise ModelLoadError(f"{path}: corrupt or truncated torch file ({type(exc).__name__}: {first_line(exc)})") from None
    return _build_from_state(path, obj, arch)


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
