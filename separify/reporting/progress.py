"""The report's progress bar: rich, on stderr, redrawn only between measurements (never while timing)."""

from __future__ import annotations

from contextlib import ExitStack

from rich.console import Console

__all__ = ["Bar", "progress_bar"]


class Bar:
    """A rich progress bar on stderr, redrawn at each step, or nothing (``progress`` is ``None``)."""

    def __init__(self, progress):
        self._p = progress
        self._task = progress.add_task("report", total=None) if progress is not None else None

    def step(self, what: str) -> None:
        if self._p is not None:
            self._p.update(self._task, description=what, advance=1)
            self._p.refresh()

    def total(self, n: int) -> None:
        if self._p is not None:
            self._p.update(self._task, total=n, completed=0)
            self._p.refresh()


def progress_bar(stack: ExitStack, on: bool) -> Bar:
    """A :class:`Bar` shown while ``stack`` is open when ``on``, else one that draws nothing."""
    if not on:
        return Bar(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=Console(stderr=True), transient=True,
                        auto_refresh=False)  # no refresh thread competing with the timed code; redrawn per step
    stack.enter_context(progress)
    return Bar(progress)
