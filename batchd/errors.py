"""Exception types whose default message says what went wrong."""

from __future__ import annotations


class BatchdError(Exception):
    """batchd failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(BatchdError):
    """The configuration is invalid."""


class UsageError(BatchdError):
    """The command line is invalid."""
