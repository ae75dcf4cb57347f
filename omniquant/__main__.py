"""``python -m omniquant`` and the ``omniquant`` console script (``run``).

``run`` turns SIGTERM into an interrupt before anything else is imported: the CLI's
imports (typer, then torch, transformers and modelopt inside a command) take seconds,
and a SIGTERM meanwhile would otherwise kill the process the default way, with no
"interrupted" and exit 143 instead of 130. ``omniquant.cli.main`` keeps the same rule
for the whole command (``omniquant.outdir.sigterm_as_interrupt``).

When the command is done, ``gc.freeze()`` moves every object alive to the collector's
permanent generation, so the interpreter's last collection at exit does not walk them:
the objects torch, transformers and modelopt create at import are hundreds of
thousands, and that walk took 1.2 s of every command (``omniquant plan`` on the released
config: 5.0 s wall, 1.35 s of it after the command had returned; 0.18 s with the freeze).
Nothing is skipped that Python promises: objects are still freed by reference counting,
and finalizers of objects alive at exit were never guaranteed to run. Only the process
entry point does this; ``omniquant.cli.main`` called in-process is left alone.
"""

import gc
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
    rc = main()
    gc.freeze()  # the exit's collection skips what is alive now (see the module docstring)
    return rc


if __name__ == "__main__":
    sys.exit(run())
