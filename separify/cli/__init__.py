"""``separify`` command line: parses options and calls the library; nothing else lives here.

Every error a user can cause is printed as one ``error:`` line on stderr with exit code 1 (2 for usage errors
reported by the parser). The input file is only ever read.

Modules: :mod:`._options` (help panels, defaults, option declarations), :mod:`._common` (error handling, loading,
data and report settings), :mod:`._convert` (``separify convert``), :mod:`._report` (``report``, ``compare``).
"""

from __future__ import annotations

from separify.cli import _convert, _report  # noqa: F401  (register the commands)
from separify.cli._app import app
from separify.cli._options import DEFAULT_OUTPUT

__all__ = ["app", "run", "DEFAULT_OUTPUT"]


def run() -> None:  # console-script entry point
    app(prog_name="separify")
