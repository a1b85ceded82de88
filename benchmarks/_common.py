"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
from pathlib import Path


def write_result(path: Path, lines: list[str]) -> None:
    """Print the table and write it to ``path`` atomically (temporary file, then rename)."""
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
