"""The conversion report: a per-layer table and whole-model totals, printed with rich."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from .api import ConvertResult

__all__ = ["Evaluation", "layer_table", "totals_table", "print_report"]


@dataclass(frozen=True)
class Evaluation:
    """A quality figure measured on both models (e.g. top-1 accuracy on labelled data).

    ``what`` says what was measured and on which data; ``before``/``after`` are the values (``before`` is
    ``None`` for figures that compare the converted model with the original).
    """

    what: str
    before: float | None
    after: float
    fmt: str = "{:.4f}"


def _mflops(flops: int) -> str:
    return f"{flops / 1e6:,.1f}"


def layer_table(result: ConvertResult) -> Table:
    """One row per conv: shape, what was done (method, rank, error) or why it was left alone."""
    table = Table(title="Layers (FLOPs = 2 × MACs, at the example input)", show_lines=False)
    for col, kw in (
        ("layer", {}), ("conv", {}), ("method", {}), ("rank", {"justify": "right"}),
        ("MFLOPs before", {"justify": "right"}), ("after", {"justify": "right"}), ("ratio", {"justify": "right"}),
        ("kernel error", {"justify": "right"}), ("output error (calib)", {"justify": "right"}), ("notes", {}),
    ):
        table.add_column(col, **kw)
    for r in result.layers:
        k = "×".join(str(v) for v in r.kernel_size)
        conv = f"{r.in_channels}→{r.out_channels} {k}"
        if r.stride != (1, 1) and r.stride != (1,):
            conv += f" /{','.join(str(s) for s in r.stride)}" if len(set(r.stride)) > 1 else f" /{r.stride[0]}"
        if r.groups != 1:
            conv += f" g{r.groups}"
        if r.converted:
            ratio = f"{r.flops_after / r.flops_before:.3f}" if r.flops_before else "-"
            notes = "; ".join(x for x in (f"BN {r.bn_folded} folded" if r.bn_folded else None, r.note) if x)
            calib = ("" if r.calib_error_after is None
                     else f"{r.calib_error_before:.3f} → {r.calib_error_after:.3f}")
            table.add_row(r.name, conv, r.method, str(r.rank), _mflops(r.flops_before), _mflops(r.flops_after),
                          ratio, f"{r.rel_error:.3f}", calib, notes)
        else:
            table.add_row(r.name, conv, "[dim]kept[/dim]", "", _mflops(r.flops_before), _mflops(r.flops_after),
                          "", "", "", f"[yellow]{r.reason}[/yellow]")
    return table


def totals_table(result: ConvertResult, evaluations: tuple[Evaluation, ...] = ()) -> Table:
    """Whole-model figures before and after."""
    table = Table(title="Whole model")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("after / before", justify="right")
    table.add_row("FLOPs (M)", _mflops(result.flops_before), _mflops(result.flops_after), f"{result.flops_ratio:.3f}")
    table.add_row("parameters", f"{result.params_before:,}", f"{result.params_after:,}",
                  f"{result.params_after / max(result.params_before, 1):.3f}")
    for ev in evaluations:
        before = "—" if ev.before is None else ev.fmt.format(ev.before)
        table.add_row(ev.what, before, ev.fmt.format(ev.after), "")
    return table


def print_report(result: ConvertResult, evaluations: tuple[Evaluation, ...] = (), console: Console | None = None) -> None:
    """Print the layer table, the totals, and how the conversion went (path, target, warnings)."""
    console = console or Console()
    console.print(layer_table(result))
    console.print(totals_table(result, evaluations))
    n_conv = len(result.converted)
    line = f"{n_conv} of {len(result.layers)} conv layers converted via {result.path}"
    if result.trace_error:
        line += f" (torch.fx could not trace the model: {result.trace_error})"
    console.print(line)
    cfg = result.config
    if cfg.selection == "flops" and result.flops_budget is not None:
        console.print(f"FLOPs target {cfg.flops:g}: reached {result.flops_ratio:.3f}")
    for w in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
