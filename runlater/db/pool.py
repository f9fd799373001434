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
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from runlater.db.errors import (
    DatabaseUnavailable,
    Overloaded,
    is_unavailable,
    translate,
)

log = logging.getLogger("runlater.db")


class ConnectionPool:
    """A minimal pool of asyncpg connections for one event loop.

    Why not ``asyncpg.Pool``: its acquire/release path (holders, ``wait_for``, ``shield``,
    a reset query or hook on every release) cost 80-110 µs of Python per query on this
    service's hot paths, against a few µs here. What this pool does:

    * ``acquire`` pops an idle connection, opens a new one while below ``size``, or waits
      (bounded by ``timeout``) for the next release — waiters are served in order;
    * ``release`` hands the connection to the oldest waiter or back to the idle stack; a
      closed connection, or one left inside a transaction, is dropped and its slot freed;
    * connections never change session state here (no SET, LISTEN, cursors or advisory
      locks: those use dedicated connections), so nothing is reset between uses.

    Invariant: ``_size`` = idle + handed out + being opened.
    """

    def __init__(self, dsn: str, *, size: int, connect_kwargs: dict[str, Any]) -> None:
        self.dsn = dsn
        self.size = size
        self._connect_kwargs = connect_kwargs
        self._idle: list[asyncpg.Connection] = []
        self._waiters: deque[asyncio.Future[asyncpg.Connection | None]] = deque()
        self._size = 0
        self._closed = False

    async def start(self, min_size: int) -> None:
        self._size += min_size
        conns = await asyncio.gather(*(self._open() for _ in range(min_size)))
        self._idle.extend(conns)

    async def _open(self) -> asyncpg.Connection:
        """Open a connection for a slot the caller has already counted in ``_size``."""
        try:
            return await asyncpg.connect(self.dsn, **self._connect_kwargs)
        except BaseException:
            self._size -= 1
            self._wake_one(None)  # a waiter may open the connection we could not
            raise

    async def acquire(self, timeout: float) -> asyncpg.Connection:
        if self._closed:
            raise asyncpg.InterfaceError("pool is closed")
        while self._idle:
            conn = self._idle.pop()
            if not conn.is_closed():
                return conn
            self._size -= 1
        if self._size < self.size:
            self._size += 1
            return await asyncio.wait_for(self._open(), timeout)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[asyncpg.Connection | None] = loop.create_future()
        self._waiters.append(fut)
        timer = loop.call_later(timeout, _expire, fut)
        try:
            conn = await fut
        except asyncio.CancelledError:
            # Cancelled after a release already picked us: pass the gift on.
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                handed = fut.result()
                if handed is None:
                    self._wake_one(None)
                else:
                    self.release(handed)
            raise
        finally:
            timer.cancel()
        if conn is None:  # a slot was freed rather than a connection handed over
            self._size += 1
            return await asyncio.wait_for(self._open(), timeout)
        return conn

    def release(self, conn: asyncpg.Connection) -> None:
        if conn.is_closed() or conn.is_in_transaction() or self._closed:
            if not conn.is_closed():
                conn.terminate()
            self._size -= 1
            self._wake_one(None)
            return
        if not self._wake_one(conn):
            self._idle.append(conn)

    def discard(self, conn: asyncpg.Connection) -> None:
        """Drop a connection whose state is unknown (e.g. a query was cancelled)."""
        conn.terminate()
        self._size -= 1
        self._wake_one(None)

    def _wake_one(self, conn: asyncpg.Connection | None) -> bool:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return True
        return False

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for fut in self._waiters:
            if not fut.done():
                fut.set_exception(asyncpg.InterfaceError("pool is closed"))
        self._waiters.clear()
        await asyncio.gather(*(c.close(timeout=2) for c in idle), return_exceptions=True)
        self._size -= len(idle)

    def terminate(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn.terminate()
        self._idle.clear()


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


# Settings of every runlater database session (benchmarks use them too, so they time
# statements the way runlater runs them).
SESSION_SETTINGS: dict[str, str] = {
    # Durability is not negotiable: an acknowledged task survives a crash.
    "synchronous_commit": "on",
    # Every statement here is short OLTP work. With JIT on, a misestimated plan
    # (e.g. on a table not yet analyzed) spent seconds compiling the claim:
    # 6.9 s per claim vs 143 ms with jit=off in bench/drain.py.
    "jit": "off",
    # Plan every statement for its actual parameters. A generic plan cached while
    # a table was small (or for an unknown organisation) stays in use as the table
    # grows: lists took 374 ms on such a connection vs 3.5 ms freshly planned, and
    # claims 1-2 s vs 17-46 ms. Planning these statements costs far less.
    "plan_cache_mode": "force_custom_plan",
}


async def connect_pool(
    dsn: str,
    *,
    size: int,
    application_name: str,
    connect_timeout: float = 5.0,
    min_size: int | None = None,
    server_settings: dict[str, str] | None = None,
) -> ConnectionPool:
    pool = ConnectionPool(dsn, size=size, connect_kwargs={
        "timeout": connect_timeout,
        # No command_timeout: it wraps every query in a timer (measurable per request);
        # waits are bounded where they start instead (acquire timeout, batch backlog).
        # The default prepared-statement cache keeps each named query planned once per
        # connection.
        "server_settings": {
            "application_name": application_name,
            **SESSION_SETTINGS,
            **(server_settings or {}),
        },
    })
    await pool.start(size if min_size is None else min_size)
    return pool


class Database:
    def __init__(
        self,
        pool: ConnectionPool,
        *,
        acquire_timeout: float = 1.0,
        query_timeout: float = 3.0,
        max_waiters: int = 256,
        probe_interval: float = 0.5,
    ) -> None:
        self.pool = pool
        self.acquire_timeout = acquire_timeout
        self.query_timeout = query_timeout
        self.max_waiters = max_waiters
        self.probe_interval = probe_interval
        self.down = False
        self.last_ok = 0.0  # monotonic time of the last successful release
        self._waiting = 0
        self._probe: asyncio.Task[None] | None = None
        # Connections handed out, with the monotonic time they were taken. A watchdog
        # (one timer per process, not one per query) terminates any connection held
        # longer than query_timeout: a database that stops answering without closing
        # its sockets (a network black hole) turns into a fast 503, never a hang.
        self._busy: dict[asyncpg.Connection, float] = {}
        self._watchdog: asyncio.Task[None] | None = None

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
                conn = await self.pool.acquire(timeout=self.probe_interval * 4)
                try:
                    await conn.fetchval("SELECT 1", timeout=self.probe_interval * 4)
                except BaseException:
                    self.pool.discard(conn)
                    raise
                self.pool.release(conn)
            except Exception:  # noqa: BLE001 - any failure means "still down"
                await asyncio.sleep(self.probe_interval)
                continue
            self.down = False
            log.warning("database available again")

    async def _watch(self) -> None:
        tick = max(0.05, min(0.5, self.query_timeout / 4))
        while True:
            await asyncio.sleep(tick)
            if not self._busy:
                continue
            limit = time.monotonic() - self.query_timeout
            for conn, taken in list(self._busy.items()):
                if taken < limit and not conn.is_closed():
                    log.warning("no answer from the database within %.1fs; dropping the connection",
                                self.query_timeout)
                    conn.terminate()  # the waiting query fails at once → DatabaseUnavailable
                    self.mark_down(TimeoutError(f"no answer within {self.query_timeout}s"))

    def stalled(self, older_than: float) -> bool:
        """True when some connection has been held (waiting on the database) that long."""
        limit = time.monotonic() - older_than
        return any(taken < limit for taken in self._busy.values())

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
            except TimeoutError:
                raise Overloaded("no database connection free within the acquire timeout") from None
            except Exception as exc:
                raise self.failed(exc) from exc
        finally:
            self._waiting -= 1
        self._busy[conn] = time.monotonic()
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._watch(), name="db-watchdog")
        try:
            yield conn
        except asyncio.CancelledError:
            # The query may still be running on the server: the connection's state is
            # unknown, so it is not given to anyone else.
            self.pool.discard(conn)
            raise
        except Exception as exc:
            self.pool.release(conn)
            if is_unavailable(exc):
                raise self.failed(exc) from exc
            raise
        else:
            self.last_ok = time.monotonic()
            self.pool.release(conn)
        finally:
            self._busy.pop(conn, None)

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
        for task in (self._probe, self._watchdog):
            if task is not None:
                task.cancel()
        try:
            await asyncio.wait_for(self.pool.close(), 5)
        except (TimeoutError, Exception):  # noqa: BLE001
            self.pool.terminate()
