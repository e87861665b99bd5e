"""The package version (its own module so that the CLI and machine records can read it without
importing the whole package)."""

__version__ = "0.2.1"
