"""User-facing errors. The CLI prints any :class:`SeparifyError` as one line and exits non-zero."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if the message is empty), for one-line reports."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class SeparifyError(Exception):
    """An error the user can fix (bad file, bad option, unsupported layer); its message says how."""


class ConfigError(SeparifyError, ValueError):
    """An invalid option: impossible rank, energy or FLOPs target out of range, malformed pattern."""


class UnsupportedLayerError(SeparifyError, NotImplementedError):
    """A layer the replacement cannot represent exactly (grouped conv, 1×1, non-2-D, custom subclass...)."""


class BadWeightsError(SeparifyError, ValueError):
    """Weights that cannot be decomposed (NaN or inf)."""


class ModelLoadError(SeparifyError):
    """A model file that is missing, unreadable, of an unknown format, or does not match its architecture."""
