"""The ``separify`` typer application; the commands register themselves on it (:mod:`._convert`, :mod:`._report`)."""

from __future__ import annotations

import typer

from separify import __version__
from separify.cli._options import Group

app = typer.Typer(cls=Group, add_completion=False, no_args_is_help=True, help="Make trained CNNs cheaper: replace "
                  "dense convolutions with depthwise-separable approximations.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"separify {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """separify: depthwise-separable conversion of trained convolutional networks."""
