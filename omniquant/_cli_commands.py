"""CLI commands beyond make-tiny, one function each, registered on ``omniquant.cli.app``.

Each command parses, calls one stage function and prints. Keep stage imports inside
the function bodies (``import omniquant.cli`` must stay cheap).
"""

from __future__ import annotations

from omniquant.cli import app, _console  # noqa: F401
