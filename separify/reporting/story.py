"""What a report says, as plain-text cells and lines shared by both renderers.

The terminal (:mod:`~separify.reporting.tables`, rich) and the HTML page (:mod:`~separify.reporting.html`) draw the
same rows and lines from here, so they say the same thing in the same words: the whole-model rows (file sizes
included), one row per original conv (a layer left alone reads ``kept`` with its reason), the conversion's lines
(layers converted, the target reached, the latency selection, warnings), the environment and the notes. A
:class:`Cell` carries a style name that each renderer maps to its own look: ``kept``, ``worse`` (a ratio above 1:
slower), ``noisy``, ``suspect``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from separify.calibration.budget import STOPPED
from separify.core.measure import Timing
from separify.reporting.data import FROM_CHECK, Latency, NotMeasured, Report

__all__ = ["Cell", "SUSPECT_NOTE", "conversion_lines", "environment_line", "layer_head", "layer_rows", "note_lines",
           "source_note", "totals_rows"]

#: what a ``suspect`` timing means, for the notes under the tables
SUSPECT_NOTE = ("its readings were implausible (twice in a row a spread of exactly 0 while the other model varied, or "
                "identical readings at the clock's resolution; the same figure for layers of different shapes; or a "
                "time per FLOP 100× the other layers'); the figure may not be the model's time: re-run on a quiet "
                "machine or with fewer --threads")


@dataclass(frozen=True)
class Cell:
    """One table cell: its text and a style name (``None``, ``kept``, ``worse``, ``noisy``, ``suspect``)."""

    text: str
    style: str | None = None


def source_note(lat: Latency) -> str:
    """``", from the conversion's check"`` for a row the conversion timed (:data:`FROM_CHECK`), else ``""``."""
    return ", from the conversion's check" if lat.source == FROM_CHECK else ""


def _timing(t: Timing | NotMeasured, *, short: bool = False) -> Cell:
    """``"2.8 ±33% noisy"`` (``short``: ``"2.8*"``); ``"—"`` where not measured."""
    if isinstance(t, NotMeasured):
        return Cell("—")
    text = f"{t.median_ms:.3g}" + (("*" if t.noisy else "") if short else
                                   f" ±{100 * t.spread:.0f}%" + (" noisy" if t.noisy else ""))
    if t.suspect:
        return Cell(text + " suspect", "suspect")
    return Cell(text, "noisy" if t.noisy and not short else None)


def _ratio(ratio: float | None, fmt: str) -> Cell:
    """``ratio`` formatted, styled ``worse`` above 1 (the converted model is slower)."""
    return Cell("—" if ratio is None else f"{ratio:{fmt}}", "worse" if ratio is not None and ratio > 1 else None)


def _mb(v: int | None) -> str:
    return "—" if v is None else f"{v / 1e6:,.2f}"


def totals_rows(rep: Report) -> list[list[Cell]]:
    """The whole-model rows ``[figure, original, converted, converted / original]``."""
    o, c = rep.original, rep.converted
    rows = [[Cell("FLOPs (M, = 2 × MACs)"), Cell(f"{o.flops / 1e6:,.1f}"), Cell(f"{c.flops / 1e6:,.1f}"),
             Cell(f"{rep.flops_ratio:.3f}")],
            [Cell("parameters"), Cell(f"{o.params:,}"), Cell(f"{c.params:,}"), Cell(f"{c.params / max(o.params, 1):.3f}")],
            [Cell("state dict size (MB)"), Cell(_mb(o.state_dict_bytes)), Cell(_mb(c.state_dict_bytes)),
             Cell(f"{c.state_dict_bytes / max(o.state_dict_bytes, 1):.3f}")]]
    if o.file_bytes is not None or c.file_bytes is not None:
        ratio = f"{c.file_bytes / o.file_bytes:.3f}" if o.file_bytes and c.file_bytes is not None else ""
        rows.append([Cell("file size (MB)"), Cell(_mb(o.file_bytes)), Cell(_mb(c.file_bytes)), Cell(ratio)])
    for lat in rep.latency:
        b = lat.original if isinstance(lat.original, Timing) else lat.converted
        how = f", {b.threads} threads" if isinstance(b, Timing) and b.threads else ""
        rows.append([Cell(f"latency ms, {lat.backend} (median ±IQR{how}){source_note(lat)}"), _timing(lat.original),
                     _timing(lat.converted), _ratio(lat.ratio, ".3f")])
    for q in rep.quality:
        fmt = "{:.4f}" if q.unit in ("fraction", "user") else "{:.3g}"
        rows.append([Cell(f"{q.metric} ({q.data})"), Cell("—" if q.original is None else fmt.format(q.original)),
                     Cell(fmt.format(q.converted)), Cell("")])
    return rows


def layer_head(rep: Report) -> tuple[str, list[tuple[str, str]]]:
    """The layer table's title and ``(column, "left"|"right")`` heads: the timing and error columns only where some
    layer has them."""
    timed = any(isinstance(r.latency_before, Timing) for r in rep.layers)
    title = "Layers (FLOPs = 2 × MACs"
    if timed:
        title += (f"; ms: median of one call at batch {rep.settings.get('batch_size')}, torch "
                  f"{rep.settings.get('device')}, {rep.settings.get('threads')} threads, * = noisy")
    cols = [("layer", "left"), ("conv", "left"), ("method", "left"), ("rank", "right"), ("MFLOPs", "right"),
            ("ratio", "right")]
    cols += [("ms", "right"), ("time ratio", "right")] if timed else []
    cols += [("kernel error", "right")] if any(r.kernel_error is not None for r in rep.layers) else []
    cols += [("output error (calib)", "right")] if any(r.calib_error_after is not None for r in rep.layers) else []
    return title + ")", cols + [("notes", "left")]


def _arrow(before: str, after: str) -> str:
    return before if not after else f"{before} → {after}"


def layer_rows(rep: Report) -> list[list[Cell]]:
    """One row per original conv, in :func:`layer_head`'s columns; a layer left alone reads ``kept`` (or
    ``unmatched``) with its reason."""
    _, cols = layer_head(rep)
    names = {c for c, _ in cols}
    rows = []
    for r in rep.layers:
        done = r.status == "converted"
        ratio = f"{r.flops_after / r.flops_before:.3f}" if done and r.flops_before and r.flops_after is not None else ""
        mflops = [("—" if v is None else f"{v / 1e6:,.1f}") for v in (r.flops_before, r.flops_after)]
        row = [Cell(r.name), Cell(r.conv), Cell(r.method or "") if done else Cell(r.status, "kept"),
               Cell(str(r.rank) if r.rank is not None else ""), Cell(_arrow(mflops[0], mflops[1] if done else "")),
               Cell(ratio)]
        if "ms" in names:
            before, after = _timing(r.latency_before, short=True), _timing(r.latency_after, short=True)
            row += [Cell(_arrow(before.text, after.text if done else ""), before.style or after.style),
                    _ratio(r.latency_ratio, ".2f") if r.latency_ratio is not None else Cell("")]
        if "kernel error" in names:
            row.append(Cell(f"{r.kernel_error:.3f}" if r.kernel_error is not None else ""))
        if "output error (calib)" in names:
            row.append(Cell(f"{r.calib_error_before:.3f} → {r.calib_error_after:.3f}"
                            if r.calib_error_after is not None else ""))
        row.append(Cell(r.note or "") if done else Cell("; ".join(t for t in (r.reason, r.note) if t), "kept"))
        rows.append(row)
    return rows


def environment_line(rep: Report) -> str:
    """Where it was measured: CPU, GPU, torch and onnxruntime versions."""
    env = rep.environment
    return (f"measured on {env.get('cpu')} ({env.get('cpu_count')} logical CPUs"
            + (f", GPU {env['gpu']}" if env.get("gpu") else "") + f"), torch {env.get('torch')}"
            + (f", onnxruntime {env['onnxruntime']}" if env.get("onnxruntime") else ""))


def conversion_lines(conv: Mapping[str, Any] | None) -> list[str]:
    """The ``conversion`` entry in words: layers converted, the FLOPs target reached, the latency selection's
    whole-model times, the output reconstruction's held-out errors, then one ``warning:`` line per warning. The
    ``max_drop`` search has its own table."""
    if conv is None:
        return []
    line = f"{conv['converted_layers']} of {conv['conv_layers']} conv layers converted via {conv['path']}"
    if conv.get("trace_error"):
        line += f" (torch.fx could not trace the model: {conv['trace_error']})"
    lines = [line]
    if conv["selection"] == "flops":
        lines.append(f"FLOPs target {conv['target']:g}: reached {conv['flops_ratio_at_example_input']['value']:.3f}")
    sel = conv.get("latency_selection")
    if sel and sel.get("ratio"):
        line = (f"latency objective on {sel['target']}: whole model {sel['original']['median']['value']:.3g} → "
                f"{sel['converted']['median']['value']:.3g} ms, ratio {sel['ratio']['value']:.3f}")
        if sel.get("predicted_ratio"):
            line += f" (the layer times predicted {sel['predicted_ratio']['value']:.3f})"
        if conv["selection"] == "latency":
            line += f"; target {conv['target']:g}"
        lines.append(line)
    lines += _output_reconstruction_line(conv.get("output_reconstruction"))
    return lines + [f"warning: {w}" for w in conv["warnings"]]


def _output_reconstruction_line(fit: Mapping[str, Any] | None) -> list[str]:
    """What the output reconstruction did, in words (nothing where it was off)."""
    if not fit:
        return []
    if fit["note"]:
        return [fit["note"]]
    errors = f"relative output error on {fit['held_out_samples']} held-out calibration samples"
    took = f", {fit['seconds']:.1f} s" if fit.get("seconds") is not None else ""
    took += ", bfloat16" if fit.get("precision") == "bfloat16" else ""
    planned = fit.get("planned_steps") or fit["steps"]
    steps = f"{fit['steps']} steps" if planned == fit["steps"] else \
        f"{fit['steps']} of {planned} steps, {STOPPED}"
    what = f"output reconstruction ({steps}{took})"
    if fit["kept"]:
        return [f"{what}: {errors} {fit['error_before']:.4f} → {fit['error_after']:.4f}"]
    return [f"{what} undone: it did not lower the {errors} ({fit['error_before']:.4f})"]


def note_lines(rep: Report) -> list[str]:
    """Suspect and noisy timings, the settings' notes, and what was not measured."""
    whole = [t for lat in rep.latency for t in (lat.original, lat.converted) if isinstance(t, Timing)]
    per_layer = [t for r in rep.layers for t in (r.latency_before, r.latency_after) if isinstance(t, Timing)]
    lines = []
    suspect = sum(t.suspect for t in whole + per_layer)
    if suspect:
        lines.append(f"note: {suspect} timing(s) marked suspect: {SUSPECT_NOTE}")
    noisy = sorted({lat.backend for lat in rep.latency for t in (lat.original, lat.converted)
                    if isinstance(t, Timing) and t.noisy})
    noisy_layers = sum(t.noisy for t in per_layer)
    if noisy or noisy_layers:
        lines.append("note: some timings are noisy (IQR above 10% of the median): "
                     + ", ".join(noisy + ([f"{noisy_layers} layer timings"] if noisy_layers else []))
                     + "; treat their ratios with care (close other programs, raise --min-time)")
    lines += [f"note: {note}" for note in rep.settings.get("notes", [])]
    return lines + [f"not measured: {what}: {why}" for what, why in rep.not_measured]
