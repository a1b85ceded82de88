"""The report in the terminal: rich tables of the layers, the whole model and a comparison, and the notes."""

from __future__ import annotations

from typing import Any, Mapping

from rich.console import Console
from rich.table import Table

from separify.core.measure import Timing
from separify.reporting.data import FROM_CHECK, Comparison, Latency, NotMeasured, Report
from separify.reporting.search import (CHOSEN, OVER, search_chosen, search_head, search_of, search_rows,
                                       search_title)

__all__ = ["layer_table", "totals_table", "search_table", "print_report", "print_comparison", "source_note",
           "SUSPECT_NOTE"]

#: what a ``suspect`` timing means, for the notes under the tables
SUSPECT_NOTE = ("its readings were implausible twice in a row (a spread of exactly 0 while the other model varied, "
                "identical readings at the clock's resolution, or the same figure for layers of different shapes); "
                "the figure may not be the model's time: re-run on a quiet machine or with fewer --threads")


def source_note(lat: Latency) -> str:
    """``", from the conversion's check"`` for a row the conversion timed (:data:`FROM_CHECK`), else ``""``."""
    return ", from the conversion's check" if lat.source == FROM_CHECK else ""


def _ms(t: Timing | NotMeasured) -> str:
    if isinstance(t, NotMeasured):
        return "—"
    return (f"{t.median_ms:.3g} ±{100 * t.spread:.0f}%" + (" [red]suspect[/red]" if t.suspect else "")
            + (" [yellow]noisy[/yellow]" if t.noisy else ""))


def _short(t: Timing | NotMeasured) -> str:
    if isinstance(t, NotMeasured):
        return "—"
    return f"{t.median_ms:.3g}" + ("*" if t.noisy else "") + (" [red]suspect[/red]" if t.suspect else "")


def _mflops(v: int | None) -> str:
    return "—" if v is None else f"{v / 1e6:,.1f}"


def _bytes(v: int | None) -> str:
    return "—" if v is None else f"{v / 1e6:,.2f}"


def _arrow(before: str, after: str) -> str:
    return before if not after else f"{before} → {after}"


def _ratio(ratio: float, fmt: str) -> str:
    """``ratio`` formatted, in red above 1 (the converted model is slower)."""
    return f"[red]{ratio:{fmt}}[/red]" if ratio > 1 else f"{ratio:{fmt}}"


def layer_table(rep: Report) -> Table:
    """One row per original conv: what happened to it, FLOPs and latency before → after (``*``: noisy timing)."""
    timed = any(isinstance(r.latency_before, Timing) for r in rep.layers)
    errors = any(r.kernel_error is not None for r in rep.layers)
    calib = any(r.calib_error_after is not None for r in rep.layers)
    title = "Layers (FLOPs = 2 × MACs"
    if timed:
        title += (f"; ms: median of one call at batch {rep.settings.get('batch_size')}, torch "
                  f"{rep.settings.get('device')}, {rep.settings.get('threads')} threads, * = noisy")
    table = Table(title=title + ")")
    cols = [("layer", "left"), ("conv", "left"), ("method", "left"), ("rank", "right"), ("MFLOPs", "right"),
            ("ratio", "right")]
    if timed:
        cols += [("ms", "right"), ("time ratio", "right")]
    if errors:
        cols += [("kernel error", "right")]
    if calib:
        cols += [("output error (calib)", "right")]
    cols += [("notes", "left")]
    for c, j in cols:
        table.add_column(c, justify=j)
    for r in rep.layers:
        converted = r.status == "converted"
        ratio = (f"{r.flops_after / r.flops_before:.3f}" if converted and r.flops_before and r.flops_after is not None
                 else "")
        row = [r.name, r.conv, r.method if converted else "[dim]kept[/dim]", str(r.rank) if r.rank is not None else "",
               _arrow(_mflops(r.flops_before), _mflops(r.flops_after) if converted else ""), ratio]
        if timed:
            lr = r.latency_ratio
            row += [_arrow(_short(r.latency_before), _short(r.latency_after) if converted else ""),
                    "" if lr is None else _ratio(lr, ".2f")]
        if errors:
            row += [f"{r.kernel_error:.3f}" if r.kernel_error is not None else ""]
        if calib:
            row += [f"{r.calib_error_before:.3f} → {r.calib_error_after:.3f}" if r.calib_error_after is not None else ""]
        row += [r.note or "" if converted else f"[yellow]{r.reason}[/yellow]" + (f"; {r.note}" if r.note else "")]
        table.add_row(*row)
    return table


