"""``python -m omniquant.cli``: the same as the ``omniquant`` command."""

import sys

from omniquant.cli import main

sys.exit(main())
