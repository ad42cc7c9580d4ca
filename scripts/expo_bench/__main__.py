"""`python -m expo_bench` (from scripts/): the same as `python scripts/bench.py`."""

import sys

from .cli import main

sys.exit(main())
