"""``python -m omniquant.cli``: the same as the ``omniquant`` command, with the same quick
exit (``gc.freeze()`` once the command returns: see ``omniquant/__main__.py``)."""

import gc
import sys

from omniquant.cli import main

rc = main()
gc.freeze()
sys.exit(rc)
