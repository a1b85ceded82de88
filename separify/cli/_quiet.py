"""Quiet command-line runs: third-party warnings and log lines off the terminal unless ``-v/--verbose``.

torch, its exporters and ONNX Script print warnings and log lines that concern their own developers (``No complete
tensor found in the group!``, ``No CUDA runtime is found``, ``torchvision is not installed. Skipping ...``); on a
user's terminal they read as breakage. :class:`Quiet`, entered by the CLI's callback before a command imports the
heavy modules, ignores every Python warning attributed to a module outside separify, and C++ warnings from torch
(``Triggered internally at``), and raises the third-party loggers to ERROR. separify's own warnings still show.
Only the CLI enters it: ``import separify`` changes no filter and no logger.
"""

from __future__ import annotations

import logging
import warnings
from types import TracebackType

__all__ = ["LOGGERS", "THIRD_PARTY", "Quiet"]

# a module regex (matched at the start of the module name) that every module outside separify matches
THIRD_PARTY = r"(?!separify(\.|$))"
# torch's C++ warnings (TORCH_WARN) are attributed to the Python frame that called the op, possibly separify's
TORCH_CPP = r"[\s\S]*Triggered internally at"
LOGGERS = ("torch", "torch.utils.cpp_extension", "torch.onnx", "torch._dynamo", "torch._inductor", "torch.export",
           "torch.fx", "torch._subclasses", "torch.distributed", "torch.utils", "onnxscript", "onnx_ir", "onnx",
           "onnxruntime", "onnx2torch", "tensorly", "tltorch", "torchvision", "PIL", "matplotlib", "fsspec",
           "filelock", "urllib3")


class Quiet:
    """While entered and not ``verbose``: third-party warnings ignored, third-party loggers at ERROR; on exit (or
    :meth:`lift`) its two warning filters come off (filters others added meanwhile stay) and the loggers' levels
    are as they were."""

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose
        self._filters: list[tuple] = []
        self._levels: dict[str, int] = {}

    def __enter__(self) -> "Quiet":
        if self.verbose:
            return self
        warnings.filterwarnings("ignore", module=THIRD_PARTY)
        warnings.filterwarnings("ignore", message=TORCH_CPP)
        self._filters = list(warnings.filters[:2])  # exactly these two come off again (filters added meanwhile stay)
        for name in LOGGERS:
            log = logging.getLogger(name)
            self._levels[name] = log.level
            if log.getEffectiveLevel() < logging.ERROR:
                log.setLevel(logging.ERROR)
        return self

    def lift(self) -> None:
        """Show everything again (``-v`` given after the command's name)."""
        self.verbose = True
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        self._levels.clear()
        for f in self._filters:
            if f in warnings.filters:
                warnings.filters.remove(f)
        self._filters = []
        getattr(warnings, "_filters_mutated", lambda: None)()  # reset the caches of which warnings were shown

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.lift()
