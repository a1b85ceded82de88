"""The report's verdict: what the conversion gave, in a few words, and the one option most likely to help.

Built from a :class:`~separify.reporting.data.Report`'s own measurements only (read through its attributes; the
report's module imports this one for its JSON): the FLOPs ratio; the speed ratio on the target (the backend the
conversion's latency selection ran on, else the first one the report timed), named; the change of the first
quality figure the original also has (accuracy), else the converted model's agreement with the original; and the
converted file (of a conversion). Where a conversion measured slower than the original, or lost more than
:data:`MAX_LOSS` of an accuracy, :attr:`Verdict.hint` names the option most likely to help.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_LOSS", "Verdict", "verdict"]

#: an accuracy lost beyond this (a fraction: one point) earns a hint
MAX_LOSS = 0.01


@dataclass(frozen=True)
class Verdict:
    """``flops_ratio``; ``speed``: ``(backend, time ratio)`` on the target or ``None`` (not timed); ``quality``: the
    figure it names or ``None``; ``output``: the converted file; ``hint``: the next step, or ``None``."""

    flops_ratio: float
    speed: tuple[str, float] | None
    quality: Any  # the report's Quality, or None
    output: str | None
    hint: str | None

    def text(self) -> str:
        """One sentence: ``"0.39× the FLOPs, 0.69× the time on torch-cpu (1.46× faster), top-1 accuracy 0.928 →
        0.918 (−1.0 point); written to out.pt2."``"""
        parts = [f"{self.flops_ratio:.2f}× the FLOPs"]
        if self.speed is not None:
            backend, ratio = self.speed
            how = f"{1 / ratio:.2f}× faster" if ratio < 1 else ("no faster" if ratio == 1 else
                                                                 f"{ratio:.2f}× slower")
            parts.append(f"{ratio:.2f}× the time on {backend} ({how})")
        else:
            parts.append("speed not measured")
        q = self.quality
        if q is not None and q.original is not None:
            parts.append(f"{q.metric} {q.original:.3f} → {q.converted:.3f} ({_change(q)})")
        elif q is not None:
            parts.append(f"{q.metric} {q.converted:.3f}")
        out = f"; written to {self.output}" if self.output else ""
        return ", ".join(parts) + out + "."

    def to_dict(self) -> dict[str, Any]:
        q = self.quality
        return {"text": self.text(), "hint": self.hint, "flops_ratio": self.flops_ratio,
                "speed": None if self.speed is None else {"backend": self.speed[0], "time_ratio": self.speed[1]},
                "quality": None if q is None else {"metric": q.metric, "original": q.original,
                                                   "converted": q.converted},
                "output": self.output}


def _change(q: Any) -> str:
    """``"−1.0 point"`` for a fraction (an accuracy), else the signed difference."""
    diff = q.converted - q.original
    if q.unit == "fraction":
        size = f"{100 * abs(diff):.1f}"
        unit = " point" if size == "1.0" else " points"
    else:
        size, unit = f"{abs(diff):.3g}", ""
    sign = "−" if diff < 0 and float(size) != 0 else "+"
    return f"{sign}{size}{unit}"


def _speed(rep: Any) -> tuple[str, float] | None:
    """``(backend, ratio)`` on the latency selection's target where the report timed it, else the first timed."""
    timed = [lat for lat in rep.latency if lat.ratio is not None]
    sel = (rep.conversion or {}).get("latency_selection") or {}
    target = str(sel.get("target") or "")
    on_target = [lat for lat in timed if target.startswith(lat.backend)]
    best = (on_target or timed or [None])[0]
    return None if best is None else (best.backend, best.ratio)


def _quality(rep: Any) -> Any:
    """The first figure the original has too (an accuracy), else the first (agreement with the original)."""
    return next((q for q in rep.quality if q.original is not None), rep.quality[0] if rep.quality else None)


def _hint(rep: Any, speed: tuple[str, float] | None, q: Any) -> str | None:
    """The next step of a conversion (``rep.conversion`` set; a report of two files gets none) that is not faster
    or lost more than a point, naming only options not already in effect."""
    conv = rep.conversion
    if conv is None:
        return None
    if speed is not None and speed[1] >= 1:
        if conv.get("objective") == "flops":
            return (f"it is not faster on {speed[0]}: convert with --objective latency (the default), which keeps "
                    "a layer dense unless its replacement measures faster on the target")
        return (f"it measured no faster on {speed[0]} here: time it where it will run (--target) and on an idle "
                "machine (--min-time)")
    lost = (q is not None and q.original is not None and q.unit == "fraction"
            and q.original - q.converted > MAX_LOSS + 1e-9)  # a point shown as 1.0 is not more than a point
    if not lost:
        return None
    if not conv.get("calibrated"):
        return ("it lost more than a point: give calibration data (--calib DIR|FILE; calibration= in Python), which "
                "fits each layer to its real outputs")
    return ("it lost more than a point after calibration: fine-tune it (--finetune DATA; separify.finetune in "
            "Python), for more epochs if it already was")


def verdict(rep: Any) -> Verdict:
    """The :class:`Verdict` of the report ``rep``."""
    speed, q = _speed(rep), _quality(rep)
    out = rep.converted.file if rep.conversion is not None else None  # a report of two files wrote neither
    return Verdict(rep.flops_ratio, speed, q, out, _hint(rep, speed, q))
