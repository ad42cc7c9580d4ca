"""The package version (bottom layer: the manifest, the model card and the resume fingerprint name it)."""

__version__ = "0.1.0"
