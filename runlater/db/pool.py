"""One asyncpg pool per process, wrapped so that an unavailable database fails fast.

``Database`` adds three things to the pool:

* errors are translated at this boundary (``errors.translate``);
* after an availability error the process marks the database *down* and answers every
  further call at once with ``DatabaseUnavailable`` (→ 503) instead of letting requests
  queue behind connection attempts; a background probe marks it up again as soon as
  ``SELECT 1`` succeeds, so the service recovers by itself;
* the number of callers waiting for a connection is bounded (``max_waiters``); beyond it
  the answer is an immediate 503 rather than a longer queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from runlater.db.errors import DatabaseUnavailable, Overloaded, is_unavailable, translate

log = logging.getLogger("runlater.db")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release hook that sends nothing.

    asyncpg's default release runs ``RESET ALL; UNLISTEN *; CLOSE ALL; …`` — one extra
    round trip per acquire, which on the create path would double the round trips per
    batch. Pool connections here never change session state (no SET, LISTEN, cursors or
    advisory locks; those use dedicated connections), and asyncpg still rolls back an
    open transaction before calling this hook.
    """


async def connect_pool(
    dsn: str,
    *,
    size: int,
    application_name: str,
    connect_timeout: float = 5.0,
    min_size: int | None = None,
) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        dsn,
        min_size=size if min_size is None else min_size,
        max_size=size,
        timeout=connect_timeout,
        # No command_timeout: it wraps every query in a timer (measurable per request);
        # waits are bounded where they start instead (acquire timeout, batch backlog).
        # Connections are long-lived and reused by every request of the process; the
        # default prepared statement cache keeps each named query parsed and planned once.
        max_inactive_connection_lifetime=0,
        reset=_keep_session,
        server_settings={
            "application_name": application_name,
            # Durability is not negotiable: an acknowledged task survives a crash.
            "synchronous_commit": "on",
        },
    )


class Database:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        acquire_timeout: float = 1.0,
        max_waiters: int = 256,
        probe_interval: float = 0.5,
    ) -> None:
        self.pool = pool
        self.acquire_timeout = acquire_timeout
        self.max_waiters = max_waiters
        self.probe_interval = probe_interval
        self.down = False
        self.last_ok = 0.0  # monotonic time of the last successful release
        self._waiting = 0
        self._probe: asyncio.Task[None] | None = None

    # -- availability -------------------------------------------------------------

    def mark_down(self, exc: BaseException) -> None:
        if not self.down:
            log.warning("database unavailable: %s", exc)
            self.down = True
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_up(), name="db-probe")

    async def _probe_until_up(self) -> None:
        while self.down:
            try:
                conn = await asyncio.wait_for(self.pool.acquire(), self.probe_interval * 4)
                try:
                    await conn.fetchval("SELECT 1", timeout=self.probe_interval * 4)
                finally:
                    await self.pool.release(conn)
            except Exception:  # noqa: BLE001 - any failure means "still down"
                await asyncio.sleep(self.probe_interval)
                continue
            self.down = False
            log.warning("database available again")

    def recently_ok(self, within: float) -> bool:
        return time.monotonic() - self.last_ok < within

    def check_available(self) -> None:
        if self.down:
            raise DatabaseUnavailable("database is unavailable", retry_after=1)

    def failed(self, exc: BaseException) -> BaseException:
        """Translate ``exc`` and, for availability errors, mark the database down."""
        err = translate(exc)
        if isinstance(err, DatabaseUnavailable) and not isinstance(err, Overloaded):
            self.mark_down(exc)
        return err

    # -- access ---------------------------------------------------------------------

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        self.check_available()
        if self._waiting >= self.max_waiters:
            raise Overloaded("too many requests waiting for a database connection")
        self._waiting += 1
        try:
            try:
                conn = await self.pool.acquire(timeout=self.acquire_timeout)
            except asyncio.TimeoutError:
                raise Overloaded("no database connection free within the acquire timeout") from None
            except Exception as exc:
                raise self.failed(exc) from exc
        finally:
            self._waiting -= 1
        try:
            yield conn
            self.last_ok = time.monotonic()
        except Exception as exc:
            if is_unavailable(exc):
                raise self.failed(exc) from exc
            raise
        finally:
            await self.pool.release(conn)

    async def fetchval(self, query: str, *args: Any) -> Any:
        async with self.connection() as conn:
            return await conn.fetchval(query, *args)

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        async with self.connection() as conn:
            return await conn.fetchrow(query, *args)

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async with self.connection() as conn:
            return await conn.fetch(query, *args)

    async def execute(self, query: str, *args: Any) -> str:
        async with self.connection() as conn:
            return await conn.execute(query, *args)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        try:
            await asyncio.wait_for(self.pool.close(), 5)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001
            self.pool.terminate()
