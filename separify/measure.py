"""Measurement: FLOPs (``torch.utils.flop_counter.FlopCounterMode``), parameters, and conv input shapes.

FLOPs follow PyTorch's convention: one multiply-add counts as 2 FLOPs (FLOPs = 2 × MACs).
"""

from __future__ import annotations

import copy
from contextlib import ExitStack, contextmanager
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "count_params", "conv_input_shapes", "module_flops", "affine_flops", "accuracy",
           "output_error", "frozen_mode"]


def _as_tuple(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


@contextmanager
def frozen_mode(*models: nn.Module):
    """Eval mode for every submodule while inside (BatchNorm uses, and never updates, its running statistics;
    dropout is off), then each module's own mode back. Measurement must never change the model it measures."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    for m, _ in saved:
        m.training = False  # set the flag directly: exported graph modules refuse .eval()
    try:
        yield
    finally:
        for m, mode in saved:
            m.training = mode


def count_flops(model: nn.Module, example_inputs) -> int:
    """Total FLOPs of one forward pass of ``model`` on ``example_inputs`` (no gradients, eval mode)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), frozen_mode(model), counter:
        model(*_as_tuple(example_inputs))
    return int(counter.get_total_flops())


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def conv_input_shapes(model: nn.Module, example_inputs, names: Iterable[str]) -> dict[str, list[tuple[int, ...]]]:
    """Run ``model`` once and record the input shape of every call of the named submodules.

    A module called several times (shared weights) gets one shape per call; one never called gets an empty list.
    """
    shapes: dict[str, list[tuple[int, ...]]] = {}
    modules = dict(model.named_modules(remove_duplicate=False))
    with ExitStack() as stack, torch.no_grad(), frozen_mode(model):
        for name in names:
            shapes[name] = []

            def hook(_mod, args, _name=name):
                shapes[_name].append(tuple(args[0].shape))

            stack.callback(modules[name].register_forward_pre_hook(hook).remove)
        model(*_as_tuple(example_inputs))
    return shapes


def module_flops(module: nn.Module, input_shapes: Sequence[tuple[int, ...]]) -> int:
    """FLOPs of ``module`` summed over calls with inputs of ``input_shapes``, counted on meta tensors (no compute).

    ``module`` may live on any device; it is never run on real data here.
    """
    meta = module if _is_meta(module) else _meta_copy(module)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        for shape in input_shapes:
            meta(torch.empty(shape, device="meta", dtype=_dtype(meta)))
    return int(counter.get_total_flops())


def affine_flops(build, input_shapes: Sequence[tuple[int, ...]]) -> tuple[int, int]:
    """``(a, b)`` with FLOPs(rank) = a + b·rank for a replacement built by ``build(rank)`` on the meta device.

    Both separable forms are affine in their rank (every conv's width is the rank or a multiple of it), so two
    counts give the FLOPs of every rank without building each candidate.
    """
    f1, f2 = module_flops(build(1), input_shapes), module_flops(build(2), input_shapes)
    return 2 * f1 - f2, f2 - f1


def _is_meta(module: nn.Module) -> bool:
    p = next(iter(module.parameters()), None)
    return p is not None and p.is_meta


def _dtype(module: nn.Module) -> torch.dtype:
    p = next(iter(module.parameters()), None)
    return p.dtype if p is not None else torch.float32


def _meta_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).to("meta")


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``images`` (N, ...) with integer ``labels`` (N,)."""
    correct = 0
    with torch.no_grad(), frozen_mode(model):
        for i in range(0, len(images), batch_size):
            logits = model(images[i : i + batch_size])
            correct += int((logits.argmax(1) == labels[i : i + batch_size]).sum())
    return correct / max(len(images), 1)


def output_error(reference: nn.Module, candidate: nn.Module, example_inputs) -> float:
    """``‖f'(x) − f(x)‖ / ‖f(x)‖`` of the two models' outputs on ``example_inputs`` (first output if several)."""
    with torch.no_grad(), frozen_mode(reference, candidate):
        ref = reference(*_as_tuple(example_inputs))
        out = candidate(*_as_tuple(example_inputs))
    ref = ref[0] if isinstance(ref, (tuple, list)) else ref
    out = out[0] if isinstance(out, (tuple, list)) else out
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))
