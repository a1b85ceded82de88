"""The ``max_drop`` search of a conversion (the ``conversion.search`` entry of a report, see
:func:`separify.reporting.data.search_doc`) in the words and figures that the terminal table
(:mod:`~separify.reporting.tables`) and the HTML page (:mod:`~separify.reporting.html`) both show."""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["search_of", "search_title", "search_head", "search_rows", "search_chosen", "CHOSEN", "WITHIN", "OVER"]

CHOSEN = "chosen"
WITHIN = "within"
OVER = "over"


def search_of(conversion: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The search entry of a report's ``conversion`` document, ``None`` when the conversion made no search."""
    return (conversion or {}).get("search")


def search_title(doc: Mapping[str, Any]) -> str:
    """``"max-drop search on <target>: <metric>"``."""
    return f"max-drop search on {doc['target']}: {doc['metric']}"


def search_head() -> list[str]:
    """The column heads: latency budget, FLOPs ratio, time ratio, metric, change vs original, within/over the
    allowed drop, chosen."""
    return ["latency budget", "FLOPs ratio", "time ratio", "metric", "change vs original", "max drop", CHOSEN]


def _num(figure: Mapping[str, Any] | None, fmt: str) -> str:
    return "—" if not figure or "value" not in figure else format(figure["value"], fmt)


def search_rows(doc: Mapping[str, Any]) -> list[list[str]]:
    """One row of plain text per try, in order, after a first row for the original (budget —, ratios 1, its
    metric): the columns of :func:`search_head`. ``max drop`` reads :data:`WITHIN` or :data:`OVER` (the metric fell
    more than the allowed drop); the chosen try reads :data:`CHOSEN` in the last column."""
    rows = [["original", "1.000", "1.000", _num(doc["original"], ".4g"), "", "", ""]]
    for t in doc["tries"]:
        rows.append([_num(t["budget"], ".3g"), _num(t["flops_ratio"], ".3f"), _num(t.get("time_ratio"), ".3f"),
                     _num(t["metric"], ".4g"), _num(t["change"], "+.4g"), WITHIN if t["within"] else OVER,
                     CHOSEN if t["chosen"] else ""])
    return rows


def search_chosen(doc: Mapping[str, Any]) -> str:
    """One line saying which try was chosen and why, or that none was and the original was kept."""
    drop, floor = doc["max_drop"]["value"], doc["floor"]["value"]
    if doc.get("chosen") is None:
        return (f"chosen: none of the {len(doc['tries'])} tries kept {doc['metric']} within {drop:g} of the "
                f"original's {doc['original']['value']:.4g} (floor {floor:.4g}); the original model was kept")
    t = doc["tries"][doc["chosen"]]
    return (f"chosen: latency budget {_num(t['budget'], '.3g')}, the fastest try within the allowed drop: time "
            f"ratio {_num(t.get('time_ratio'), '.3f')}, FLOPs ratio {_num(t['flops_ratio'], '.3f')}, "
            f"{doc['metric']} {_num(t['metric'], '.4g')} ({_num(t['change'], '+.4g')}; allowed drop {drop:g}, "
            f"floor {floor:.4g})")
