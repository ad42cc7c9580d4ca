"""expo_dist: exact, distributed ExPO merging on Ray (formats -> sources -> planning -> runtime -> output -> verify)."""

from ._version import __version__

__all__ = ["__version__"]
