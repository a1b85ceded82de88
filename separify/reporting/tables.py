"""The report in the terminal: rich tables of the layers, the whole model and a comparison, and the notes."""

from __future__ import annotations

from typing import Any, Mapping

from rich.console import Console
from rich.table import Table
from rich.text import Text

from separify.reporting.data import Comparison, Report
from separify.reporting.search import (CHOSEN, OVER, search_chosen, search_head, search_of, search_rows,
                                       search_title)
from separify.reporting.story import (SUSPECT_NOTE, Cell, conversion_lines, environment_line, layer_head,
                                      layer_rows, note_lines, source_note, totals_rows)
from separify.reporting.verdict import verdict

__all__ = ["layer_table", "totals_table", "search_table", "print_report", "print_comparison", "source_note",
           "SUSPECT_NOTE"]

#: how the terminal draws each cell style of :mod:`~separify.reporting.story`
_STYLES = {"kept": "yellow", "worse": "red", "noisy": "yellow", "suspect": "red"}


def _text(cell: Cell) -> Text:
    return Text(cell.text, style=_STYLES.get(cell.style or "", ""))


def _line(console: Console, line: str) -> None:
    """A line of :mod:`~separify.reporting.story`, its leading ``note:``/``warning:`` in yellow."""
    head, sep, rest = line.partition(": ")
    if head in ("note", "warning") and sep:
        console.print(Text.assemble((head + ":", "yellow"), " " + rest))
    else:
        console.print(Text(line))


def layer_table(rep: Report) -> Table:
    """One row per original conv: what happened to it, FLOPs and latency before → after (``*``: noisy timing)."""
    title, cols = layer_head(rep)
    table = Table(title=title)
    for c, j in cols:
        table.add_column(c, justify=j)
    for row in layer_rows(rep):
        table.add_row(*map(_text, row))
    return table


def totals_table(rep: Report) -> Table:
    """Whole-model figures, before and after."""
    table = Table(title="Whole model")
    for c, j in (("", "left"), ("original", "right"), ("converted", "right"), ("converted / original", "right")):
        table.add_column(c, justify=j)
    for row in totals_rows(rep):
        table.add_row(*map(_text, row))
    return table


def print_report(rep: Report, console: Console | None = None) -> None:
    """Print the layer table, the whole-model table, the environment, the conversion's lines, the search, the notes
    and, last, the verdict (:mod:`~separify.reporting.verdict`)."""
    console = console or Console()
    if rep.layers:
        console.print(layer_table(rep))
    console.print(totals_table(rep))
    console.print(Text(environment_line(rep)))
    lines = conversion_lines(rep.conversion)
    for line in lines:
        if not line.startswith("warning: "):
            _line(console, line)
    search = search_of(rep.conversion)
    if search is not None:
        console.print(search_table(search))
        console.print(Text(search_chosen(search)))
    for line in [x for x in lines if x.startswith("warning: ")] + note_lines(rep):
        _line(console, line)
    v = verdict(rep)
    console.print(Text.assemble(("Verdict: ", "bold"), v.text()))
    if v.hint:
        console.print(Text.assemble(("Next: ", "bold"), v.hint))


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
