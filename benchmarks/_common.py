"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType


def write_result(path: Path, lines: list[str]) -> None:
    """Print the table and write it to ``path`` atomically (temporary file, then rename)."""
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_base(checkout: Path, relpath: str) -> ModuleType:
    """The module at ``relpath`` (e.g. ``separify/calibration/output.py``) of another ``checkout``, imported under
    the name ``base_<its stem>`` beside this checkout's (its own imports resolve to this checkout's package)."""
    path = checkout / relpath
    spec = importlib.util.spec_from_file_location(f"base_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
