"""The cron scheduler: turns due cron slots into pending executions, once, ahead of time.

Leadership
    Every executor process runs a ``Scheduler``; exactly one of them, across all
    processes and machines, is the leader. Leadership is a session-level PostgreSQL
    advisory lock (``SCHEDULER_LOCK_KEY``) held on the scheduler's own connection. The
    others retry ``pg_try_advisory_lock`` every ``retry_interval`` seconds. When the
    leader's process dies, its session ends and PostgreSQL frees the lock, so a
    standby takes over within one retry interval. The leader runs its ticks on the very
    connection that holds the lock: if that connection is lost, the tick fails and the
    process stops acting as leader at the same moment the lock is freed.

Tick (every ``tick_interval`` s, and at once on ``NOTIFY runlater_scheduler``)
    Due tasks are those enabled, live, with ``next_run_at <= now + lookahead``; the
    lookahead (5 s; longer while ticks are slow, see ``effective_lookahead``) makes each
    execution exist before its second starts, so executors
    (woken by ``NOTIFY runlater_executions`` with the earliest slot) start it on time.
    A tick pages through due tasks in chunks of ``chunk_size`` (keyset order on
    ``(next_run_at, id)``). For each chunk the fire times are computed in Python
    (``runlater.core.cron``), once per distinct (cursor, expression, time zone): tasks
    that share a schedule share their cursor, so 100,000 every-minute tasks are one
    computation. One statement (``scheduler_advance``) then moves every cursor and
    inserts every execution of the chunk, from per-schedule arrays plus three
    per-task ones: two round trips per 5,000 tasks, none per task.

Catch-up after downtime (upstream engine §5.4)
    A cursor already in the past walks forward through its fire times up to now, at
    most ``MISSED_PER_TICK`` (100) per task per tick (a cursor still in the past after
    that continues on the next tick). Slots earlier than the task's creation are
    dropped (no back-fill). All but the last slot become ``missed`` rows
    (``Scheduler was unavailable at scheduled time``); the last runs (a pending row
    at its own slot time) if it is late by less than the grace period,
    clamp(interval × 30 s, 30 s, 1 h), and otherwise is missed too. Unlike upstream, a
    task whose every slot predates its creation still has its cursor advanced, so it
    is not re-examined forever, and an expression that cannot be evaluated any more
    clears the cursor instead of failing the whole tick.

Monthly limits (DECISIONS 9)
    The organisation's tier and monthly count arrive with each due task (one join in
    the chunk query). A slot runs only while count + executions this tick created for
    the organisation < the tier's limit (free 10,000, pro 1,000,000, unlimited none);
    otherwise an upcoming slot is skipped (the cursor advances, no row) and an overdue
    one becomes ``missed``, as upstream does.

Exactly once
    ``scheduler_advance`` updates a task only where its row still has the cursor,
    expression and time zone the slots were computed from, and inserts executions
    only for the tasks it updated. We chose this guarded update over a unique index on
    executions (task_id, scheduled_for): an index would also reject legitimate rows
    (a manual trigger landing on a slot's second, a retry or a host-block requeue
    moved onto one), and would not notice an API edit of the schedule made between our
    read and our write, which the guard does. Two schedulers working from the same
    read (impossible under the lock, but a stalled ex-leader is conceivable) therefore
    write each slot once: the second one's guard is false after the first commits.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from runlater.core import cron
from runlater.core.ids import uuid7_hex_bulk
from runlater.db.queries import Q

log = logging.getLogger("runlater.scheduler")

SCHEDULER_CHANNEL = "runlater_scheduler"
# Arbitrary but fixed, shared by every process: "rl-sched" in ASCII.
SCHEDULER_LOCK_KEY = 0x726C2D7363686564
MISSED_PER_TICK = 100
# Bounds of the adaptive lookahead: below a minute, so an every-minute task has at most
# one upcoming slot per tick; the slowest tick is forgotten by ~1 % per tick (per second).
MAX_LOOKAHEAD = 30.0
SLOW_TICK_DECAY = 0.99
# DECISIONS 9 / CONTRACT "Tiers"; unknown tiers count as free, as upstream.
MONTHLY_LIMITS: Mapping[str, int | None] = {"free": 10_000, "pro": 1_000_000, "unlimited": None}

_BEFORE_ALL = datetime(1, 1, 2, tzinfo=UTC)  # keyset start: before any cursor (asyncpg-safe)
_NIL = uuid.UUID(int=0)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class TickStats:
    due: int = 0  # due task rows handled
    advanced: int = 0  # cursors moved (a lost guard is not counted)
    pending: int = 0  # executions created to run
    missed: int = 0  # executions created as missed
    skipped: int = 0  # upcoming slots dropped for the monthly limit
    chunks: int = 0
    seconds: float = 0.0


def execution_ids(n: int) -> list[str]:
    """``n`` execution ids for one tick, made in bulk (see ``core.ids.uuid7_hex_bulk``)."""
    return uuid7_hex_bulk(n)


class _Chunk:
    """The parameters of one ``scheduler_advance`` call, built by ``Scheduler.plan``."""

    __slots__ = ("task_ids", "task_schedules", "task_runs", "olds", "news", "exprs", "zones", "run_ats",
                 "missed_tasks", "missed_at", "skipped", "revisit")

    def __init__(self) -> None:
        self.task_ids: list[Any] = []
        self.task_schedules: list[int] = []  # 1-based index into the schedule arrays
        self.task_runs: list[bool] = []
        # One element per schedule (distinct cursor, expression, time zone):
        self.olds: list[datetime] = []
        self.news: list[datetime | None] = []
        self.exprs: list[str | None] = []
        self.zones: list[str | None] = []
        self.run_ats: list[datetime | None] = []
        self.missed_tasks: list[Any] = []
        self.missed_at: list[datetime] = []
        self.skipped = 0
        self.revisit: list[tuple[Any, ...]] = []  # (expression, zone, new cursor) still due this tick

    def args(self, now: datetime) -> tuple[Any, ...]:
        runs = self.task_runs
        ids = iter(execution_ids(sum(runs) + len(self.missed_at)))
        run_ids = [next(ids) if r else None for r in runs]
        missed_ids = list(ids)
        return (self.task_ids, self.task_schedules, run_ids, self.olds, self.news, self.exprs, self.zones,
                self.run_ats, missed_ids, self.missed_tasks, self.missed_at, now)


# A cron walk from one cursor: (slots up to now or the single upcoming slot, new
# cursor, overdue?, grace seconds). None stands for "cannot evaluate".
_Walk = tuple[tuple[datetime, ...], datetime | None, bool, float] | None


class Scheduler:
    def __init__(
        self,
        dsn: str,
        *,
        name: str = "scheduler",
        tick_interval: float = 1.0,
        lookahead: float = 5.0,
        retry_interval: float = 2.0,
        chunk_size: int = 5000,
        writers: int = 2,
        monthly_limits: Mapping[str, int | None] = MONTHLY_LIMITS,
        clock: Callable[[], datetime] = utcnow,
        lock_key: int = SCHEDULER_LOCK_KEY,
    ) -> None:
        self.dsn = dsn
        self.name = name
        self.tick_interval = tick_interval
        self.lookahead = timedelta(seconds=lookahead)
        self.slow_tick = 0.0  # recent slowest tick (s), decaying; see effective_lookahead
        self.retry_interval = retry_interval
        self.chunk_size = chunk_size
        self.writers = writers
        self.monthly_limits = monthly_limits
        self.clock = clock
        self.lock_key = lock_key
        self.leader = False
        self.ticks = 0
        self.last_tick: TickStats | None = None
        self._conn: asyncpg.Connection | None = None
        self._writer_conns: list[asyncpg.Connection] = []
        self._wake: asyncio.Event | None = None
        self._stopping = False

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Contend for leadership and tick while leader, until ``stop`` is set.

        On return the lock is released and the connection closed. A failing tick (lost
        connection, database down) gives leadership up and retries after
        ``retry_interval``; every chunk is one statement, so nothing half-written is
        left behind.
        """
        self._wake = asyncio.Event()
        self._stopping = False
        try:
            while not stop.is_set():
                try:
                    conn = await self._connection()
                    if not self.leader:
                        if not await conn.fetchval(Q.scheduler_try_lock, self.lock_key):
                            await self._pause(stop, self.retry_interval)
                            continue
                        self.leader = True
                        await conn.add_listener(SCHEDULER_CHANNEL, self._on_notify)
                        log.info("%s is the scheduler leader", self.name)
                    self._wake.clear()
                    stats = await self.tick(conn, stop, await self._writer_connections())
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - any failure: step down, retry
                    log.warning("%s: scheduler step failed, retrying: %s", self.name, exc)
                    await self._disconnect()
                    await self._pause(stop, self.retry_interval)
                    continue
                if stats.pending or stats.missed or stats.skipped:
                    log.debug("%s tick: %d due, %d pending, %d missed, %d skipped in %.3fs", self.name,
                              stats.due, stats.pending, stats.missed, stats.skipped, stats.seconds)
                await self._pause(stop, self.tick_interval, wakeable=True)
        finally:
            self._stopping = True
            await self._release()

    async def _connect(self, role: str) -> asyncpg.Connection:
        return await asyncpg.connect(
            self.dsn, timeout=5, command_timeout=60,
            server_settings={"application_name": f"runlater-{self.name}{role}", "synchronous_commit": "on"},
        )

    async def _connection(self) -> asyncpg.Connection:
        conn = self._conn
        if conn is None or conn.is_closed():
            self.leader = False
            conn = self._conn = await self._connect("")
        return conn

    async def _writer_connections(self) -> list[asyncpg.Connection]:
        """The leader's extra connections for chunk writes (opened on first use).

        PostgreSQL's side of a chunk (the cursor UPDATE and the executions INSERT, with
        their index entries) is most of a tick's cost; writing chunks on separate
        sessions lets it use more than one core while this process reads and plans the
        next chunk. Correctness does not depend on it: chunks touch disjoint tasks and
        every write is guarded.
        """
        if any(c.is_closed() for c in self._writer_conns):
            await self._close_writers()
        while len(self._writer_conns) < self.writers:
            self._writer_conns.append(await self._connect(f"-w{len(self._writer_conns) + 1}"))
        return self._writer_conns

    async def _close_writers(self) -> None:
        conns, self._writer_conns = self._writer_conns, []
        for c in conns:
            if not c.is_closed():
                c.terminate()

    async def _pause(self, stop: asyncio.Event, seconds: float, wakeable: bool = False) -> None:
        waiters = [asyncio.ensure_future(stop.wait())]
        if wakeable and self._wake is not None:
            waiters.append(asyncio.ensure_future(self._wake.wait()))
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    def _on_notify(self, conn: object, pid: int, channel: str, payload: str) -> None:
        # A schedule changed. Only a cursor that is (almost) due needs a tick now; later
        # ones are found by the regular tick, so a burst of edits costs no extra ticks.
        try:
            due_in = float(payload) - self.clock().timestamp()
        except ValueError:
            due_in = 0.0
        if due_in <= self.effective_lookahead().total_seconds() + self.tick_interval and self._wake is not None:
            self._wake.set()

    async def _disconnect(self) -> None:
        await self._close_writers()
        conn, self._conn = self._conn, None
        self.leader = False
        if conn is not None and not conn.is_closed():
            conn.terminate()  # ends the session, which frees the lock if we held it

    async def _release(self) -> None:
        await self._close_writers()
        conn, self._conn = self._conn, None
        was_leader, self.leader = self.leader, False
        if conn is None or conn.is_closed():
            return
        try:
            if was_leader:
                await asyncio.wait_for(conn.fetchval(Q.scheduler_unlock, self.lock_key), 2)
            await asyncio.wait_for(conn.close(), 2)
        except Exception:  # noqa: BLE001 - closing the session frees the lock anyway
            conn.terminate()
        if was_leader:
            log.info("%s gave up scheduler leadership", self.name)

    # -- one tick -----------------------------------------------------------------------

    async def tick(self, conn: asyncpg.Connection, stop: asyncio.Event | None = None,
                   writers: list[asyncpg.Connection] | None = None) -> TickStats:
        """Materialise every slot due by now + lookahead, chunk by chunk, on ``conn``.

        With ``writers``, chunk writes run on those connections, up to one per
        connection at a time, while ``conn`` reads and the next chunk is planned;
        without, everything runs on ``conn`` in turn. Callable directly (tests,
        benchmark): it needs no leadership, only connections; the guarded writes keep
        it correct even beside a running leader. Stops between chunks when ``stop`` is
        set; returns once every started write has finished.
        """
        started = time.perf_counter()
        now = self.clock()
        horizon = now + self.effective_lookahead()
        stats = TickStats()
        used: dict[Any, int] = {}  # executions created this tick, per organisation
        memo: dict[tuple[Any, ...], _Walk] = {}
        # Schedules whose new cursor is still due by the horizon (a catch-up longer than
        # 100 slots): their tasks show up again further on and are left for the next
        # tick, so no task gets more than one turn per tick.
        revisit: set[tuple[Any, ...]] = set()
        idle: asyncio.Queue[asyncpg.Connection] = asyncio.Queue()
        for w in writers or ():
            idle.put_nowait(w)
        writing: set[asyncio.Task[tuple[_Chunk, asyncpg.Record]]] = set()

        async def write(chunk: _Chunk) -> tuple[_Chunk, asyncpg.Record]:
            c = await idle.get()
            try:
                return chunk, await self._write(c, chunk, now)
            finally:
                idle.put_nowait(c)

        def count(done: set[asyncio.Task[tuple[_Chunk, asyncpg.Record]]]) -> None:
            for task in done:
                writing.discard(task)
                chunk, result = task.result()
                stats.advanced += result["advanced"]
                stats.pending += result["pending"]
                stats.missed += result["missed"]

        after_at, after_id = _BEFORE_ALL, _NIL
        try:
            while True:
                rows = await conn.fetch(Q.scheduler_due_tasks, horizon, after_at, after_id, self.chunk_size)
                if not rows:
                    break
                last = rows[-1]
                after_at, after_id = last["next_run_at"], last["id"]
                fresh = rows if not revisit else [r for r in rows if (r[3], r[4], r[5]) not in revisit]
                if fresh:
                    chunk = self.plan(fresh, now, used, memo, horizon)
                    revisit.update(chunk.revisit)
                    stats.due += len(fresh)
                    stats.skipped += chunk.skipped
                    stats.chunks += 1
                    if not writers:
                        result = await self._write(conn, chunk, now)
                        stats.advanced += result["advanced"]
                        stats.pending += result["pending"]
                        stats.missed += result["missed"]
                    else:
                        if len(writing) >= len(writers):
                            done, _ = await asyncio.wait(writing, return_when=asyncio.FIRST_COMPLETED)
                            count(done)
                        writing.add(asyncio.create_task(write(chunk), name=f"{self.name}-write"))
                if len(rows) < self.chunk_size or (stop is not None and stop.is_set()):
                    break
            if writing:
                done, _ = await asyncio.wait(writing)
                count(done)
        finally:
            # On failure or cancellation: stop the other writes too (each is one
            # statement, so a cancelled one leaves nothing behind).
            for task in writing:
                task.cancel()
            if writing:
                await asyncio.gather(*writing, return_exceptions=True)
        stats.seconds = time.perf_counter() - started
        self.slow_tick = max(stats.seconds, self.slow_tick * SLOW_TICK_DECAY)
        self.ticks += 1
        self.last_tick = stats
        return stats

    def effective_lookahead(self) -> timedelta:
        """How far ahead this tick looks: the configured lookahead, or twice the recent
        slowest tick when that is longer (at most ``MAX_LOOKAHEAD``).

        A minute in which 100,000 tasks are due takes seconds to write; with a fixed 5 s
        lookahead its last slots would be written after their second began. The slow
        tick of one such minute is remembered (decaying over a few minutes, because the
        ticks in between are quick), so the next such minute starts early enough.
        """
        adaptive = timedelta(seconds=min(2 * self.slow_tick, MAX_LOOKAHEAD))
        return max(self.lookahead, adaptive)

    @staticmethod
    async def _write(conn: asyncpg.Connection, chunk: _Chunk, now: datetime) -> asyncpg.Record:
        # Only two writers racing over the same tasks can deadlock (never under the
        # lock; a stalled ex-leader, or tests); the guard makes re-running the chunk
        # safe, as rows the other writer advanced are then skipped.
        for attempt in range(3):
            try:
                return await conn.fetchrow(Q.scheduler_advance, *chunk.args(now))
            except asyncpg.DeadlockDetectedError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def plan(self, rows: list[Any], now: datetime, used: dict[Any, int], memo: dict[tuple[Any, ...], _Walk],
             horizon: datetime | None = None) -> _Chunk:
        """Decide, for each due task row, its slots and its new cursor (no I/O).

        ``used`` counts executions created this tick per organisation (updated here);
        ``memo`` caches cron walks for the tick. Tasks whose new cursor is still due by
        ``horizon`` are listed in ``revisit`` (the tick skips them if met again).
        """
        chunk = _Chunk()
        limits = self.monthly_limits
        free_limit = limits.get("free")
        schedules: dict[tuple[Any, ...], int] = {}
        task_ids, task_schedules, task_runs = chunk.task_ids, chunk.task_schedules, chunk.task_runs
        for task_id, org, kind, expression, zone, cursor, inserted_at, tier, count in rows:
            key = (expression, zone, cursor)
            number = schedules.get(key)
            if number is None:
                # A new schedule of this chunk: one cron walk (memoised for the tick).
                if kind == "cron":
                    walk = memo.get(key, False)
                    if walk is False:
                        walk = memo[key] = self._walk(expression, zone, cursor, now)
                    if walk is None:
                        log.warning("task %s: cannot evaluate cron %r (%s); unscheduling it", task_id, expression, zone)
                else:
                    # A one-time task the scheduler owns (next_run_at set by its creator):
                    # one run at the cursor, always within grace, then no cursor.
                    walk = ((cursor,), None, cursor <= now, float("inf"))
                number = schedules[key] = len(chunk.olds) + 1
                chunk.olds.append(cursor)
                chunk.exprs.append(expression)
                chunk.zones.append(zone)
                if walk is None:
                    chunk.news.append(None)
                    chunk.run_ats.append(None)
                else:
                    chunk.news.append(walk[1])
                    chunk.run_ats.append(walk[0][-1])
                    if walk[1] is not None and horizon is not None and walk[1] <= horizon:
                        chunk.revisit.append((expression, zone, walk[1]))
            else:
                walk = memo.get(key) if kind == "cron" else ((cursor,), None, cursor <= now, float("inf"))
            task_ids.append(task_id)
            task_schedules.append(number)
            run = False
            if walk is not None:
                limit = limits[tier] if tier in limits else free_limit
                allowed = limit is None or count + used.get(org, 0) < limit
                slots, _, overdue, grace = walk
                if not overdue:
                    run = allowed
                    if not allowed:
                        chunk.skipped += 1
                else:
                    if kind == "cron":
                        # No back-fill before the task existed (second precision, as upstream).
                        floor = inserted_at.replace(microsecond=0)
                        if slots[0] < floor:
                            slots = tuple(t for t in slots if t >= floor)
                    if slots:
                        run = allowed and (now - slots[-1]).total_seconds() < grace
                        for t in slots if not run else slots[:-1]:
                            chunk.missed_tasks.append(task_id)
                            chunk.missed_at.append(t)
                if run:
                    used[org] = used.get(org, 0) + 1
            task_runs.append(run)
        return chunk

    @staticmethod
    def _walk(expression: str, zone: str | None, cursor: datetime, now: datetime) -> _Walk:
        try:
            schedule = cron.parse(expression, zone)
            grace = float(cron.grace_seconds(cron.interval_minutes(expression)))
        except cron.CronError:
            return None
        if cursor > now:
            return (cursor,), schedule.next_after(cursor), False, grace
        slots = (cursor, *schedule.fire_times(cursor, until=now, limit=MISSED_PER_TICK - 1))
        return slots, schedule.next_after(slots[-1]), True, grace
