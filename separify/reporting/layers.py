"""Per-layer rows of a report: every conv of the original paired by name with what the converted model holds there.

For every ``nn.Conv2d`` of a PyTorch original, the converted model holds at the same name either a separable module
(:class:`~separify.SeparableConv2d`, or the 1×1/depthwise convs under that name when the model was loaded back from a
``torch.export`` program), or the same conv (kept). ONNX models are paired by node name
(:func:`separify.backends.onnx.pair_layers`), and their rows are named after the layer each node came from where the
file records it (:func:`separify.backends.onnx.source_names`), the node name in the note. With the
:class:`~separify.ConvertResult` of the conversion, the per-layer record (method, rank, reason for keeping, errors)
joins the row.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from separify.core.measure import Timing, conv_input_shapes, frozen_mode, module_flops, param_dtype, time_torch
from separify.core.modules import SeparableConv2d
from separify.errors import first_line
from separify.records import ConvertResult, LayerRecord, Reason
from separify.reporting.data import LayerFigures, NotMeasured
from separify.reporting.progress import Bar
from separify.reporting.settings import ReportSettings, check_matches

__all__ = ["conv_desc", "torch_layers", "onnx_layers", "flag_shared", "flag_slow"]

KEPT = "the same conv is in both models"


def conv_desc(in_channels: int, out_channels: int, kernel_size, stride, groups: int) -> str:
    """``"64→128 3×3 /2"`` (``g4`` appended for grouped convs)."""
    text = f"{in_channels}→{out_channels} {'×'.join(str(v) for v in kernel_size)}"
    stride = tuple(stride)
    if any(s != 1 for s in stride):
        text += f" /{stride[0]}" if len(set(stride)) == 1 else f" /{','.join(str(s) for s in stride)}"
    if groups != 1:
        text += f" g{groups}"
    return text


def _records(result: ConvertResult | None) -> dict[str, LayerRecord]:
    return {r.name: r for r in result.layers} if result is not None else {}


def _reason(rec: LayerRecord | None, status: str, unmatched: str) -> str | None:
    """The record's reason; for a kept layer without one, that it is the same conv; for an unmatched one, why."""
    if status == "unmatched":
        return unmatched
    reason = rec.reason if rec is not None else None
    return KEPT if status == "kept" and reason is None else reason


def _note(rec: LayerRecord | None, where: str | None = None) -> str | None:
    """The record's notes, with the folded BatchNorm, what the latency selection measured on ``where`` (the
    target, described) and the ONNX output error."""
    if rec is None:
        return None
    timed, where = None, where or "the target"
    if rec.time_before_ms is not None and rec.time_after_ms is not None:
        timed = f"selected on {where}: {rec.time_before_ms:.3g} → {rec.time_after_ms:.3g} ms, layout {rec.layout}"
    elif rec.time_before_ms is not None and rec.reason_code not in (None, Reason.NOT_FASTER):
        timed = f"dense {rec.time_before_ms:.3g} ms on {where}"  # NOT_FASTER's reason already gives the times
    parts = [f"BN {rec.bn_folded} folded" if rec.bn_folded else None, rec.note, timed,
             f"output error {rec.output_error:.3g} (onnxruntime, random inputs)" if rec.output_error is not None
             else None]
    return "; ".join(p for p in parts if p) or None


def _record_figures(rec: LayerRecord | None, where: str | None = None) -> dict[str, Any]:
    """The row's fields taken from the conversion's record (both backends); ``where``: the latency target."""
    return {"note": _note(rec, where),
            "kernel_error": rec.rel_error if rec is not None else None,
            "calib_error_before": rec.calib_error_before if rec is not None else None,
            "calib_error_after": rec.calib_error_after if rec is not None else None}


# --------------------------------------------------------------------------------------------------------------
# PyTorch


