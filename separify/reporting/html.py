"""The report as one self-contained HTML page (inline CSS and inline SVG plots drawn with matplotlib; no scripts, no
network), and the same plots as a PNG.

Plots of one :class:`~separify.reporting.Report`: FLOPs per layer before/after, latency per layer before/after, and the
whole model's converted/original ratios (FLOPs, parameters, latency per backend) side by side, which is where FLOPs
and time part ways; after a ``max_drop`` search, the metric of every try against its measured time ratio. Plots of a
:class:`~separify.reporting.Comparison`: quality against FLOPs ratio and latency ratio against FLOPs ratio, one line
per method.
"""

from __future__ import annotations

import html
import io
import os
from typing import Callable

from separify.core.measure import Timing
from separify.reporting.data import Comparison, Report
from separify.reporting.search import (CHOSEN, OVER, WITHIN, search_chosen, search_head, search_of, search_rows,
                                       search_title)
from separify.reporting.story import (SUSPECT_NOTE, Cell, conversion_lines, environment_line, layer_head,
                                      layer_rows, note_lines, totals_rows)
from separify.reporting.verdict import verdict

__all__ = ["render_html", "write_html", "write_png"]

_BEFORE, _AFTER = "#8c8c8c", "#1f77b4"
_Draw = Callable[["object"], None]  # draws into one matplotlib Axes
_HEIGHT = 3.5  # inches, for plots that do not grow with the number of layers


def _layer_height(n_layers: int) -> float:
    return max(2.5, 0.28 * n_layers + 1.0)


def _layer_flops(rep: Report) -> tuple[str, _Draw, float] | None:
    rows = [r for r in rep.layers if r.flops_before is not None]
    if not rows:
        return None

    def draw(ax):
        _barh(ax, [r.name for r in rows], [r.flops_before / 1e6 for r in rows],
              [(r.flops_after if r.flops_after is not None else r.flops_before) / 1e6 for r in rows])
        ax.set_xlabel("MFLOPs (= 2 × MMACs)")

    return "FLOPs per layer, before and after", draw, _layer_height(len(rep.layers))


def _layer_latency(rep: Report) -> tuple[str, _Draw, float] | None:
    rows = [r for r in rep.layers if isinstance(r.latency_before, Timing)]
    if not rows:
        return None

    def draw(ax):
        after = [r.latency_after.median_ms if isinstance(r.latency_after, Timing) else float("nan")  # no bar
                 for r in rows]
        _barh(ax, [r.name for r in rows], [r.latency_before.median_ms for r in rows], after)
        ax.set_xlabel(f"ms per call (median), torch {rep.settings.get('device')}, batch {rep.settings.get('batch_size')}")

    return "Latency per layer, before and after (kept layers: before only)", draw, _layer_height(len(rep.layers))


def _barh(ax, names, before, after) -> None:
    ys = range(len(names))
    ax.barh([y - 0.2 for y in ys], before, height=0.4, color=_BEFORE, label="original")
    ax.barh([y + 0.2 for y in ys], after, height=0.4, color=_AFTER, label="converted")
    ax.set_yticks(list(ys), names, fontsize=7)
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)


def _ratios(rep: Report) -> tuple[str, _Draw, float]:
    labels = ["FLOPs", "parameters"] + [f"latency\n{lat.backend}" for lat in rep.latency if lat.ratio is not None]
    values = [rep.flops_ratio, rep.converted.params / max(rep.original.params, 1)] + \
             [lat.ratio for lat in rep.latency if lat.ratio is not None]

    def draw(ax):
        colors = [_BEFORE, _BEFORE] + [("#d62728" if v > 1 else _AFTER) for v in values[2:]]
        ax.bar(range(len(values)), values, color=colors)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(values)), labels, fontsize=8)
        ax.set_ylabel("converted / original")
        for i, v in enumerate(values):
            ax.annotate(f"{v:.2f}", (i, v), ha="center", va="bottom", fontsize=8)

    return "Whole model: converted / original (FLOPs counted, latency measured)", draw, _HEIGHT


