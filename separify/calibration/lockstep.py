"""Several forward passes run side by side, meeting at named points: one forward pass per sample shape.

Calibration fits each replacement, in the middle of a forward pass, to statistics over *all* calibration samples,
and the forward then continues with the new weights. Samples of different shapes cannot share one batch, so
:func:`run_lockstep` runs one forward pass per shape group, each in its own thread; at a fit the passes meet
(:meth:`Lockstep.gather`): every pass still running deposits its part, the last to arrive runs the fit once on all
parts (the others wait, so no model code runs meanwhile), and all continue. A pass that ends without reaching a
meeting point no longer counts for it; a pass may end early by raising :class:`Finished`. With one group the pass
runs in the calling thread and every meeting is immediate. Grad mode is thread-local: each pass runs under ``torch.no_grad()``.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import torch

__all__ = ["Finished", "Lockstep", "run_lockstep"]


class Finished(Exception):
    """Raised inside a pass that has nothing left to do: it ends there, not as a failure."""


class _Aborted(Exception):
    """Another pass failed: this one stops."""


class Lockstep:
    """Meeting points of ``parties`` passes (module docstring); :attr:`group` is the calling pass's index."""

    def __init__(self, parties: int) -> None:
        self.cond = threading.Condition()
        self.active = parties
        self.parts: dict[Any, dict[int, Any]] = {}
        self.combine: dict[Any, Callable[[dict[int, Any]], Any]] = {}
        self.results: dict[Any, Any] = {}
        self.error: BaseException | None = None
        self.local = threading.local()

    @property
    def group(self) -> int:
        return getattr(self.local, "group", 0)

    def gather(self, key: Any, value: Any, combine: Callable[[dict[int, Any]], Any]) -> Any:
        """Deposit this pass's ``value`` for ``key``; once every running pass has, ``combine({group: value})`` runs
        once and its result is returned to every pass."""
        with self.cond:
            self.parts.setdefault(key, {})[self.group] = value
            self.combine.setdefault(key, combine)
            self._ready(key)
            while key not in self.results and self.error is None:
                self.cond.wait()
            if key not in self.results:
                raise _Aborted
            return self.results[key]

    def _ready(self, key: Any) -> None:  # with the lock held
        if key in self.parts and len(self.parts[key]) >= self.active:
            parts = self.parts.pop(key)
            try:
                self.results[key] = self.combine.pop(key)(dict(sorted(parts.items())))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller of run_lockstep
                self.error = self.error or exc
            self.cond.notify_all()

    def leave(self, error: BaseException | None = None) -> None:
        """This pass ended (``error``: it failed, and every other pass stops)."""
        with self.cond:
            self.active -= 1
            if error is not None and not isinstance(error, _Aborted):
                self.error = self.error or error
            for key in list(self.parts):
                self._ready(key)
            self.cond.notify_all()


def run_lockstep(step: Lockstep, fn: Callable[[torch.Tensor], Any], groups: Sequence[torch.Tensor]) -> None:
    """``fn(group)`` for every group, side by side (module docstring); re-raises the first failure."""

    def one(i: int, x: torch.Tensor) -> None:
        step.local.group = i
        error = None
        try:
            with torch.no_grad():
                fn(x)
        except Finished:
            pass
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            error = exc
        finally:
            step.leave(error)

    if len(groups) == 1:
        one(0, groups[0])
    else:
        threads = [threading.Thread(target=one, args=(i, x), daemon=True) for i, x in enumerate(groups)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if step.error is not None:
        raise step.error
