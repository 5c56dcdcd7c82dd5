"""``python -m pipeline`` is the same as ``cpath``."""

import sys

from pipeline.cli import main

sys.exit(main())