def totals_table(rep: Report) -> Table:
    """Whole-model figures, before and after."""
    table = Table(title="Whole model")
    for c, j in (("", "left"), ("original", "right"), ("converted", "right"), ("converted / original", "right")):
        table.add_column(c, justify=j)
    o, c = rep.original, rep.converted
    table.add_row("FLOPs (M, = 2 × MACs)", _mflops(o.flops), _mflops(c.flops), f"{rep.flops_ratio:.3f}")
    table.add_row("parameters", f"{o.params:,}", f"{c.params:,}", f"{c.params / max(o.params, 1):.3f}")
    table.add_row("state dict size (MB)", _bytes(o.state_dict_bytes), _bytes(c.state_dict_bytes),
                  f"{c.state_dict_bytes / max(o.state_dict_bytes, 1):.3f}")
    if o.file_bytes is not None or c.file_bytes is not None:
        ratio = f"{c.file_bytes / o.file_bytes:.3f}" if o.file_bytes and c.file_bytes is not None else ""
        table.add_row("file size (MB)", _bytes(o.file_bytes), _bytes(c.file_bytes), ratio)
    for lat in rep.latency:
        b = lat.original if isinstance(lat.original, Timing) else lat.converted
        how = f", {b.threads} threads" if isinstance(b, Timing) and b.threads else ""
        ratio = lat.ratio
        table.add_row(f"latency ms, {lat.backend} (median ±IQR{how}){source_note(lat)}", _ms(lat.original),
                      _ms(lat.converted), "—" if ratio is None else _ratio(ratio, ".3f"))
    for q in rep.quality:
        fmt = "{:.4f}" if q.unit in ("fraction", "user") else "{:.3g}"
        table.add_row(f"{q.metric} ({q.data})", "—" if q.original is None else fmt.format(q.original),
                      fmt.format(q.converted), "")
    return table


def print_report(rep: Report, console: Console | None = None) -> None:
    """Print the layer table, the whole-model table and the notes (environment, conversion, noisy timings, what
    was not measured)."""
    console = console or Console()
    if rep.layers:
        console.print(layer_table(rep))
    console.print(totals_table(rep))
    env = rep.environment
    console.print(f"measured on {env.get('cpu')} ({env.get('cpu_count')} logical CPUs"
                  + (f", GPU {env['gpu']}" if env.get("gpu") else "") + f"), torch {env.get('torch')}"
                  + (f", onnxruntime {env['onnxruntime']}" if env.get("onnxruntime") else ""), highlight=False)
    if rep.conversion is not None:
        _print_conversion(console, rep.conversion)
    _print_notes(console, rep)


def _print_conversion(console: Console, conv: Mapping[str, Any]) -> None:
    """The ``conversion`` entry: layers converted, the target reached, the latency selection, the warnings."""
    line = f"{conv['converted_layers']} of {conv['conv_layers']} conv layers converted via {conv['path']}"
    if conv.get("trace_error"):
        line += f" (torch.fx could not trace the model: {conv['trace_error']})"
    console.print(line)
    if conv["selection"] == "flops":
        console.print(f"FLOPs target {conv['target']:g}: reached {conv['flops_ratio_at_example_input']['value']:.3f}")
    sel = conv.get("latency_selection")
    if sel and sel.get("ratio"):
        line = (f"latency objective on {sel['target']}: whole model {sel['original']['median']['value']:.3g} → "
                f"{sel['converted']['median']['value']:.3g} ms, ratio {sel['ratio']['value']:.3f}")
        if sel.get("predicted_ratio"):
            line += f" (the layer times predicted {sel['predicted_ratio']['value']:.3f})"
        if conv["selection"] == "latency":
            line += f"; target {conv['target']:g}"
        console.print(line, highlight=False)
    search = search_of(conv)
    if search is not None:
        console.print(search_table(search))
        console.print(search_chosen(search), highlight=False)
    for w in conv["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {w}")


def search_table(doc: Mapping[str, Any]) -> Table:
    """The ``max_drop`` search: the original, then one row per try (:func:`~separify.reporting.search.search_rows`),
    over-the-drop tries in red, the chosen one in bold."""
    table = Table(title=search_title(doc))
    for i, head in enumerate(search_head()):
        table.add_column(head, justify="left" if i == 0 else "right")
    for row in search_rows(doc):
        style = "bold" if row[-1] == CHOSEN else "red" if row[5] == OVER else None
        table.add_row(*row, style=style)
    return table


def _print_notes(console: Console, rep: Report) -> None:
    """Noisy timings, the settings' notes, and what was not measured."""
    suspect = [t for lat in rep.latency for t in (lat.original, lat.converted) if isinstance(t, Timing) and t.suspect]
    suspect += [t for r in rep.layers for t in (r.latency_before, r.latency_after)
                if isinstance(t, Timing) and t.suspect]
    if suspect:
        console.print(f"[yellow]note:[/yellow] {len(suspect)} timing(s) marked suspect: {SUSPECT_NOTE}")
    noisy = [lat.backend for lat in rep.latency for t in (lat.original, lat.converted)
             if isinstance(t, Timing) and t.noisy]
    noisy_layers = sum(isinstance(t, Timing) and t.noisy for r in rep.layers for t in (r.latency_before, r.latency_after))
    if noisy or noisy_layers:
        console.print("[yellow]note:[/yellow] some timings are noisy (IQR above 10% of the median): "
                      + ", ".join(sorted(set(noisy)) + ([f"{noisy_layers} layer timings"] if noisy_layers else []))
                      + "; treat their ratios with care (close other programs, raise --min-time)")
    for note in rep.settings.get("notes", []):
        console.print(f"[yellow]note:[/yellow] {note}")
    for what, why in rep.not_measured:
        console.print(f"not measured: {what}: {why}", highlight=False)


def print_comparison(comp: Comparison, console: Console | None = None) -> None:
    """One row per setting: FLOPs, parameters, latency ratios and quality."""
    console = console or Console()
    head, rows = comp.table()
    table = Table(title="Conversions compared (ratios are converted / original, measured in this run)")
    for i, h in enumerate(head):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
