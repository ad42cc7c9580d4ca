#!/usr/bin/env python
"""Benchmark expo_dist: `python scripts/bench.py --help`. The phases live in scripts/expo_bench/ (see its
__init__.py for what is measured); this file only makes this checkout's expo_dist importable and runs it."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's expo_dist

from expo_bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