def _quality_metric(rep: Report):
    for q in rep.quality:
        if q.original is not None and q.unit == "fraction":
            return q.metric
    return next((q.metric for q in rep.quality if q.unit == "fraction"), None)


def _tradeoff(comp: Comparison) -> list[tuple[str, _Draw, float]]:
    plots = []
    metric = _quality_metric(comp.runs[0][2])
    groups: dict[str, list[tuple[float, Report]]] = {}
    for _label, settings, rep in comp.runs:
        groups.setdefault(str(settings.get("method", "pw-dw-pw")), []).append((rep.flops_ratio, rep))
    if metric is not None:
        def draw_quality(ax):
            for method, pts in groups.items():
                pts = sorted(pts, key=lambda p: p[0])
                ax.plot([p[0] for p in pts], [p[1].quality_of(metric).converted for p in pts], "o-", label=method)
            base = comp.runs[0][2].quality_of(metric)
            if base is not None and base.original is not None:
                ax.axhline(base.original, color="black", linewidth=0.8, linestyle="--", label="original")
            ax.set_xlabel("FLOPs, converted / original")
            ax.set_ylabel(metric)
            ax.legend(fontsize=8)

        plots.append((f"{metric} against FLOPs", draw_quality, _HEIGHT))
    backends = [lat.backend for lat in comp.runs[0][2].latency]
    if backends:
        def draw_latency(ax):
            for method, pts in groups.items():
                pts = sorted(pts, key=lambda p: p[0])
                for b in backends:
                    xs = [p[0] for p in pts if _ratio(p[1], b) is not None]
                    ys = [_ratio(p[1], b) for p in pts if _ratio(p[1], b) is not None]
                    if xs:
                        ax.plot(xs, ys, "o-", label=f"{method}, {b}")
            ax.plot([0, 1], [0, 1], color="black", linewidth=0.8, linestyle=":", label="latency = FLOPs")
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
            ax.set_xlabel("FLOPs, converted / original")
            ax.set_ylabel("latency, converted / original")
            ax.legend(fontsize=8)

        plots.append(("Measured latency against FLOPs", draw_latency, _HEIGHT))
    return plots


def _ratio(rep: Report, backend: str):
    return next((lat.ratio for lat in rep.latency if lat.backend == backend), None)


