"""Database cost of the create path's batch insert, without HTTP in the way.

    python -m bench.insert_cost [--batch 15,100] [--connections 2] [--seconds 5] [--database-url DSN]

Runs ``create_once_batch`` (the statement the HTTP workers' batcher sends) back to back on
``--connections`` connections with runlater's session settings, for each batch size, and
reports rows/s and the PostgreSQL backends' CPU per row (utime+stime from /proc, so the
database must run on this machine). Each batch size gets a fresh database. The default is a
private cluster; ``--database-url`` (or DATABASE_URL) names an admin DSN instead.

The batch size is what matters: the API ceiling's batches average ~15 rows at 64 client
connections, a backlog fills them to hundreds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from datetime import UTC, datetime

from bench.ceiling import BenchError, cpu_seconds
from bench.ladder import drop_database, fresh_database, migrate_and_key, postgres_server, sql_value

WARMUP_S = 1.0


def log(msg: str) -> None:
    print(f"[insert_cost {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _backends_cpu(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) or 0.0 for pid in pids)


def _columns(org: uuid.UUID, n: int, now: datetime) -> tuple[list, ...]:
    return ([uuid.uuid4() for _ in range(n)], [uuid.uuid4() for _ in range(n)], [org] * n, ["bench"] * n,
            ["https://example.com/hook"] * n, ["POST"] * n, ["{}"] * n, ['{"a":1}'] * n, [now] * n,
            [30000] * n, [5] * n, [None] * n, [None] * n, [None] * n, [None] * n, [None] * n, [None] * n,
            [None] * n, [None] * n)


async def measure(dsn: str, org: uuid.UUID, batch: int, connections: int, seconds: float) -> tuple[float, float]:
    """(rows/s, backend CPU µs per row) over ``seconds`` after a warm-up."""
    import asyncpg

    from runlater.db.pool import SESSION_SETTINGS
    from runlater.db.queries import Q

    stop = asyncio.Event()
    rows = [0]
    pids: list[int] = []

    async def insert_loop() -> None:
        conn = await asyncpg.connect(dsn, server_settings=dict(SESSION_SETTINGS))
        try:
            pids.append(await conn.fetchval("SELECT pg_backend_pid()"))
            stmt = await conn.prepare(Q.create_once_batch)
            now = datetime.now(UTC).replace(microsecond=0)
            while not stop.is_set():
                await stmt.fetch(*_columns(org, batch, now))
                rows[0] += batch
        finally:
            await conn.close()

    loops = [asyncio.create_task(insert_loop()) for _ in range(connections)]
    try:
        await asyncio.sleep(WARMUP_S)
        cpu0, rows0, t0 = _backends_cpu(pids), rows[0], time.perf_counter()
        await asyncio.sleep(seconds)
        cpu1, rows1, t1 = _backends_cpu(pids), rows[0], time.perf_counter()
    finally:
        stop.set()
        await asyncio.gather(*loops)
    done = rows1 - rows0
    if not done:
        raise BenchError("no rows inserted during the measurement")
    return done / (t1 - t0), (cpu1 - cpu0) * 1e6 / done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.insert_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", default="15,100", help="rows per statement, comma-separated (default 15,100)")
    p.add_argument("--connections", type=int, default=2)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--database-url", default=None, help="admin DSN (default: DATABASE_URL, else a private cluster)")
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.batch.split(",") if x.strip()]
    admin = args.database_url or os.environ.get("DATABASE_URL")
    name = f"runlater_insert_cost_{os.getpid()}"
    lines = ["| rows per statement | connections | rows/s | PostgreSQL CPU µs/row |", "|---:|---:|---:|---:|"]
    try:
        with postgres_server(admin) as (admin_dsn, _pg):
            for size in sizes:
                dsn = fresh_database(admin_dsn, name)
                try:
                    migrate_and_key(dsn)
                    org = sql_value(dsn, "SELECT id FROM organizations WHERE name = 'bench'")
                    log(f"batches of {size} on {args.connections} connection(s) for {args.seconds:g} s")
                    rate, us = asyncio.run(measure(dsn, org, size, args.connections, args.seconds))
                    lines.append(f"| {size} | {args.connections} | {rate:,.0f} | {us:.1f} |")
                    log(f"  {rate:,.0f} rows/s, {us:.1f} µs of PostgreSQL CPU per row")
                finally:
                    drop_database(admin_dsn, name)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
