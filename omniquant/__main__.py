"""``python -m omniquant`` and the ``omniquant`` console script (``run``).

``run`` turns SIGTERM into an interrupt before anything else is imported: the CLI's
imports (typer, then torch, transformers and modelopt inside a command) take seconds,
and a SIGTERM meanwhile would otherwise kill the process the default way, with no
"interrupted" and exit 143 instead of 130. ``omniquant.cli.main`` keeps the same rule
for the whole command (``omniquant.outdir.sigterm_as_interrupt``).
"""

import signal
import sys


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run() -> int:
    """Entry point: SIGTERM handled from the first line, then ``omniquant.cli.main``."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        from omniquant.cli import main
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return main()


if __name__ == "__main__":
    sys.exit(run())
