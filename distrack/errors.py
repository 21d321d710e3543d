"""distrack's exceptions: a small tree whose docstrings are the default messages."""

from __future__ import annotations


class DistrackError(Exception):
    """distrack failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.__doc__)


class ConfigError(DistrackError):
    """The configuration is not usable."""


class DatabaseUnavailable(DistrackError):
    """The database cannot be reached right now."""


class DataRejected(DistrackError):
    """The database cannot store that data."""


class MigrationError(DistrackError):
    """A migration could not be applied."""
