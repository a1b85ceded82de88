"""The progress bars of every long step (candidate timing, decomposition, calibration, fine-tuning, the report).

One look for all: rich, on stderr, transient, the step's description, a bar, done/total, the elapsed time and, where
the total is known, the time left (``ETA``). Drawn only on a terminal (or in Jupyter): redirected to a file, a
transient bar leaves nothing but a blank line. Lives in ``core`` so that the pipeline, the calibration, the
fine-tuning and the report can all use it without importing each other.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ETA_PERIOD", "columns", "progress_bar"]

ETA_PERIOD = 3600.0  # seconds of progress the time left is estimated from (rich's default, 30 s, loses slow steps)


def _eta_column():
    from rich.progress import TimeRemainingColumn
    from rich.text import Text

    class EtaColumn(TimeRemainingColumn):
        """rich's time left, labelled ``ETA``; blank while the total is not known yet."""

        def render(self, task) -> Text:
            if task.total is None:
                return Text("")
            return Text.assemble("ETA ", super().render(task))

    return EtaColumn()


def columns(total: bool = True) -> list[Any]:
    """The columns of a bar; with ``total`` (the number of steps is known, now or later) done/total and the time
    left (a :class:`rich.progress.TimeRemainingColumn`), else a pulsing bar and the elapsed time only."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    if not total:
        return [TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn()]
    return [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), _eta_column()]


def progress_bar(*, total: bool = True, auto_refresh: bool = False, console: Any = None):
    """A transient rich ``Progress`` on stderr with :func:`columns`. ``auto_refresh=False`` (the default): no
    refresh thread competing with timed code; the caller redraws between steps (``refresh()``)."""
    from rich.console import Console
    from rich.progress import Progress

    console = console if console is not None else Console(stderr=True)
    return Progress(*columns(total), console=console, transient=True, auto_refresh=auto_refresh,
                    speed_estimate_period=ETA_PERIOD, disable=not (console.is_terminal or console.is_jupyter))