def torch_layers(original: nn.Module, converted: nn.Module, inputs: tuple, result: ConvertResult | None,
                 settings: ReportSettings, bar: Bar) -> list[LayerFigures]:
    """One row per ``nn.Conv2d`` of ``original``: FLOPs at its real input shapes on ``inputs``, and (when
    ``settings.per_layer``) the conv and its replacement timed alone at the first of those shapes. Timings that
    layers of different shapes share are marked ``suspect`` (:func:`flag_shared`); where the conversion timed on
    an equivalent target, a dense time far from the selection's is noted (:func:`_disagreement`)."""
    old_modules = dict(original.named_modules())
    old_convs = [n for n, m in old_modules.items() if isinstance(m, nn.Conv2d)]
    new_modules = dict(converted.named_modules())
    new_convs = [n for n, m in new_modules.items() if isinstance(m, nn.Conv2d)]
    shapes = conv_input_shapes(original, inputs, old_convs)
    new_order = [n for n, calls in conv_input_shapes(converted, inputs, new_convs).items() if calls]
    records = _records(result)
    run_time = settings.layer_run_time
    bar.total(len([n for n in old_convs if shapes[n]]) if run_time is not None else 0)
    where = result.latency_target if result is not None else None
    same = check_matches(result, f"torch-{settings.device}", settings.threads,
                         int(inputs[0].shape[0]) if inputs and inputs[0].dim() else None)
    rows = []
    for name in old_convs:
        conv, calls = old_modules[name], shapes[name]
        status, new = _counterpart(name, new_modules, new_order)
        flops = (module_flops(conv, calls) if calls else None, _flops_after(new, calls))
        times = _layer_times(name, conv, new, status, calls[0] if calls else None, settings, run_time, bar)
        row = _torch_row(name, conv, status, new, calls, flops, times, records.get(name), where)
        rows.append(_disagreement(row, len(calls)) if same else row)
    return flag_slow(flag_shared(rows))


#: a dense conv timed by the report and by the selection on an equivalent target disagree beyond this factor
DISAGREE = 2.0
#: this many layers of different shapes reading one figure (3 significant digits) is implausible
SHARED_LAYERS = 3
#: a dense conv taking this many times the median time per FLOP of the timed convs is implausible
SLOW_FACTOR = 100.0
#: ... and reading more than this many ms (tiny convs, e.g. squeeze-and-excitation 1×1 convs on a pooled map, take
#: microseconds whatever their FLOPs: their cost per FLOP is high and real)
SLOW_MS = 1.0


def _disagreement(row: LayerFigures, calls: int) -> LayerFigures:
    """``row`` with a note when its dense conv, timed here on a target equivalent to the selection's, took more
    than :data:`DISAGREE` × (or less than 1/that) what the selection measured for it (``calls`` per forward)."""
    before, selected = row.latency_before, row.selected_ms_before
    if not isinstance(before, Timing) or not selected or not calls:
        return row
    factor = before.median_ms * calls / selected
    if 1 / DISAGREE <= factor <= DISAGREE:
        return row
    text = (f"timed here at {factor:.3g}× what the selection measured for the dense conv on the same target: the "
            "machine was busier in one of the two runs (other processes, more threads than free cores)")
    return dataclasses.replace(row, note="; ".join(p for p in (row.note, text) if p))


def flag_shared(rows: Sequence[LayerFigures]) -> list[LayerFigures]:
    """``rows`` with every per-layer timing marked ``suspect`` whose figure (median, 3 significant digits) is also
    read, on the same side (before or after), by layers of :data:`SHARED_LAYERS` or more different shapes (conv,
    input past the batch dimension, method and rank): real times of different layers do not agree to 3 digits,
    a fixed cost per call does (e.g. each op waiting for a descheduled thread when the threads outnumber the free
    cores)."""
    keys: dict[tuple[str, str], set] = {}
    for r in rows:
        shape = (r.conv, tuple(r.input_shape[1:]) if r.input_shape else None)
        for side, t in (("before", r.latency_before), ("after", r.latency_after)):
            if isinstance(t, Timing):
                key = shape if side == "before" else shape + (r.method, r.rank)
                keys.setdefault((side, f"{t.median_ms:.3g}"), set()).add(key)
    shared = {k for k, layers in keys.items() if len(layers) >= SHARED_LAYERS}

    def mark(side: str, t):
        hit = isinstance(t, Timing) and not t.suspect and (side, f"{t.median_ms:.3g}") in shared
        return dataclasses.replace(t, suspect=True) if hit else t

    return [dataclasses.replace(r, latency_before=mark("before", r.latency_before),
                                latency_after=mark("after", r.latency_after)) for r in rows]


