"""``python -m bwpredd``: the daemon."""

import sys

from bwpredd.cli import main

sys.exit(main())
