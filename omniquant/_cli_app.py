"""The typer application every ``omniquant`` command registers on, and the console it prints to.

Its own module so that ``cli`` (entry point, ``main``) and ``_cli_commands`` (the commands)
both import it without importing each other.
"""

from __future__ import annotations

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
def _root() -> None:
    """Quantize omni-modal models to FP8/NVFP4 and report what was lost."""


def _console():
    """stdout console: no markup parsing and no hard wrapping, so paths and messages with
    ``[...]`` print as they are, one line each (copy-pastable)."""
    from rich.console import Console

    return Console(stderr=False, highlight=False, markup=False, soft_wrap=True)