def flag_slow(rows: Sequence[LayerFigures]) -> list[LayerFigures]:
    """``rows`` with a dense conv's timing marked ``suspect`` where its time per FLOP is more than
    :data:`SLOW_FACTOR` × the median over the timed convs (at least three) and it reads over :data:`SLOW_MS`: e.g.
    a 0.5 MFLOPs stem conv reading 16 ms while the others run at a thousandth of that per FLOP (a stall, not the
    layer's time)."""
    per_flop = {r.name: r.latency_before.median_ms / r.flops_before for r in rows
                if isinstance(r.latency_before, Timing) and r.flops_before}
    if len(per_flop) < 3:
        return list(rows)
    limit = SLOW_FACTOR * sorted(per_flop.values())[len(per_flop) // 2]
    slow = {r.name for r in rows if per_flop.get(r.name, 0.0) > limit and r.latency_before.median_ms > SLOW_MS}
    return [dataclasses.replace(r, latency_before=dataclasses.replace(r.latency_before, suspect=True))
            if r.name in slow else r for r in rows]


def _counterpart(name: str, new_modules: dict[str, nn.Module], conv_order: list[str]) -> tuple[str, nn.Module | None]:
    """``(status, module)``: the same conv (``"kept"``), the replacement (``"converted"``), or ``("unmatched",
    None)``."""
    same = new_modules.get(name)
    if isinstance(same, nn.Conv2d) and not isinstance(same, SeparableConv2d):
        return "kept", same
    new = _replacement(name, new_modules, conv_order)
    return ("converted" if new is not None else "unmatched"), new


def _replacement(name: str, new_modules: dict[str, nn.Module], conv_order: list[str]) -> nn.Module | None:
    """The converted model's stand-in for the original conv ``name``: a separable module at that name, or (for a
    model loaded back from ``torch.export``) its convs, called in order."""
    module = new_modules.get(name)
    if isinstance(module, SeparableConv2d):
        return module
    parts = [new_modules[n] for n in conv_order if n.startswith(name + ".")]
    return nn.Sequential(*parts) if parts else None


def _flops_after(new: nn.Module | None, calls: list) -> int | None:
    if not calls or new is None:
        return None
    try:
        return module_flops(new, calls)
    except Exception:  # noqa: BLE001 - convs lifted from a .pt2 of a non-default layout do not run alone
        return None


def _layer_times(name: str, conv: nn.Conv2d, new: nn.Module | None, status: str, shape: tuple | None,
                 settings: ReportSettings, run_time: float | None, bar: Bar) -> tuple[Timing | NotMeasured, ...]:
    """``(before, after)``: the conv and its replacement timed alone on one random input of ``shape`` (``after``
    not measured for a kept or unmatched layer, or a replacement that cannot run alone)."""
    if shape is None:
        why = NotMeasured("the layer is not called on the report's input")
        return why, why
    if run_time is None:
        why = NotMeasured("per-layer timing turned off")
        return why, why
    bar.step(f"timing layer {name}")
    x = torch.randn(shape, dtype=param_dtype(conv))
    timing = dict(device=settings.device, threads=settings.threads, min_run_time=run_time)
    after = NotMeasured("layer unchanged" if status == "kept" else "no counterpart")
    if status == "converted":
        try:
            with torch.no_grad(), frozen_mode(new):
                new(x)
        except Exception as exc:  # noqa: BLE001 - e.g. padding ops of an exported module lost between convs
            after = NotMeasured(f"the replacement cannot be run on its own ({first_line(exc)})")
        else:
            return tuple(time_torch([conv, new], (x,), **timing))
    return time_torch(conv, (x,), **timing), after


def _torch_row(name: str, conv: nn.Conv2d, status: str, new: nn.Module | None, calls: list, flops: tuple,
               times: tuple, rec: LayerRecord | None, where: str | None = None) -> LayerFigures:
    converted = status == "converted"
    return LayerFigures(
        name=name, conv=conv_desc(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.groups),
        status=status, input_shape=calls[0] if calls else None, flops_before=flops[0], flops_after=flops[1],
        latency_before=times[0], latency_after=times[1],
        method=rec.method if rec is not None else _method_of(new) if converted else None,
        rank=rec.rank if rec is not None else _rank_of(new) if converted else None,
        reason=_reason(rec, status, "no conv or separable module at this name in the converted model"),
        layout=rec.layout if rec is not None else getattr(new, "layout", None) if converted else None,
        selected_ms_before=rec.time_before_ms if rec is not None else None,
        selected_ms_after=rec.time_after_ms if rec is not None else None,
        **_record_figures(rec, where))


def _method_of(module: nn.Module | None) -> str | None:
    if isinstance(module, SeparableConv2d):
        return module.method
    if isinstance(module, nn.Sequential):  # convs of a torch.export-loaded replacement: pw → dw → pw or dw → pw
        kinds = ["pw" if tuple(m.kernel_size) == (1, 1) else "dw" for m in module]
        return "-".join(kinds)
    return None


def _rank_of(module: nn.Module | None) -> int | None:
    """R of pw-dw-pw (the depthwise conv's channels), K of dw-pw (its channel multiplier)."""
    if isinstance(module, SeparableConv2d):
        return module.rank
    if isinstance(module, nn.Sequential):
        dw = next((m for m in module if tuple(m.kernel_size) != (1, 1)), None)
        if dw is not None:
            return dw.out_channels // dw.in_channels if module[0] is dw else dw.out_channels
    return None


# --------------------------------------------------------------------------------------------------------------
# ONNX


def onnx_layers(models: Sequence[Any], feeds: Mapping[str, Any], result: ConvertResult | None,
                threads: int | None, *, pairs: Sequence[LayerRecord] | None = None) -> list[LayerFigures]:
    """One row per Conv node of ``models[0]``, paired by node name with ``models[1]`` (``pairs``: those of
    :func:`~separify.backends.onnx.pair_layers`, when already made); FLOPs on ``feeds``, no per-layer timing.
    A row is named after the layer its node came from where the file records one
    (:func:`~separify.backends.onnx.source_names`: e.g. ``layer1.0.conv1`` for torch.onnx's ``node_Conv_12``),
    with ``node <name>`` first in its note; else after the node."""
    from separify.backends import onnx as onnx_pass

    records = _records(result)
    if pairs is None:
        pairs = onnx_pass.pair_layers(*models, feeds, threads=threads)
    sources = onnx_pass.source_names(models[0])
    rows = []
    for pair in pairs:
        rec = records.get(pair.name)
        why = NotMeasured("per-layer timing is for PyTorch models only")
        figures = _record_figures(rec, result.latency_target if result is not None else None)
        name = sources.get(pair.name, pair.name)
        if name != pair.name:
            figures["note"] = "; ".join(p for p in (f"node {pair.name}", figures["note"]) if p)
        rows.append(LayerFigures(
            name=name, conv=conv_desc(pair.in_channels, pair.out_channels, pair.kernel_size, pair.stride,
                                      pair.groups),
            status=pair.status, input_shape=pair.input_shape, flops_before=pair.flops_before,
            flops_after=pair.flops_after, latency_before=why, latency_after=why, method=pair.method, rank=pair.rank,
            reason=_reason(rec, pair.status, "no Conv node, or nodes written by separify, at this name in the "
                                             "converted model"),
            **figures))
    return rows