def _search_plot(rep: Report) -> tuple[str, _Draw, float] | None:
    """The ``max_drop`` search: time ratio (x) against the metric (y) per timed try, the original at (1, its
    metric), a dashed line at original − max_drop, the chosen try ringed."""
    doc = search_of(rep.conversion)
    if doc is None:
        return None

    def draw(ax):
        tries = [t for t in doc["tries"] if "value" in t["time_ratio"]]
        for within, color, label in ((True, _AFTER, f"try, {WITHIN} the max drop"),
                                     (False, "#d62728", f"try, {OVER} the max drop")):
            pts = [t for t in tries if t["within"] == within]
            if pts:
                ax.scatter([t["time_ratio"]["value"] for t in pts], [t["metric"]["value"] for t in pts],
                           color=color, label=label, zorder=3)
        for t in tries:
            ax.annotate(f"budget {t['budget']['value']:.3g}", (t["time_ratio"]["value"], t["metric"]["value"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.scatter([1.0], [doc["original"]["value"]], color="black", marker="s", label="original", zorder=3)
        ax.axhline(doc["floor"]["value"], color="black", linewidth=0.8, linestyle="--",
                   label=f"original − max drop ({doc['floor']['value']:.4g})")
        chosen = [t for t in tries if t["chosen"]]
        if chosen:
            ax.scatter([chosen[0]["time_ratio"]["value"]], [chosen[0]["metric"]["value"]], s=180,
                       facecolors="none", edgecolors="black", linewidths=1.5, label=CHOSEN, zorder=4)
        ax.set_xlabel("time ratio, converted / original (measured on the target)")
        ax.set_ylabel(doc["metric"])
        ax.legend(fontsize=8)

    return search_title(doc), draw, _HEIGHT


def _plots(doc: Report | Comparison, *, search: bool = True) -> list[tuple[str, _Draw, float]]:
    """``(title, draw, height in inches)`` of every plot of ``doc`` (a report's search plot with ``search``)."""
    if isinstance(doc, Comparison):
        return _tradeoff(doc)
    plots = (_ratios(doc), _layer_flops(doc), _layer_latency(doc), _search_plot(doc) if search else None)
    return [p for p in plots if p is not None]


def _svg(draw: _Draw, height: float) -> str:
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text: smaller, searchable
        fig = Figure(figsize=(8, height), layout="constrained")
        draw(fig.add_subplot())
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]  # drop the XML prolog and doctype for inline use


def write_png(doc: Report | Comparison, path: str | os.PathLike, *, dpi: int = 110) -> None:
    """All plots of ``doc`` stacked in one PNG (for a README or a slide), written atomically."""
    from matplotlib.figure import Figure

    from separify.io.files import atomic_write

    plots = _plots(doc)
    if not plots:
        raise ValueError("nothing to plot")
    heights = [h for _, _, h in plots]
    fig = Figure(figsize=(9, sum(heights) + 0.4 * len(plots)), layout="constrained")
    axes = fig.subplots(len(plots), 1, height_ratios=heights, squeeze=False)[:, 0]
    for ax, (title, draw, _) in zip(axes, plots):
        draw(ax)
        ax.set_title(title, fontsize=10)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


# --------------------------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child, td.text, th.text { text-align: left; }
td.kept { color: #8a6d00; } td.worse { color: #c00; font-weight: bold; } .noisy { color: #b36b00; }
td.chosen { font-weight: bold; } .suspect { color: #c00; }
figure { margin: 1.5em 0; } figcaption { font-weight: bold; margin-bottom: 0.3em; }
.meta { color: #555; font-size: 0.85em; }
.verdict { border-left: 4px solid #1f77b4; background: #f3f7fb; padding: 0.2em 1em; margin: 1em 0; }
"""


def _e(x) -> str:
    return html.escape(str(x))


def _cells(row: list[Cell]) -> tuple[list[str], list[str]]:
    """A row of :mod:`~separify.reporting.story` cells as escaped HTML and CSS classes (a suspect timing explains
    itself on hover)."""
    texts = [f'<span title="{_e(SUSPECT_NOTE)}">{_e(c.text)}</span>' if c.style == "suspect" else _e(c.text)
             for c in row]
    return texts, [c.style or "" for c in row]


def _cell_table(cols: list[tuple[str, str]], rows: list[list[Cell]]) -> str:
    """A table of story cells under ``(head, "left"|"right")`` columns; left-justified columns get class ``text``."""
    out, classes = [], []
    for row in rows:
        texts, cls = _cells(row)
        out.append(texts)
        classes.append([" ".join(filter(None, (c, "text" if j == "left" else ""))) for c, (_, j) in zip(cls, cols)])
    return _table([h for h, _ in cols], out, classes, {i for i, (_, j) in enumerate(cols) if j == "left"})


def _verdict(rep: Report) -> str:
    v = verdict(rep)
    hint = f"<p><b>Next:</b> {_e(v.hint)}</p>" if v.hint else ""
    return f"<div class='verdict'><p><b>Verdict:</b> {_e(v.text())}</p>{hint}</div>"


def _search_section(rep: Report) -> list[str]:
    """The ``max_drop`` search: its table (the terminal's rows), the line on the chosen try, and its plot."""
    doc = search_of(rep.conversion)
    plot = _search_plot(rep)
    if doc is None or plot is None:
        return []
    rows = search_rows(doc)
    cls = [["text"] + [""] * 4 + ["worse" if row[5] == OVER else "", "chosen" if row[-1] == CHOSEN else ""]
           for row in rows]
    title, draw, height = plot
    return [f"<h2>{_e(title)}</h2>", _table(search_head(), [[_e(v) for v in row] for row in rows], cls),
            f"<p>{_e(search_chosen(doc))}</p>",
            f"<figure><figcaption>{_e(title)}</figcaption>{_svg(draw, height)}</figure>"]


def _table(head: list[str], rows: list[list[str]], classes: list[list[str]] | None = None,
           left: set[int] = frozenset()) -> str:
    """``left``: the columns whose heads are left-justified (their cells say so in ``classes``)."""
    heads = [f'<th class="text">{_e(h)}</th>' if i in left else f"<th>{_e(h)}</th>" for i, h in enumerate(head)]
    out = ["<table><thead><tr>" + "".join(heads) + "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        cls = classes[i] if classes else [""] * len(row)
        out.append("<tr>" + "".join(f'<td class="{c}">{v}</td>' if c else f"<td>{v}</td>" for v, c in zip(row, cls))
                   + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _report_body(rep: Report) -> str:
    """The whole-model table, the conversion's lines, the layer table, the search, the notes and the
    plots: the terminal's content (:func:`~separify.reporting.tables.print_report`) in its words."""
    parts = ["<h2>Whole model</h2>",
             _cell_table([("", "left"), ("original", "right"), ("converted", "right"),
                          ("converted / original", "right")], totals_rows(rep)),
             f"<p class='meta'>{_e(environment_line(rep))}</p>"]
    parts += [f"<p>{_e(line)}</p>" for line in conversion_lines(rep.conversion)]
    if rep.layers:
        title, cols = layer_head(rep)
        parts += [f"<h2>{_e(title)}</h2>", _cell_table(cols, layer_rows(rep))]
    parts += _search_section(rep)
    notes = note_lines(rep)
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    parts.append("<h2>Plots</h2>")
    for title, draw, height in _plots(rep, search=False):
        parts.append(f"<figure><figcaption>{_e(title)}</figcaption>{_svg(draw, height)}</figure>")
    return "\n".join(parts)


def _meta(rep: Report) -> str:
    env, s = rep.environment, rep.settings
    items = [f"created {rep.created}", f"CPU {env.get('cpu')} ({env.get('cpu_count')} logical)",
             f"GPU {env['gpu']}" if env.get("gpu") else "no GPU used", f"torch {env.get('torch')}",
             f"onnxruntime {env.get('onnxruntime')}", f"device {s.get('device')}", f"batch {s.get('batch_size')}",
             f"{s.get('threads')} threads", f"input {s.get('input_shapes')}", f"separify {env.get('separify')}"]
    return f"<p class='meta'>{' · '.join(_e(i) for i in items)}</p>"


def render_html(doc: Report | Comparison, *, title: str = "separify report") -> str:
    """The whole page as a string: tables, inline SVG plots, what was not measured. Opens offline."""
    if isinstance(doc, Comparison):
        first = doc.runs[0][2]
        head, rows = doc.table()
        body = [_meta(first), "<h2>Trade-off</h2>", _table(head, [[_e(v) for v in row] for row in rows])]
        for t, draw, height in _plots(doc):
            body.append(f"<figure><figcaption>{_e(t)}</figcaption>{_svg(draw, height)}</figure>")
        for label, _, rep in doc.runs:
            body.append(f"<h2>{_e(label)}</h2>" + _verdict(rep) + _report_body(rep))
        content = "\n".join(body)
    else:
        content = _verdict(doc) + _meta(doc) + _report_body(doc)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>\n{content}\n</body></html>\n")


def write_html(doc: Report | Comparison, path: str | os.PathLike, *, title: str = "separify report") -> None:
    """Write :func:`render_html` atomically."""
    from pathlib import Path

    from separify.io.files import atomic_write

    text = render_html(doc, title=title)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
