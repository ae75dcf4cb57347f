"""``python -m omniquant`` runs the CLI."""

import sys

from omniquant.cli import main

sys.exit(main())
