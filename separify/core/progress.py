"""The progress bars of every long step (loading, tracing, candidate timing, decomposition, calibration, fine-tuning,
the report), and the overall bar of a step repeated several times (the tries of a ``max_drop`` search).

One look for all: rich, on stderr, transient, the step's description, a bar, done/total, the elapsed time and, where
the total is known, the time left (``ETA``); a step whose length is not known beforehand (loading a model, reading
data) shows its elapsed time only. Drawn only on a terminal (or in Jupyter): redirected to a file, a transient bar leaves
nothing but a blank line. Lives in ``core`` so that the pipeline, the search, the calibration, the fine-tuning and
the report can all use it without importing each other.

rich draws one live display per terminal (before rich 14.1, a second one on the same console raises; on another
console the two overwrite each other's lines). So while an :func:`overall_bar` is open, every :func:`progress_bar`
and :func:`step` opened without a console of its own is not a display of its own but tasks of the overall bar's
display, drawn below its line and removed when the bar closes.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator

__all__ = ["ETA_PERIOD", "columns", "overall_bar", "progress_bar", "step"]

ETA_PERIOD = 3600.0  # seconds of progress the time left is estimated from (rich's default, 30 s, loses slow steps)
REFRESH_PER_SECOND = 10  # rich's default, for the displays redrawn by a thread

#: the display of the open :func:`overall_bar` (``None``: none open in this thread)
_SHARED: ContextVar[Any] = ContextVar("separify_progress_display", default=None)


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


def _count_column():
    from rich.progress import MofNCompleteColumn
    from rich.text import Text

    class CountColumn(MofNCompleteColumn):
        """done/total; blank while the total is not known (rich's own shows ``0/?``)."""

        def render(self, task) -> Text:
            return Text("") if task.total is None else super().render(task)

    return CountColumn()


def columns(total: bool = True) -> list[Any]:
    """The columns of a bar; with ``total`` (the number of steps is known, now or later) done/total and the time
    left (a :class:`rich.progress.TimeRemainingColumn`), both blank for a task whose total is not known yet (it
    shows as without ``total``), else a pulsing bar and the elapsed time only."""
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn

    if not total:
        return [TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn()]
    return [TextColumn("{task.description}"), BarColumn(), _count_column(), TimeElapsedColumn(), _eta_column()]


def _step_columns() -> list[Any]:
    from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

    return [SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()]


def _new(cols: list[Any], auto_refresh: bool, console: Any):
    from rich.console import Console
    from rich.progress import Progress

    console = console if console is not None else Console(stderr=True)
    return Progress(*cols, console=console, transient=True, auto_refresh=auto_refresh,
                    refresh_per_second=REFRESH_PER_SECOND, speed_estimate_period=ETA_PERIOD,
                    disable=not (console.is_terminal or console.is_jupyter))


def progress_bar(*, total: bool = True, auto_refresh: bool = False, console: Any = None):
    """A transient rich ``Progress`` on stderr with :func:`columns`. ``auto_refresh=False`` (the default): no
    refresh thread competing with timed code; the caller redraws between steps (``refresh()``).

    Inside an :func:`overall_bar` (and with no ``console``): a :class:`_Member` of its display instead, with the
    same methods (``add_task``, ``update``, ``advance``, ``reset``, ``refresh``, ``start``/``stop``, a context
    manager), whose tasks are removed when it stops."""
    shared = _SHARED.get()
    if shared is not None and console is None:
        return _Member(shared, auto_refresh)
    return _new(columns(total), auto_refresh, console)


class _Member:
    """A bar drawn as tasks of a shared display (:func:`overall_bar`'s): it draws nothing of its own, adds its
    tasks to the display and removes them when it stops. ``auto_refresh``: while started, a thread redraws the
    display (the display itself has none, so that nothing competes with timed code)."""

    def __init__(self, display: Any, auto_refresh: bool) -> None:
        self._display, self._auto, self._ids = display, auto_refresh, []
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def add_task(self, description: str, *args: Any, **kwargs: Any):
        task = self._display.add_task(description, *args, **kwargs)
        self._ids.append(task)
        return task

    def update(self, task, **kwargs: Any) -> None:
        self._display.update(task, **kwargs)

    def advance(self, task, advance: float = 1) -> None:
        self._display.advance(task, advance)

    def reset(self, task, **kwargs: Any) -> None:
        self._display.reset(task, **kwargs)

    def refresh(self) -> None:
        self._display.refresh()

    def start(self) -> None:
        if self._auto and self._stop is None and not self._display.disable:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=_redraw, args=(self._display, self._stop), daemon=True,
                                            name="separify-progress")
            self._thread.start()

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join()
            self._stop = self._thread = None
        for task in self._ids:
            self._display.remove_task(task)
        self._ids.clear()
        self._display.refresh()

    def __enter__(self) -> "_Member":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _redraw(display: Any, stop: threading.Event) -> None:
    """Redraw ``display`` ``REFRESH_PER_SECOND`` times a second until ``stop`` is set."""
    while not stop.wait(1 / REFRESH_PER_SECOND):
        display.refresh()


@contextmanager
def step(what: str, *, console: Any = None) -> Iterator[None]:
    """A step whose length is not known beforehand (loading a model, reading data): a spinner, its description
    and the elapsed time, redrawn by a thread (for code that times nothing); no time left, there is nothing to
    estimate it from. On ``console`` (default: stderr), so that what the step prints on that console goes above
    the line, not through the redirection of another console's display; drawn only on a terminal, gone when the
    step ends. Inside an :func:`overall_bar` (no ``console``): a task of its display (pulsing bar, elapsed time)."""
    shared = _SHARED.get() is not None and console is None
    bar = progress_bar(auto_refresh=True) if shared else _new(_step_columns(), True, console)
    with bar:
        bar.add_task(what, total=None)
        bar.refresh()
        yield


class Overall:
    """The task of an :func:`overall_bar`: ``show(description)`` before a repetition, ``done()`` after it."""

    def __init__(self, display: Any = None, task: Any = None) -> None:
        self._display, self._task = display, task

    def show(self, description: str) -> None:
        if self._display is not None:
            self._display.update(self._task, description=description)
            self._display.refresh()

    def done(self) -> None:
        if self._display is not None:
            self._display.advance(self._task)
            self._display.refresh()


@contextmanager
def overall_bar(what: str, total: int, *, on: bool = True, console: Any = None) -> Iterator[Overall]:
    """A bar over ``total`` repetitions of a long step (the tries of a search, which may stop early: ``total`` is
    the most there can be), on stderr, with done/total, the elapsed time and the time left (rich's estimate from
    the second repetition on: the mean time of the repetitions after the first, which usually measures what the
    others reuse). It stays drawn above the bars of each repetition: while it is open, :func:`progress_bar` and
    :func:`step` (without a console) add their tasks to its display (module docstring). No thread redraws it; it
    is redrawn whenever one of its bars is. ``on=False``: nothing is drawn and the other bars are left alone.
    ``console``: where it is drawn (default: stderr)."""
    if not on:
        yield Overall()
        return
    shared = _SHARED.get()
    display = _Member(shared, False) if shared is not None else _new(columns(total=True), False, console)
    with display:
        task = display.add_task(what, total=total)
        display.refresh()
        token = _SHARED.set(shared if shared is not None else display)
        try:
            yield Overall(display, task)
        finally:
            _SHARED.reset(token)
