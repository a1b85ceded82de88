"""Allocator setting for the calibration passes: let glibc reuse freed large blocks instead of unmapping them.

glibc hands every block above its mmap threshold (at most 32 MiB by default) back to the kernel when it is freed,
so each large activation of a forward pass is a fresh mapping whose pages fault in zeroed. Raising the thresholds
for the duration of a pass keeps those blocks in the heap for the next activation of the same size.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
import threading
from typing import Any, Iterator

__all__ = ["reuse_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc's malloc.h)


def _glibc() -> Any:
    """The process's glibc with ``mallopt`` and ``malloc_trim`` typed, or ``None`` off glibc."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:  # pragma: no cover - a static interpreter
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


_ALLOCATOR_LOCK = threading.Lock()
_allocator_depth = 0  # calibrations running now (nested or in other threads): the first sets, the last restores


def _allocator_tuned_by_user() -> bool:
    env = os.environ
    return (any(k in env for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
            or "glibc.malloc." in env.get("GLIBC_TUNABLES", "")
            or env.get("SEPARIFY_MALLOPT", "").strip().lower() in ("0", "false", "no", "off"))


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Let glibc reuse freed large blocks for the duration (see the module docstring).

    Raises glibc's mmap and trim thresholds to 1 GiB. On exit (of the outermost use, when several run at once) it
    sets them to 32 MiB and 64 MiB, the largest values glibc's own dynamic threshold moves to, and trims the heap so
    the memory goes back to the system. This is a process-wide setting, and it stays fixed afterwards: glibc's
    dynamic adjustment, which starts at 128 KiB, is off for the rest of the process once any threshold is set. It is
    a no-op off glibc, when the user tuned the allocator (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or a
    ``glibc.malloc`` tunable in ``GLIBC_TUNABLES``: their tuning wins), and with ``SEPARIFY_MALLOPT=0``.
    """
    global _allocator_depth
    libc = None if _allocator_tuned_by_user() else _glibc()
    if libc is None:
        yield
        return
    with _ALLOCATOR_LOCK:
        _allocator_depth += 1
        if _allocator_depth == 1:
            libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
            libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield
    finally:
        with _ALLOCATOR_LOCK:
            _allocator_depth -= 1
            if _allocator_depth == 0:
                libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
                libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
                libc.malloc_trim(0)
