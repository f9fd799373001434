"""The cron scheduler on a real PostgreSQL: ticks (driven in-process with a fixed clock),
catch-up, monthly limits, exactly-once writes, leadership and failover between
processes, the executor wiring, and cron creates through the API.

Scheduler tests run in a database of their own: a tick handles every due task of its
database, and leadership is an advisory lock, which PostgreSQL scopes per database.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from conftest import ROOT, FreshDatabase, ServerProcess, make_org, run, wait_until
from runlater.db.pool import Database, connect_pool
from runlater.db.queries import Q
from runlater.http.auth import AuthContext
from runlater.http.cron_api import create_cron_task, wants_cron
from runlater.workers.scheduler import SCHEDULER_LOCK_KEY, Scheduler

T = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)  # a minute boundary; every test's "now" is near it
MINUTE = timedelta(minutes=1)
DAY = timedelta(days=1)
MISSED_TEXT = "Scheduler was unavailable at scheduled time"


# --------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sched_dsn(pg_dsn):
    database = FreshDatabase(pg_dsn)
    yield database.dsn
    database.drop()


@pytest.fixture
def dsn(sched_dsn):
    """The scheduler database, emptied of tasks and executions."""
    sql(sched_dsn, "TRUNCATE tasks, executions")
    return sched_dsn


def sql(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    return run(go())


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def add_tasks(dsn: str, org_id: uuid.UUID, count: int, expression: str | None = "* * * * *", *,
              next_run_at: datetime | None = T, inserted_at: datetime = T - DAY, timezone: str | None = None,
              enabled: bool = True, deleted: bool = False, queue: str | None = None,
              callback_url: str | None = None, url: str = "https://example.com/hook") -> list[uuid.UUID]:
    """Insert ``count`` alike tasks in one statement; a cron task when ``expression`` is
    given, else a one-time task the scheduler owns (``next_run_at`` set)."""
    ids = [uuid.uuid4() for _ in range(count)]
    kind = "cron" if expression is not None else "once"
    sql(dsn, """
        INSERT INTO tasks (id, organization_id, name, url, schedule_type, cron_expression, timezone,
                           scheduled_at, enabled, next_run_at, queue, callback_url, deleted_at,
                           inserted_at, updated_at)
        SELECT i, $2, 'task', $11, $3, $4, $5, $6, $7, $8, $9, $10,
               CASE WHEN $12 THEN now() END, $13, $13
        FROM unnest($1::uuid[]) AS i
        """, ids, org_id, kind, expression, timezone, next_run_at if kind == "once" else None, enabled,
        next_run_at, queue, callback_url, url, deleted, inserted_at)
    return ids


def add_task(dsn: str, org_id: uuid.UUID, expression: str | None = "* * * * *", **kw: Any) -> uuid.UUID:
    return add_tasks(dsn, org_id, 1, expression, **kw)[0]


def executions(dsn: str, task_id: uuid.UUID) -> list[asyncpg.Record]:
    return sql(dsn, "SELECT * FROM executions WHERE task_id = $1 ORDER BY scheduled_for, status", task_id)


def cursor(dsn: str, task_id: uuid.UUID) -> datetime | None:
    return sql(dsn, "SELECT next_run_at FROM tasks WHERE id = $1", task_id)[0][0]


def cursors(dsn: str, task_ids: list[uuid.UUID]) -> set[datetime | None]:
    return {r[0] for r in sql(dsn, "SELECT next_run_at FROM tasks WHERE id = ANY($1)", task_ids)}


def tick(dsn: str, now: datetime, writers: int = 0, **kw: Any):
    """One tick at ``now``; with ``writers``, chunk writes go to that many extra sessions."""
    async def go():
        conns = [await asyncpg.connect(dsn) for _ in range(1 + writers)]
        try:
            return await Scheduler(dsn, clock=Clock(now), **kw).tick(conns[0], None, conns[1:] or None)
        finally:
            for c in conns:
                await c.close()

    return run(go())


def set_count(dsn: str, org_id: uuid.UUID, count: int) -> None:
    sql(dsn, "UPDATE organizations SET monthly_execution_count = $2 WHERE id = $1", org_id, count)


# --------------------------------------------------------------------------------------
# One tick
# --------------------------------------------------------------------------------------


class TestTick:
    def test_due_slot_becomes_one_execution_and_the_cursor_advances(self, dsn):
        org = make_org(dsn)
        task = add_task(dsn, org.id, queue="q1", callback_url="https://cb.example.com/x")
        stats = tick(dsn, T - timedelta(seconds=3))
        assert (stats.due, stats.advanced, stats.pending, stats.missed) == (1, 1, 1, 0)
        [e] = executions(dsn, task)
        assert (e["status"], e["scheduled_for"], e["attempt"]) == ("pending", T, 1)
        assert (e["organization_id"], e["queue"], e["callback_url"]) == (org.id, "q1", "https://cb.example.com/x")
        assert e["id"].version == 7
        assert cursor(dsn, task) == T + MINUTE

        # Same instant again: nothing is due any more.
        assert tick(dsn, T - timedelta(seconds=3)).due == 0
        # The next slot, within the lookahead.
        tick(dsn, T + timedelta(seconds=57))
        assert [e["scheduled_for"] for e in executions(dsn, task)] == [T, T + MINUTE]
        assert cursor(dsn, task) == T + 2 * MINUTE

    def test_lookahead_is_inclusive_and_bounded(self, dsn):
        org = make_org(dsn)
        edge = add_task(dsn, org.id, next_run_at=T + timedelta(seconds=5))
        later = add_task(dsn, org.id, next_run_at=T + timedelta(seconds=6))
        tick(dsn, T)
        assert len(executions(dsn, edge)) == 1
        assert executions(dsn, later) == [] and cursor(dsn, later) == T + timedelta(seconds=6)

    def test_slow_ticks_widen_the_lookahead(self, dsn):
        org = make_org(dsn)
        task = add_task(dsn, org.id, next_run_at=T + timedelta(seconds=15))
        scheduler = Scheduler(dsn, clock=Clock(T))
        assert scheduler.effective_lookahead() == timedelta(seconds=5)
        scheduler.slow_tick = 8.0  # a tick that took 8 s: look 16 s ahead
        assert scheduler.effective_lookahead() == timedelta(seconds=16)
        scheduler.slow_tick = 100.0
        assert scheduler.effective_lookahead() == timedelta(seconds=30)

        async def go() -> None:
            conn = await asyncpg.connect(dsn)
            try:
                await scheduler.tick(conn)
            finally:
                await conn.close()

        run(go())
        assert [e["scheduled_for"] for e in executions(dsn, task)] == [T + timedelta(seconds=15)]
        assert scheduler.slow_tick == pytest.approx(99.0, rel=0.01)  # decays by 1 % per quick tick

    def test_disabled_deleted_and_unscheduled_tasks_are_left_alone(self, dsn):
        org = make_org(dsn)
        tasks = [add_task(dsn, org.id, enabled=False), add_task(dsn, org.id, deleted=True),
                 add_task(dsn, org.id, next_run_at=None)]
        assert tick(dsn, T).due == 0
        for task in tasks:
            assert executions(dsn, task) == []

    def test_time_zone_of_the_task(self, dsn):
        org = make_org(dsn)
        # 09:00 in Berlin on the Saturday before the 2030 spring change (CET, 08:00Z);
        # the next one is 09:00 CEST, 07:00Z.
        slot = datetime(2030, 3, 30, 8, 0, tzinfo=UTC)
        task = add_task(dsn, org.id, "0 9 * * *", timezone="Europe/Berlin", next_run_at=slot)
        tick(dsn, slot - timedelta(seconds=2))
        assert [e["scheduled_for"] for e in executions(dsn, task)] == [slot]
        assert cursor(dsn, task) == datetime(2030, 3, 31, 7, 0, tzinfo=UTC)

    @pytest.mark.parametrize("writers", [0, 2])
    def test_many_tasks_in_chunks(self, dsn, writers):
        org = make_org(dsn)
        tasks = add_tasks(dsn, org.id, 20, "*/5 * * * *")
        stats = tick(dsn, T - timedelta(seconds=1), writers, chunk_size=7)
        assert (stats.chunks, stats.due, stats.pending) == (3, 20, 20)
        rows = sql(dsn, "SELECT task_id, scheduled_for FROM executions")
        assert sorted(r["task_id"] for r in rows) == sorted(tasks)
        assert {r["scheduled_for"] for r in rows} == {T}
        assert cursors(dsn, tasks) == {T + 5 * MINUTE}

    def test_executors_are_notified_of_the_earliest_slot(self, dsn):
        org = make_org(dsn)
        add_task(dsn, org.id, next_run_at=T + timedelta(seconds=2))

        async def go() -> str:
            listener = await asyncpg.connect(dsn)
            conn = await asyncpg.connect(dsn)
            got: asyncio.Queue[str] = asyncio.Queue()
            try:
                await listener.add_listener("runlater_executions", lambda *a: got.put_nowait(a[3]))
                await Scheduler(dsn, clock=Clock(T)).tick(conn)
                return await asyncio.wait_for(got.get(), 10)
            finally:
                await conn.close()
                await listener.close()

        assert float(run(go())) == (T + timedelta(seconds=2)).timestamp()

    def test_scheduler_owned_one_time_task_runs_once(self, dsn):
        org = make_org(dsn)
        task = add_task(dsn, org.id, None, next_run_at=T + timedelta(seconds=3))
        tick(dsn, T)
        assert [(e["status"], e["scheduled_for"]) for e in executions(dsn, task)] == [("pending", T + timedelta(seconds=3))]
        assert cursor(dsn, task) is None

    def test_an_expression_that_cannot_be_evaluated_unschedules_only_its_task(self, dsn):
        org = make_org(dsn)
        bad = add_task(dsn, org.id, "@reboot")
        good = add_task(dsn, org.id)
        stats = tick(dsn, T)
        assert executions(dsn, bad) == [] and cursor(dsn, bad) is None
        assert len(executions(dsn, good)) == 1
        assert stats.advanced == 2


class TestCatchUp:
    def test_three_minutes_down(self, dsn):
        org = make_org(dsn)
        task = add_task(dsn, org.id, next_run_at=T - 3 * MINUTE, queue="q", callback_url="https://cb.example.com")
        now = T + timedelta(seconds=10)
        stats = tick(dsn, now)
        rows = executions(dsn, task)
        assert [(e["status"], e["scheduled_for"]) for e in rows] == [
            ("missed", T - 3 * MINUTE), ("missed", T - 2 * MINUTE), ("missed", T - MINUTE), ("pending", T)]
        for e in rows[:3]:
            assert (e["error_message"], e["finished_at"], e["queue"], e["callback_url"]) == (MISSED_TEXT, now, None, None)
            assert e["started_at"] is None and e["attempt"] == 1
        assert (rows[3]["queue"], rows[3]["finished_at"]) == ("q", None)
        assert cursor(dsn, task) == T + MINUTE > now
        assert (stats.pending, stats.missed) == (1, 3)

    def test_last_slot_past_the_grace_period_is_missed_too(self, dsn):
        org = make_org(dsn)
        task = add_task(dsn, org.id, next_run_at=T - 2 * MINUTE)
        tick(dsn, T + timedelta(seconds=30))  # every-minute grace: 30 s, exclusive
        assert [e["status"] for e in executions(dsn, task)] == ["missed"] * 3
        assert cursor(dsn, task) == T + MINUTE

    def test_grace_grows_with_the_interval(self, dsn):
        org = make_org(dsn)
        hourly = add_task(dsn, org.id, "0 * * * *", next_run_at=T - timedelta(hours=3))
        tick(dsn, T + timedelta(minutes=29))  # grace: 30 min
        assert [e["status"] for e in executions(dsn, hourly)] == ["missed"] * 3 + ["pending"]
        assert executions(dsn, hourly)[-1]["scheduled_for"] == T

    def test_at_most_100_missed_per_task_per_tick(self, dsn):
        org = make_org(dsn)
        task = add_task(dsn, org.id, next_run_at=T - 250 * MINUTE)
        counts = []
        for _ in range(3):
            stats = tick(dsn, T, writers=2, chunk_size=1)
            counts.append((stats.missed, stats.pending))
        assert counts == [(100, 0), (100, 0), (50, 1)]
        rows = executions(dsn, task)
        assert len({e["scheduled_for"] for e in rows}) == len(rows) == 251
        assert cursor(dsn, task) == T + MINUTE
        assert tick(dsn, T).due == 0

    def test_no_backfill_before_the_task_existed(self, dsn):
        org = make_org(dsn)
        task = add_task(dsn, org.id, next_run_at=T - 2 * MINUTE, inserted_at=T - timedelta(seconds=30))
        tick(dsn, T + timedelta(seconds=10))
        assert [(e["status"], e["scheduled_for"]) for e in executions(dsn, task)] == [("pending", T)]

    def test_cursor_advances_even_when_every_slot_predates_the_task(self, dsn):
        org = make_org(dsn)
        task = add_task(dsn, org.id, next_run_at=T - 2 * MINUTE, inserted_at=T + timedelta(seconds=5))
        tick(dsn, T + timedelta(seconds=10))
        assert executions(dsn, task) == []
        assert cursor(dsn, task) == T + MINUTE


class TestMonthlyLimits:
    def test_free_org_at_its_limit_skips_upcoming_and_misses_overdue(self, dsn):
        org = make_org(dsn, tier="free")
        set_count(dsn, org.id, 10_000)
        upcoming = add_task(dsn, org.id, "0 * * * *", next_run_at=T)
        # Late by less than its grace (30 min): it would run, but the limit says no.
        overdue = add_task(dsn, org.id, "30 * * * *", next_run_at=T - timedelta(minutes=30))
        stats = tick(dsn, T - timedelta(seconds=2))
        assert executions(dsn, upcoming) == []
        assert cursor(dsn, upcoming) == T + timedelta(hours=1)
        assert [(e["status"], e["error_message"]) for e in executions(dsn, overdue)] == [("missed", MISSED_TEXT)]
        assert cursor(dsn, overdue) == T + timedelta(minutes=30)
        assert (stats.pending, stats.missed, stats.skipped) == (0, 1, 1)

    def test_the_tick_counts_what_it_creates(self, dsn):
        org = make_org(dsn, tier="free")
        set_count(dsn, org.id, 9_998)
        tasks = add_tasks(dsn, org.id, 5, "0 * * * *")
        stats = tick(dsn, T - timedelta(seconds=1))
        assert (stats.pending, stats.skipped) == (2, 3)
        assert sql(dsn, "SELECT count(*) FROM executions WHERE task_id = ANY($1)", tasks)[0][0] == 2
        assert cursors(dsn, tasks) == {T + timedelta(hours=1)}

    def test_created_runs_count_toward_the_month_at_once(self, dsn):
        """Scheduled runs are added to execution_usage (the API's quota figure) when they are
        created, not only once executors finish them; missed slots are not counted."""
        org = make_org(dsn, tier="free")
        add_tasks(dsn, org.id, 3, "0 * * * *")
        add_task(dsn, org.id, "0 * * * *", next_run_at=T - timedelta(hours=2))  # two slots missed

        def counts() -> tuple[dict[str, int], list[tuple[Any, int]]]:
            statuses = dict(sql(dsn, "SELECT status, count(*) FROM executions WHERE organization_id = $1 GROUP BY 1",
                                org.id))
            usage = [tuple(r) for r in sql(dsn, "SELECT month, created FROM execution_usage "
                                                "WHERE organization_id = $1 ORDER BY month", org.id)]
            return statuses, usage

        tick(dsn, T - timedelta(seconds=1))
        statuses, usage = counts()
        assert statuses.get("missed", 0) >= 1 and statuses["pending"] >= 3, statuses
        assert usage == [(T.date().replace(day=1), statuses["pending"])]
        first = statuses["pending"]
        tick(dsn, T + timedelta(hours=1) - timedelta(seconds=1))
        statuses, usage = counts()
        assert statuses["pending"] > first
        assert usage == [(T.date().replace(day=1), statuses["pending"])]

    def test_pro_limit_and_unlimited(self, dsn):
        pro = make_org(dsn, tier="pro")
        set_count(dsn, pro.id, 1_000_000)
        unlimited = make_org(dsn, tier="unlimited")
        set_count(dsn, unlimited.id, 10**12)
        pro_task = add_task(dsn, pro.id)
        unlimited_task = add_task(dsn, unlimited.id)
        tick(dsn, T - timedelta(seconds=2))
        assert executions(dsn, pro_task) == []
        assert len(executions(dsn, unlimited_task)) == 1

    def test_other_orgs_are_not_held_back(self, dsn):
        full = make_org(dsn, tier="free")
        set_count(dsn, full.id, 10_000)
        fine = make_org(dsn, tier="free")
        add_task(dsn, full.id, "0 * * * *")
        task = add_task(dsn, fine.id, "0 * * * *")
        tick(dsn, T)
        assert len(executions(dsn, task)) == 1


class TestExactlyOnce:
    def test_concurrent_ticks_write_each_slot_once(self, dsn):
        org = make_org(dsn)
        tasks = add_tasks(dsn, org.id, 300)

        async def go() -> list[int]:
            conns = [await asyncpg.connect(dsn) for _ in range(4)]
            advanced = []
            try:
                for minute in range(3):
                    clock = Clock(T + minute * MINUTE - timedelta(seconds=2))
                    pair = [Scheduler(dsn, clock=clock, chunk_size=50), Scheduler(dsn, clock=clock, chunk_size=70)]
                    results = await asyncio.gather(pair[0].tick(conns[0], None, conns[2:4]),
                                                   pair[1].tick(conns[1]))
                    advanced.append(sum(r.advanced for r in results))
            finally:
                for c in conns:
                    await c.close()
            return advanced

        assert run(go()) == [300, 300, 300]
        rows = sql(dsn, "SELECT task_id, scheduled_for, count(*) AS n FROM executions GROUP BY 1, 2")
        assert len(rows) == 900 and {r["n"] for r in rows} == {1}
        assert cursors(dsn, tasks) == {T + 3 * MINUTE}

    def test_a_schedule_edited_after_the_read_is_not_written(self, dsn):
        org = make_org(dsn)
        task = add_task(dsn, org.id)

        async def go() -> int:
            conn = await asyncpg.connect(dsn)
            try:
                scheduler = Scheduler(dsn, clock=Clock(T))
                rows = await conn.fetch(Q.scheduler_due_tasks, T + timedelta(seconds=5),
                                        datetime(1, 1, 2, tzinfo=UTC), uuid.UUID(int=0), 100)
                chunk = scheduler.plan(rows, T, {}, {})
                # The API changes the expression but the new first run lands on the same cursor.
                await conn.execute("UPDATE tasks SET cron_expression = '0 * * * *' WHERE id = $1", task)
                result = await conn.fetchrow(Q.scheduler_advance, *chunk.args(T))
                return result["advanced"]
            finally:
                await conn.close()

        assert run(go()) == 0
        assert executions(dsn, task) == [] and cursor(dsn, task) == T
        tick(dsn, T)  # the next tick works from the new expression
        assert cursor(dsn, task) == T + timedelta(hours=1)


# --------------------------------------------------------------------------------------
# Leadership
# --------------------------------------------------------------------------------------


def lock_holders(dsn: str) -> list[str]:
    rows = sql(dsn, """
        SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND l.granted
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND l.classid::bigint = $1 AND l.objid::bigint = $2
        """, SCHEDULER_LOCK_KEY >> 32, SCHEDULER_LOCK_KEY & 0xFFFFFFFF)
    return [r[0] for r in rows]


async def until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


class TestLeadership:
    def test_one_leader_and_handover_on_stop(self, dsn):
        async def go() -> None:
            stops = [asyncio.Event(), asyncio.Event()]
            schedulers = [Scheduler(dsn, name=f"s{i}", tick_interval=0.05, retry_interval=0.05) for i in range(2)]
            runs = [asyncio.create_task(s.run(stop)) for s, stop in zip(schedulers, stops)]
            try:
                await until(lambda: any(s.leader for s in schedulers) and max(s.ticks for s in schedulers) >= 2)
                leader = next(i for i, s in enumerate(schedulers) if s.leader)
                other = 1 - leader
                assert not schedulers[other].leader and schedulers[other].ticks == 0
                assert await asyncio.to_thread(lock_holders, dsn) == [f"runlater-s{leader}"]
                stops[leader].set()
                await runs[leader]
                await until(lambda: schedulers[other].leader and schedulers[other].ticks >= 1)
            finally:
                for stop in stops:
                    stop.set()
                await asyncio.gather(*runs)

        run(go())
        assert lock_holders(dsn) == []

    def test_notify_wakes_the_leader(self, dsn):
        org = make_org(dsn)

        async def go() -> None:
            stop = asyncio.Event()
            scheduler = Scheduler(dsn, tick_interval=300, retry_interval=0.05)
            running = asyncio.create_task(scheduler.run(stop))
            try:
                await until(lambda: scheduler.ticks >= 1)
                due = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
                task = await asyncio.to_thread(add_task, dsn, org.id, next_run_at=due)
                await asyncio.to_thread(sql, dsn, "SELECT pg_notify('runlater_scheduler', $1)",
                                        str(int(due.timestamp())))
                await until(lambda: scheduler.ticks >= 2)
                assert [e["scheduled_for"] for e in await asyncio.to_thread(executions, dsn, task)] == [due]
            finally:
                stop.set()
                await running

        run(go())


FAILOVER_SCRIPT = """
import asyncio, signal, sys, time
from datetime import UTC, datetime, timedelta
from runlater.workers.scheduler import Scheduler

dsn, name, t0, r0 = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
start = datetime.fromtimestamp(t0, UTC)

def clock():
    # Virtual time at 60x: a cron minute passes every real second.
    return start + timedelta(seconds=(time.time() - r0) * 60)

async def main():
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await Scheduler(dsn, name=name, tick_interval=0.03, retry_interval=0.1, clock=clock).run(stop)

asyncio.run(main())
"""


@pytest.mark.slow
def test_failover_after_kill_9(dsn):
    """Two scheduler processes; kill -9 the leader; the other takes over and every slot
    keeps being written exactly once (pending, or missed if the gap outlasted the grace)."""
    org = make_org(dsn)
    t0 = T.timestamp()
    tasks = add_tasks(dsn, org.id, 20, next_run_at=T + MINUTE)
    r0 = time.time()
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = {name: subprocess.Popen([sys.executable, "-c", FAILOVER_SCRIPT, dsn, name, str(t0), str(r0)],
                                    cwd=ROOT, env=env)
             for name in ("sa", "sb")}

    def slots() -> int:
        return sql(dsn, "SELECT count(*) FROM executions")[0][0]

    try:
        holders = wait_until(lambda: lock_holders(dsn), timeout=20)
        first = holders[0].removeprefix("runlater-")
        wait_until(lambda: slots() >= 3 * len(tasks), timeout=20)
        procs[first].send_signal(signal.SIGKILL)
        procs[first].wait(10)
        second = "sb" if first == "sa" else "sa"
        wait_until(lambda: lock_holders(dsn) == [f"runlater-{second}"], timeout=20)
        after = slots()
        wait_until(lambda: slots() >= after + 3 * len(tasks), timeout=20)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    assert procs[second].returncode == 0

    rows = sql(dsn, "SELECT task_id, scheduled_for, status FROM executions ORDER BY task_id, scheduled_for")
    by_task: dict[uuid.UUID, list[datetime]] = {}
    for r in rows:
        by_task.setdefault(r["task_id"], []).append(r["scheduled_for"])
    assert set(by_task) == set(tasks)
    for times in by_task.values():
        assert len(times) == len(set(times)), "a slot was written twice"
        # Every minute from the first slot on, without a gap across the failover.
        assert times == [T + MINUTE * (i + 1) for i in range(len(times))]
    assert lock_holders(dsn) == []


# --------------------------------------------------------------------------------------
# Wiring: the executor process runs the scheduler
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_executor_process_runs_the_scheduler(dsn):
    org = make_org(dsn)
    srv = ServerProcess(dsn, http_workers=1, executors=1)
    try:
        srv.wait_ready()
        due = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
        task = add_task(dsn, org.id, next_run_at=due, url="http://127.0.0.1:9/closed")
        wait_until(lambda: executions(dsn, task), timeout=20)
        assert [e["scheduled_for"] for e in executions(dsn, task)] == [due]
        assert cursor(dsn, task) == due.replace(second=0) + MINUTE
    finally:
        assert srv.stop() == 0
    assert lock_holders(dsn) == []


# --------------------------------------------------------------------------------------
# Cron create: the API glue, and the whole route on a real server
# --------------------------------------------------------------------------------------

FREE_MESSAGE = "Free plan only allows hourly or less frequent schedules. Upgrade to Pro for per-minute scheduling."


def test_wants_cron():
    assert wants_cron({"cron": ""}) and wants_cron({"cron": 0}) and wants_cron({"cron": "@daily"})
    assert not wants_cron({}) and not wants_cron({"cron": None}) and not wants_cron({"cron": False})


def test_create_cron_task_glue(dsn):
    free = make_org(dsn, tier="free")
    now = datetime.now(UTC)

    async def go() -> tuple[Any, ...]:
        pool = await connect_pool(dsn, size=2, application_name="test-cron-api")
        db = Database(pool)
        ctx = AuthContext(uuid.uuid4(), free.id, "free")
        try:
            ok = await create_cron_task(db, ctx, {"url": "https://example.com/h", "cron": "0 9 * * *",
                                                  "timezone": "America/New_York"}, now)
            refused = await create_cron_task(db, ctx, {"url": "https://example.com/h", "cron": "* * * * *"}, now)
            return ok, refused
        finally:
            await db.close()

    ok, refused = run(go())
    assert ok.status == 201
    body = orjson.loads(ok.body)
    assert body["message"] == "Cron task created"
    data = body["data"]
    assert (data["schedule_type"], data["cron_expression"], data["method"], data["name"]) == (
        "cron", "0 9 * * *", "GET", "Cron: https://example.com/h")
    from runlater.core import cron

    expected = cron.parse("0 9 * * *", "America/New_York").next_after(now)
    assert data["next_run_at"] == expected.strftime("%Y-%m-%dT%H:%M:%SZ")
    [row] = sql(dsn, "SELECT timezone, interval_minutes, next_run_at, organization_id FROM tasks WHERE id = $1",
                uuid.UUID(data["id"]))
    assert (row["timezone"], row["interval_minutes"], row["next_run_at"], row["organization_id"]) == (
        "America/New_York", 1440, expected, free.id)
    assert refused.status == 422
    assert orjson.loads(refused.body) == {
        "error": {"code": "validation_error", "details": {"cron_expression": [FREE_MESSAGE]}}}


_API_ROUTES_CRON = "cron_api" in (Path(ROOT) / "runlater" / "http" / "api.py").read_text()


@pytest.fixture(scope="module")
def srv(sched_dsn):
    server = ServerProcess(sched_dsn, http_workers=1, executors=0)
    server.wait_ready()
    yield server
    server.stop()


@pytest.mark.skipif(not _API_ROUTES_CRON, reason="api.py does not route cron creates to cron_api yet")
class TestCronCreateOverHttp:

    def test_created(self, srv, dsn):
        org = make_org(dsn, tier="free")
        api = srv.client().with_key(org.key)
        before = datetime.now(UTC)
        status, _, body = api.post("/api/v1/tasks", {"url": "https://example.com/hook", "cron": "0 * * * *",
                                                      "name": "hourly", "on_failure_url": "https://f.example.com"})
        assert status == 201, body
        assert body["message"] == "Cron task created"
        data = body["data"]
        assert (data["schedule_type"], data["cron_expression"], data["name"]) == ("cron", "0 * * * *", "hourly")
        assert data["on_failure_url"] == "https://f.example.com" and data["scheduled_at"] is None
        next_hour = (before.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1))
        assert data["next_run_at"] == next_hour.strftime("%Y-%m-%dT%H:%M:%SZ")
        status, _, shown = api.get(f"/api/v1/tasks/{data['id']}")
        assert status == 200 and shown["data"] == data

    def test_free_tier_every_minute_is_refused(self, srv, dsn):
        org = make_org(dsn, tier="free")
        status, _, body = srv.client().with_key(org.key).post(
            "/api/v1/tasks", {"url": "https://example.com/hook", "cron": "* * * * *"})
        assert status == 422
        assert body == {"error": {"code": "validation_error", "details": {"cron_expression": [FREE_MESSAGE]}}}

    def test_invalid_expression(self, srv, dsn):
        org = make_org(dsn)
        status, _, body = srv.client().with_key(org.key).post(
            "/api/v1/tasks", {"url": "https://example.com/hook", "cron": "@reboot"})
        assert status == 422
        assert body["error"]["details"] == {"cron_expression": ["is not a valid cron expression"]}
