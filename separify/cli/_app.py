"""The ``separify`` typer application; the commands register themselves on it (:mod:`._convert`, :mod:`._report`)."""

from __future__ import annotations

import copy

import typer

from separify import __version__
from separify.cli._options import REPORT, Group
from separify.cli._quiet import Quiet

_QUIET = "separify.quiet"  # the root context's meta key of the run's Quiet
VERBOSE_HELP = "Show third-party warnings and log lines (torch, ONNX), hidden by default."


def _lift(ctx, _param, verbose: bool) -> None:
    """``-v`` given after the command's name: the quiet the group's callback entered is lifted."""
    quiet = ctx.find_root().meta.get(_QUIET)
    if verbose and quiet is not None:
        quiet.lift()


class _Group(Group):
    """The group, whose commands also accept the global ``-v/--verbose`` after their name."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        verbose = next((p for p in self.params if p.name == "verbose"), None)
        if verbose is None:
            return
        for command in self.commands.values():
            if not any(p.name == "verbose" for p in command.params):
                option = copy.copy(verbose)
                option.expose_value, option.callback = False, _lift
                option.rich_help_panel = REPORT
                command.params.append(option)


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True, help="Make trained CNNs cheaper: replace "
                  "dense convolutions with depthwise-separable approximations.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"separify {__version__}")
        raise typer.Exit()


@app.callback()
def main(ctx: typer.Context,
         version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit."),
         verbose: bool = typer.Option(False, "--verbose", "-v", help=VERBOSE_HELP)) -> None:
    """separify: depthwise-separable conversion of trained convolutional networks."""
    # before the command body imports torch's exporters: their import-time log lines are quiet too
    ctx.meta[_QUIET] = ctx.with_resource(Quiet(verbose))
