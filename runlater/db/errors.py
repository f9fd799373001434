"""Translation of driver errors at one boundary.

The rest of the code sees two kinds of failure: ``DatabaseUnavailable`` (the database
cannot take work right now: down, restarting, out of connections, or our own pool or
backlog is full; the caller answers 503 + Retry-After) and everything else, which is
a real bug or a data error and keeps its original exception as ``__cause__``.
"""

from __future__ import annotations

import asyncio

import asyncpg


class DatabaseUnavailable(Exception):
    """The database cannot take this work now; retry later."""

    def __init__(self, reason: str, retry_after: int = 1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class Overloaded(DatabaseUnavailable):
    """A bounded queue in this process is full."""


_UNAVAILABLE_SQLSTATE_CLASSES = ("08", "53", "57")  # connection, resources, operator intervention


def is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, DatabaseUnavailable):
        return True
    if isinstance(exc, (OSError, ConnectionError, asyncio.TimeoutError, TimeoutError)):
        return True
    if isinstance(exc, (asyncpg.InterfaceError, asyncpg.exceptions.ConnectionDoesNotExistError)):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        return state[:2] in _UNAVAILABLE_SQLSTATE_CLASSES
    return False


def translate(exc: BaseException) -> BaseException:
    """Return ``DatabaseUnavailable`` (with the cause attached) for availability errors."""
    if isinstance(exc, DatabaseUnavailable):
        return exc
    if is_unavailable(exc):
        err = DatabaseUnavailable(f"{type(exc).__name__}: {exc}")
        err.__cause__ = exc
        return err
    return exc
