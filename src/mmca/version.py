"""The package's version, in one place: pyproject.toml reads it from here when it builds."""

__version__ = "0.1.0"
