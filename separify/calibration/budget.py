"""The time budget of a calibrated conversion (``Calibration.seconds``): how long the reconstructions' steps may run.

Everything a calibrated conversion does runs once and has a fixed cost (the passes over the data, the plan, the
decomposition, the fits in closed form) except the two reconstructions (:mod:`~separify.calibration.reconstruct`,
:mod:`~separify.calibration.output`), whose Adam steps can stop at any step, each leaving a model no worse than
before it (both undo steps that did not lower a held-out error). The budget bounds the conversion's wall-clock time
by bounding those steps. It counts from the start of the conversion (less the time spent timing layers on a latency
target). When the layer pass starts, the time left less the fixed work still to come (the layer pass's forward and
the output reconstruction's checks, :data:`FIXED_PASSES` times the observation pass) is the steps' time; the
layer-wise reconstruction's steps may take :data:`LAYER_SHARE` of it, each layer an equal part of what its stage
has left (:class:`StepTime`: only the steps' own time counts), and the output reconstruction's steps run until the
end of the budget less the time of its closing check and :data:`TAIL`. A step count is an upper bound: where the
budget ends first, fewer steps run, and the result says how many. ``None``: no budget, every step runs.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

__all__ = ["Budget", "FIXED_PASSES", "LAYER_SHARE", "STOPPED", "StepTime", "TAIL", "cut_note"]

#: the part of the steps' time that the layer-wise reconstruction may take: on the OCR benchmark network its first
#: ~50 steps per layer win most of what its 200 do, and past them the output reconstruction wins more per second
#: (45% measured no different on single runs: benchmarks/RESULTS.md, eighth session)
LAYER_SHARE = 0.3

#: seconds kept at the end for the work after the output reconstruction (the layouts, the result's counts)
TAIL = 1.0

#: the fixed work after the plan, in observation passes: the layer pass's forward over the calibration data (about
#: one), the output reconstruction's held-out checks (three forwards of an eighth of the data in full precision)
FIXED_PASSES = 1.5

#: how a note says that the budget stopped a reconstruction's steps
STOPPED = "stopped by the time budget"


@dataclass
class StepTime:
    """``seconds`` of steps left to a stage, shared out over its layers (``None``: no bound)."""

    seconds: float | None = None

    def until(self, parts: int) -> float | None:
        """The deadline of the next of ``parts`` layers: an equal part of the seconds left, from now."""
        return None if self.seconds is None else time.perf_counter() + max(0.0, self.seconds) / max(1, parts)

    def spend(self, seconds: float) -> None:
        if self.seconds is not None:
            self.seconds -= seconds

    @contextmanager
    def part(self, parts: int) -> Iterator[float | None]:
        """The deadline of the next of ``parts`` layers (:meth:`until`); the time the block takes is spent."""
        start = time.perf_counter()
        try:
            yield self.until(parts)
        finally:
            self.spend(time.perf_counter() - start)


@dataclass(frozen=True)
class Budget:
    """A deadline ``end`` on the :func:`time.perf_counter` clock; ``None``: none."""

    end: float | None = None

    @classmethod
    def starting_now(cls, seconds: float | None) -> Budget:
        """A budget of ``seconds`` from now (``None``: no budget)."""
        return cls(None if seconds is None else time.perf_counter() + seconds)

    def extended(self, seconds: float) -> Budget:
        """The same budget with ``seconds`` more (time the budget does not count)."""
        return self if self.end is None else Budget(self.end + seconds)

    def left(self) -> float:
        """Seconds until the end (``inf`` without a budget; negative past it)."""
        return math.inf if self.end is None else self.end - time.perf_counter()

    def output_until(self) -> float | None:
        """The deadline of the output reconstruction, checks included: :data:`TAIL` before the end."""
        return None if self.end is None else self.end - TAIL

    def layer_steps(self, observed: float) -> StepTime:
        """The layer-wise reconstruction's steps' time, at the start of the layer pass: :data:`LAYER_SHARE` of the
        time left less the fixed work still to come, estimated from the observation pass's ``observed`` seconds."""
        if self.end is None:
            return StepTime()
        return StepTime(LAYER_SHARE * max(0.0, self.left() - FIXED_PASSES * observed))


def cut_note(what: str, taken: int, planned: int) -> str | None:
    """The note of a reconstruction the budget stopped after ``taken`` of its ``planned`` steps (``None``: not
    stopped)."""
    if taken >= planned:
        return None
    return f"{what}: {taken} of {planned} steps, {STOPPED} (calib_seconds)"
