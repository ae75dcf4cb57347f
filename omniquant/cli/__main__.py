"""``python -m omniquant.cli``: the same as the ``omniquant`` command (its entry point,
``omniquant.__main__.run``)."""

import sys

from omniquant.__main__ import run

sys.exit(run())
