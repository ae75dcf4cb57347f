"""``python -m omniquant.cli``: the same as the ``omniquant`` command."""

import sys

from omniquant.devices import huge_pages_for_torch

huge_pages_for_torch()  # before torch loads (omniquant.devices says why)
from omniquant.cli import main

sys.exit(main())
