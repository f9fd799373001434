"""Group commit for task creation: concurrent creates become one statement.

Every create request in a process hands its row to ``InsertBatcher.submit`` together
with the value its future should resolve to once the row is committed (the API layer
passes its prepared response), and gets a future. Futures never carry exceptions: a
failure resolves them with ``on_error(exc)``, so the layer that owns status codes
decides what a failure looks like and nothing is left unretrieved when a client has
gone away. The batcher sends the waiting rows as one multi-row ``INSERT … unnest`` (tasks
and their first executions, one round trip, one commit) and then resolves every future
of the batch, so a request is answered only after its row is durable.

When to flush:
* Nothing in flight → flush on the next loop iteration (``call_soon``), so all
  requests parsed in the current iteration share a statement, and no timer ever adds
  latency while the database is idle.
* A flush in flight → rows accumulate; batches grow with load by themselves. Another
  flush starts early only once ``max_rows`` are waiting and fewer than
  ``max_inflight`` statements are running (deeper pipelining on a busy database).

Limits (why these defaults):
* ``max_rows`` 500: past a few hundred rows per statement the per-row cost is flat
  (measured ≈85k pairs/s at 100–500 rows on 2 cores) while latency grows linearly.
* ``max_inflight`` 3: enough to overlap one commit's WAL flush with the next
  statement's execution; more only adds lock and CPU contention on 2 cores.
* ``max_backlog`` 20,000 rows: about half a second of peak load; beyond it the
  request is refused at once with 503 instead of joining a queue it would time out in.
* ``max_wait`` 0.5 s: when the oldest row still waiting for a statement has waited
  this long, the database is not keeping up and new rows are refused with 503 until
  the queue moves again. This sheds overload early, so admitted requests stay fast
  (without it, a 3x overload doubled latency for everyone instead of refusing anyone).

A statement that fails on data (not availability) is retried row by row, so one bad
row cannot fail the requests of the others: each future gets its own outcome.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from runlater.db.errors import DatabaseUnavailable, Overloaded, is_unavailable
from runlater.db.pool import Database

log = logging.getLogger("runlater.batcher")

Columns = Callable[[Sequence[Any]], tuple[list[Any], ...]]


class InsertBatcher:
    def __init__(
        self,
        db: Database,
        query: str,
        columns: Columns,
        on_error: Callable[[BaseException], Any],
        *,
        max_rows: int = 500,
        max_inflight: int = 3,
        max_backlog: int = 20_000,
        max_wait: float = 0.5,
        name: str = "batcher",
    ) -> None:
        self.db = db
        self.query = query
        self.columns = columns  # rows -> one list per statement parameter
        self.on_error = on_error
        self.max_rows = max_rows
        self.max_inflight = max_inflight
        self.max_backlog = max_backlog
        self.max_wait = max_wait
        self.name = name
        self._rows: list[Any] = []
        self._futures: list[asyncio.Future[Any]] = []
        self._values: list[Any] = []
        self._queued_at: list[float] = []  # monotonic enqueue time per waiting row
        self._inflight = 0
        self._scheduled = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop = asyncio.get_running_loop()
        # Counters for diagnostics and benchmarks.
        self.statements = 0
        self.rows_committed = 0

    @property
    def backlog(self) -> int:
        return len(self._rows)

    def submit(self, row: Any, value: Any) -> asyncio.Future[Any]:
        """Queue one row; the future resolves to ``value`` after its commit."""
        if len(self._rows) >= self.max_backlog:
            raise Overloaded("insert backlog is full")
        now = time.monotonic()
        if self._rows and now - self._queued_at[0] > self.max_wait:
            raise Overloaded("inserts are queueing faster than the database commits them")
        self.db.check_available()
        fut = self._loop.create_future()
        self._rows.append(row)
        self._futures.append(fut)
        self._values.append(value)
        self._queued_at.append(now)
        self._idle.clear()
        if not self._scheduled:
            if self._inflight == 0 or (len(self._rows) >= self.max_rows and self._inflight < self.max_inflight):
                self._scheduled = True
                self._loop.call_soon(self._start_flush)
        return fut

    def _start_flush(self) -> None:
        self._scheduled = False
        while self._rows and self._inflight < self.max_inflight:
            rows = self._rows[: self.max_rows]
            futures = self._futures[: self.max_rows]
            values = self._values[: self.max_rows]
            del self._rows[: self.max_rows]
            del self._futures[: self.max_rows]
            del self._values[: self.max_rows]
            del self._queued_at[: self.max_rows]
            self._inflight += 1
            self._loop.create_task(self._flush(rows, futures, values), name=f"{self.name}-flush")
            # Only start extra statements when a full batch is waiting; otherwise let
            # rows accumulate behind the running one.
            if len(self._rows) < self.max_rows:
                break

    async def _flush(self, rows: list[Any], futures: list[asyncio.Future[Any]], values: list[Any]) -> None:
        try:
            try:
                await self._run(rows)
            except Exception as exc:  # noqa: BLE001 - every future gets an outcome
                if is_unavailable(exc) or len(rows) == 1:
                    self._fail_all(futures, exc)
                else:
                    log.warning("batch of %d rows failed (%s); retrying row by row", len(rows), exc)
                    await self._one_by_one(rows, futures, values)
            else:
                self.statements += 1
                self.rows_committed += len(rows)
                for fut, value in zip(futures, values):
                    if not fut.done():
                        fut.set_result(value)
        finally:
            self._inflight -= 1
            if self._rows:
                if not self._scheduled:
                    self._scheduled = True
                    self._loop.call_soon(self._start_flush)
            elif self._inflight == 0:
                self._idle.set()

    async def _run(self, rows: Sequence[Any]) -> Any:
        params = self.columns(rows)
        async with self.db.connection() as conn:
            return await conn.fetchval(self.query, *params)

    async def _one_by_one(self, rows: list[Any], futures: list[asyncio.Future[Any]], values: list[Any]) -> None:
        for row, fut, value in zip(rows, futures, values):
            try:
                await self._run([row])
            except Exception as exc:  # noqa: BLE001
                self._fail_all([fut], exc)
            else:
                self.statements += 1
                self.rows_committed += 1
                if not fut.done():
                    fut.set_result(value)

    def _fail_all(self, futures: list[asyncio.Future[Any]], exc: BaseException) -> None:
        err: BaseException = exc
        if is_unavailable(exc) and not isinstance(exc, DatabaseUnavailable):
            err = self.db.failed(exc)
        elif not is_unavailable(exc):
            log.error("insert failed: %r", exc)
        value = self.on_error(err)
        for fut in futures:
            if not fut.done():
                fut.set_result(value)

    async def drain(self, timeout: float) -> bool:
        """Flush everything queued and wait for it; True when nothing is left."""
        if self._rows and not self._scheduled and self._inflight == 0:
            self._scheduled = True
            self._loop.call_soon(self._start_flush)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True
