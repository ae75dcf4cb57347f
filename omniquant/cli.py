"""The ``omniquant`` command line.

Policy: the CLI only parses arguments, calls one stage function and prints its
result. Anything the CLI can do, a Python call can do. User errors
(``OmniquantError``) are printed without a traceback and exit non-zero; other
exceptions are bugs and keep their traceback. Stage modules are imported inside
the commands so that ``omniquant --help`` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from omniquant.errors import OmniquantError

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


#: The stream that was sys.stdout when ``main`` started; library prints are routed to a
#: log meanwhile (``omniquant.noise``), omniquant's own output goes here.
_STDOUT = None


def _stdout():
    """Where omniquant's own output goes (see ``omniquant.noise``)."""
    return _STDOUT or sys.stdout


def _echo(text: str, nl: bool = True) -> None:
    typer.echo(text, nl=nl, file=_stdout())


def _console():
    """stdout console: no markup parsing and no hard wrapping, so paths and messages with
    ``[...]`` print as they are, one line each (copy-pastable)."""
    from rich.console import Console

    return Console(
        file=_stdout(), stderr=False, highlight=False, markup=False, soft_wrap=True
    )


@app.command("make-tiny")
def make_tiny_cmd(
    out: Annotated[Path, typer.Option(help="Output directory for the checkpoint.")],
    seed: Annotated[
        int, typer.Option(help="RNG seed; same seed, same bytes.", min=0, max=2**63 - 1)
    ] = 0,
    size: Annotated[
        str, typer.Option(help="Preset: tiny (~1 MB) or bench (~300M params).")
    ] = "tiny",
    force: Annotated[bool, typer.Option(help="Overwrite an existing output directory.")] = False,
) -> None:
    """Write a tiny random nemotron_h_omni checkpoint in the hub layout."""
    from omniquant.tiny import make_tiny

    path = make_tiny(out, seed=seed, size=size, force=force)
    _console().print(f"wrote tiny nemotron_h_omni checkpoint to {path}")


# Further commands are registered by the modules below; each keeps its own
# stage imports inside the command body.
from omniquant import _cli_commands  # noqa: F401  (registers commands on `app`)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning ``OmniquantError`` into a clean message."""
    global _STDOUT
    import contextlib

    from omniquant.noise import third_party_to_log

    args = sys.argv[1:] if argv is None else list(argv)
    options = args[: args.index("--") if "--" in args else len(args)]
    # Help is printed by click to sys.stdout: never routed to the log.
    verbose = not args or "--verbose" in options or "--help" in options
    _STDOUT = sys.stdout
    try:
        # Non-standalone click returns a command's exit code (typer.Exit(code), and 130 for
        # an interrupt it caught itself) instead of raising it.
        with contextlib.nullcontext() if verbose else third_party_to_log():
            rc = app(args=args, standalone_mode=False)
        if isinstance(rc, int) and rc != 0:
            if rc == 130:
                print("interrupted", file=sys.stderr)
            return rc
    except OmniquantError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # Usage errors (typer vendors click) arrive here in non-standalone mode.
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            return exc.exit_code
        if type(exc).__name__ == "Abort":
            print("aborted", file=sys.stderr)
            return 130
        raise
    finally:
        _STDOUT = None
    return 0


if __name__ == "__main__":  # pragma: no cover
    # Run through the imported module: commands register on omniquant.cli.app, which
    # is not this __main__ module's app.
    from omniquant.cli import main as _main

    sys.exit(_main())
