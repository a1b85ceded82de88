"""The report's progress bar (:func:`separify.core.progress.progress_bar`: rich, on stderr, elapsed time and time
left), redrawn only between measurements (never while timing)."""

from __future__ import annotations

from contextlib import ExitStack

from separify.core.progress import progress_bar as shared_bar

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
        """``n`` steps from now (the layers timed one by one): the clock and the time left restart with them, so
        the ETA is not skewed by the whole-model steps before."""
        if self._p is not None:
            self._p.reset(self._task, total=n, completed=0)
            self._p.refresh()


def progress_bar(stack: ExitStack, on: bool) -> Bar:
    """A :class:`Bar` shown while ``stack`` is open when ``on``, else one that draws nothing."""
    if not on:
        return Bar(None)
    # the total is set once the measurements are counted (Bar.total): an ETA from then on; no refresh thread
    # competing with the timed code, redrawn per step
    progress = shared_bar(total=True, auto_refresh=False)
    stack.enter_context(progress)
    return Bar(progress)
