"""The typer application every ``omniquant`` command registers on, and the console it prints to.

Its own module so that ``cli`` (entry point, ``main``) and ``commands`` (the commands)
both import it without importing each other.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

app = typer.Typer(
    name="omniquant",
    help="Quantize omni-modal models to FP8/NVFP4, export serving checkpoints, "
    "build engine bundles and report the quality cliff.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            help="Show third-party warnings and prints (modelopt, transformers); without it "
            "they go to $OMNIQUANT_LOG or <tmp>/omniquant-<pid>.log.",
        ),
    ] = False,
) -> None:
    """Quantize omni-modal models to FP8/NVFP4 and report what was lost."""


#: The stream that was sys.stdout when ``omniquant.cli.main`` started; library prints are
#: routed to a log meanwhile (``omniquant.cli.noise``), omniquant's own output goes here.
_STDOUT = None


def _stdout():
    """Where omniquant's own output goes (see ``omniquant.cli.noise``)."""
    return _STDOUT or sys.stdout


def _echo(text: str, nl: bool = True) -> None:
    """Print ``text`` to the user's stdout (not to the third-party log)."""
    typer.echo(text, nl=nl, file=_stdout())


def _console():
    """stdout console: no markup parsing and no hard wrapping, so paths and messages with
    ``[...]`` print as they are, one line each (copy-pastable)."""
    from rich.console import Console

    return Console(file=_stdout(), stderr=False, highlight=False, markup=False, soft_wrap=True)
