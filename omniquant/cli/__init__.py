"""The ``omniquant`` command line.

Policy: the CLI only parses arguments, calls one stage function and prints its
result. Anything the CLI can do, a Python call can do. User errors
(``OmniquantError``) are printed without a traceback and exit non-zero; other
exceptions are bugs and keep their traceback. Stage modules are imported inside
the commands so that ``omniquant --help`` stays fast.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from omniquant.cli import _app as _cli_app
from omniquant.cli._app import _console, app
from omniquant.errors import OmniquantError, argument_style, cli_style


@app.command("make-tiny")
def make_tiny_cmd(
    out: Annotated[str, typer.Option(help="Output directory for the checkpoint.")],
    seed: Annotated[
        int, typer.Option(help="RNG seed; same seed, same bytes.", min=0, max=2**63 - 1)
    ] = 0,
    size: Annotated[
        str,
        typer.Option(
            help="Preset: tiny (~1 MB), bench (~300M params) or slice (released widths, few "
            "layers: ~3.6 B params, ~7 GB in 2 GB shards)."
        ),
    ] = "tiny",
    force: Annotated[bool, typer.Option(help="Overwrite an existing output directory.")] = False,
    naming: Annotated[
        str,
        typer.Option(
            help="config.json naming: native (what transformers' save_pretrained writes, as a "
            "fine-tune has it) or released (NVIDIA's hub checkpoints' naming)."
        ),
    ] = "native",
) -> None:
    """Write a tiny random nemotron_h_omni checkpoint in the hub layout."""
    from omniquant.demo.tiny import make_tiny

    path = make_tiny(out, seed=seed, size=size, force=force, naming=naming)
    _console().print(f"wrote tiny nemotron_h_omni checkpoint to {path}")


# Further commands are registered on `app` by these modules (they import `app` from
# omniquant.cli._app, never from here: no import loop); each keeps its stage imports
# inside the command body.
from omniquant.cli import (  # noqa: F401
    commands,
    fit,
    plan,
)

#: Library argument -> flag, where the flag is not ``--`` + the name with dashes.
CLI_NAMES = cli_style(
    overrides="--set", candidates="--candidate", reader="--as", recipe_name="recipes show"
)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning ``OmniquantError`` into a clean message.

    Library errors name Python arguments; while a command runs (and its error is
    printed) they read as the command's flags (``omniquant.errors.argument_style``).
    SIGTERM is an interrupt like Ctrl-C ("interrupted", exit 130) for every command.
    """
    from omniquant.outdir import sigterm_as_interrupt

    with argument_style(CLI_NAMES):
        try:
            # SIGTERM is an interrupt for every command, from its first import on.
            with sigterm_as_interrupt():
                return _run(argv)
        except KeyboardInterrupt:  # a SIGTERM that surfaced as another exception
            print("interrupted", file=sys.stderr)
            return 130


def _run(argv: list[str] | None) -> int:
    import contextlib

    from omniquant.cli.noise import third_party_to_log

    args = sys.argv[1:] if argv is None else list(argv)
    options = args[: args.index("--") if "--" in args else len(args)]
    # Help is printed by click to sys.stdout: never routed to the log.
    verbose = not args or "--verbose" in options or "--help" in options
    _cli_app._STDOUT = sys.stdout
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
        _cli_app._STDOUT = None
    return 0


if __name__ == "__main__":  # pragma: no cover
    # Run through the imported module: commands register on omniquant.cli._app, which
    # is not this __main__ module's app.
    from omniquant.cli import main as _main

    sys.exit(_main())
