"""User-facing errors: each says what went wrong, where, and what to do about it."""

from __future__ import annotations


class MmcaError(Exception):
    """An error caused by input the user controls. The CLI prints it without a traceback."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")


class DataError(MmcaError):
    """A dataset file is missing, malformed or inconsistent."""


class CheckpointError(MmcaError):
    """A checkpoint or index does not match what was asked for."""


class ConfigError(MmcaError, ValueError):
    """A configuration value is out of range (a ValueError too, for library callers)."""


class NonFiniteError(MmcaError):
    """NaN or Inf where a number is needed: in features, weights or scores. Never a metric."""
