"""How the calibration passes compute: the number format and memory layout of their forward passes.

The passes over the original and the converted model (observation, loss-aware weights, refit) are mostly
convolutions. Where the hardware has native bfloat16 arithmetic (x86 CPUs with AVX512-BF16 or AMX, CUDA GPUs that
support it), running them under bfloat16 autocast halves their time. Everything the fits compute from them stays in
float32 or float64, with autocast off (:func:`full_precision`): the input moments, the patch statistics, the
least-squares and ALS solves, and the layer-wise reconstruction (its Adam steps are smaller than bfloat16's rounding
of the weights). The activations the fits see, and the kept target outputs (stored as the pass gives them, in
bfloat16, and widened where they are read), then carry bfloat16's rounding (a relative ``2⁻⁹``), well below the
error a FLOPs-saving truncation leaves to fit.

``precision="auto"`` (:func:`pass_dtype`) uses bfloat16 only where it pays: a float32 model, native bfloat16, and a
calibration set whose forward pass costs at least :data:`AUTO_FLOPS`; smaller jobs are fast in float32 and keep its
exactness (a full-rank conversion refits to float32 rounding). Images (4-D inputs) run in the channels-last layout
on a CPU, where oneDNN's convolutions, depthwise ones above all, are faster in it, for models that take it
(:func:`runs_channels_last`: one that flattens an activation with ``.view`` does not).

Gradient steps through a whole model (the output reconstruction) run faster with two more changes that leave every
computed value as it was. Under CPU autocast, every call of a convolution, linear or LSTM layer casts its weights to
bfloat16; layers none of whose weights train are cast once instead, for the duration of the steps
(:func:`frozen_lowered`), which is the same rounding. In a model that cannot run channels-last as a whole, the
trained parts alone can: their input goes channels-last and their output back to the layout it had
(:func:`trained_channels_last`), so the rest of the model sees what it saw before.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

__all__ = ["AUTO_FLOPS", "LOWERED", "fast_layout", "forward_precision", "frozen_lowered", "full_precision",
           "native_bfloat16", "pass_dtype", "runs_channels_last", "trained_channels_last", "widened"]

#: ``precision="auto"``: bfloat16 where the original model's forward over the calibration set costs at least this
#: many FLOPs (as :class:`torch.utils.flop_counter.FlopCounterMode` counts them: 2 per multiply-add; about 7 s of
#: float32 on two AVX-512 cores; ResNet-50 on 256 images at 224² is 2.1e12)
AUTO_FLOPS = 1e12

#: layers that CPU autocast runs in the lower precision with every floating-point argument cast to it (weights
#: included); not the GRU, which CPU autocast leaves in float32
LOWERED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
           nn.LSTM)
_HALF = (torch.bfloat16, torch.float16)


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 convolutions natively (not by conversion to float32)."""
    if device.type == "cuda":  # compute capability 8.0 (Ampere) on; older GPUs only emulate it
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type != "cpu":
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # x86; elsewhere absent or False
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def pass_dtype(precision: str, model: nn.Module, device: torch.device, flops: float) -> torch.dtype | None:
    """The autocast dtype of the calibration passes (``None``: none, the model's own precision).

    ``precision``: ``"float32"`` (none), ``"bfloat16"`` (always, for a float32 model) or ``"auto"`` (module
    docstring); ``flops``: the estimated FLOPs of the work it decides for (one forward pass of ``model`` over the
    whole calibration set; the output reconstruction's steps, :func:`separify.calibration.output.step_dtype`)."""
    floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if precision == "float32" or floats - {torch.float32}:
        return None
    if precision == "bfloat16" or (native_bfloat16(device) and flops >= AUTO_FLOPS):
        return torch.bfloat16
    return None


def forward_precision(dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device`` for the forward passes (a no-op for ``None``). Autocast is thread-local:
    every thread running a pass enters it."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device`` (inside a hook of a pass that runs under :func:`forward_precision`)."""
    return torch.autocast(device.type, enabled=False)


def fast_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the layout convolutions run fastest in on its device: channels-last for a 4-D CPU tensor
    ``(B, C, H, W)`` (same values and shape, strides ``(H·W·C, 1, W·C, C)``), else ``x``."""
    if x.dim() == 4 and x.device.type == "cpu":
        return x.contiguous(memory_format=torch.channels_last)
    return x


def widened(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 where it is a 16-bit float (an activation of a pass under autocast), else ``x``."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def runs_channels_last(model: nn.Module, sample: torch.Tensor) -> bool:
    """Whether ``model`` runs on ``sample (B, C, H, W)`` (a few CPU images) in the channels-last layout, tried once
    without gradients: a model that reshapes an activation with ``.view`` across its channels and pixels (a
    flatten) fails there, and keeps the layout it was given. ``False`` for anything but a 4-D CPU tensor. Calls ``model``: run it
    before any hooks are attached."""
    if fast_layout(sample) is sample:
        return False
    try:
        with torch.no_grad():
            model(fast_layout(sample))
    except Exception:  # noqa: BLE001 - any failure means: keep the layout the model was given
        return False
    return True


@contextlib.contextmanager
def frozen_lowered(dtype: torch.dtype | None, models: Sequence[nn.Module], trained: set[int]):
    """Within the block, the weights of every :data:`LOWERED` layer of ``models`` none of whose own parameters is
    in ``trained`` (ids) stored in ``dtype``, where that is what CPU autocast would cast them to at every call
    (``dtype`` a 16-bit float, the weights float32 on a CPU; otherwise nothing changes): the same values, cast once.
    Restored on exit (the same tensors: the parameters keep their identity)."""
    saved: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        for mod in (m for model in models for m in model.modules()) if dtype in _HALF else ():
            own = list(mod.parameters(recurse=False))
            if not isinstance(mod, LOWERED) or any(id(p) in trained for p in own):
                continue
            for p in own:
                if p.dtype == torch.float32 and p.device.type == "cpu":
                    saved.append((p, p.data))
                    p.data = p.data.to(dtype)
        yield
    finally:
        for p, data in saved:
            p.data = data


@contextlib.contextmanager
def trained_channels_last(model: nn.Module, params: set[int]):
    """Within the block, every largest submodule of ``model`` all of whose parameters are in ``params`` (ids; a
    replacement, or one conv of an imported graph) and that holds a 2-D convolution gets its 4-D CPU input
    channels-last (:func:`fast_layout`) and returns its output contiguous again: oneDNN's depthwise and 1×1 convs
    run faster in that layout, and the rest of the model (one that cannot run channels-last) sees its own layout."""
    handles = []

    def pre(_mod, args):
        return (fast_layout(args[0]), *args[1:]) if args and isinstance(args[0], torch.Tensor) else None

    def post(_mod, _args, out):
        return out.contiguous() if isinstance(out, torch.Tensor) and out.dim() == 4 else None

    try:
        for mod in _trained_parts(model, params):
            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
        yield
    finally:
        for h in handles:
            h.remove()


def _trained_parts(model: nn.Module, params: set[int]) -> list[nn.Module]:
    """The largest submodules of ``model`` with parameters, all in ``params``, that hold a :class:`nn.Conv2d`."""
    found: list[nn.Module] = []

    def visit(mod: nn.Module) -> None:
        own = list(mod.parameters())
        if own and all(id(p) in params for p in own) and any(isinstance(m, nn.Conv2d) for m in mod.modules()):
            found.append(mod)
            return
        for child in mod.children():
            visit(child)

    visit(model)
    return found
