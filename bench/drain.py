"""Executor throughput and schedule precision, measured from the executions table.

    python -m bench.drain --count 20000 --delay-ms 100 [--executors 1] [--mock-workers 2]
    python -m bench.drain --steady 1000/s --duration 30s [--delay-ms 100] [--executors 1]
    common: [--database-url ADMIN_DSN] [--max-per-origin 2000] [--out DIR] [--timeout 600]

Backlog mode (``--count``): with no server running, one SQL statement inserts N one-time tasks
and their N executions, all due, for one organization whose ``max_concurrency`` is raised out of
the way. Then ``runlater serve --http-workers 1 --executors E`` starts, the executors deliver
everything to the mock target (``bench.mock_target``, answering after ``--delay-ms``), and the
run ends when every execution is final. Reported, all from the table: executions/s =
N ÷ (last ``finished_at`` − first ``started_at``), so server start-up is not counted; the
statuses; the peak RSS of each executor process (sampled every 0.2 s from /proc) and the peak
number of running rows; CPU per execution of the executors, PostgreSQL and the mock target.

Steady mode (``--steady R/s``): the server runs first; an inserter adds due executions at R per
second for ``--duration`` (every 10 ms, one statement with ``pg_notify`` like the API's create, so
the executors are woken the same way), then waits until they are final. Reported: lateness
``started_at − scheduled_for`` p50/p99/max, and the rate the inserter actually reached.

The bars (PERFORMANCE.md): ≥ 10,000 executions/s with a 100 ms target; p99 lateness ≤ 100 ms at
1,000/s; executor RSS ≤ 150 MB with 5,000 in flight. Everything runs against 127.0.0.1, stops by
itself, and is removed at the end (server, mock target, database, private PostgreSQL cluster).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.ceiling import BenchError, _on_sigterm, parse_duration, run_text, stop_group, stop_runlater
from bench.idle_connections import children_of, rss_kb
from bench.ladder import (
    GroupCpu,
    listening_pids,
    migrate_and_key,
    drop_database,
    fresh_database,
    pg_settings,
    postgres_server,
    sql_execute,
    sql_fetch,
    sql_value,
    enable_statements,
    start_mock_target,
    top_statements,
    start_server,
)

ROOT = Path(__file__).resolve().parent.parent
FINAL = ("success", "failed", "timeout", "missed")


def log(msg: str) -> None:
    print(f"[drain {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class ExecutorSampler(threading.Thread):
    """Peak VmRSS per executor process (the server's children that hold no listening socket)."""

    def __init__(self, master_pid: int, port: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.master_pid, self.port, self.interval = master_pid, port, interval
        self.peak_kb: dict[int, int] = {}
        self.executors: set[int] = set()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            kids = children_of(self.master_pid)
            http = listening_pids(kids, self.port)
            for pid in kids:
                if pid in http:
                    continue
                self.executors.add(pid)
                kb = rss_kb(pid)
                if kb is not None and kb > self.peak_kb.get(pid, 0):
                    self.peak_kb[pid] = kb
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


INSERT_BACKLOG = """
WITH t AS (
    INSERT INTO tasks (id, organization_id, name, url, method, schedule_type, scheduled_at,
                       retry_attempts, timeout_ms)
    SELECT gen_random_uuid(), $1, 'drain-' || i, $2, 'GET', 'once', now() - interval '1 second', 0, 30000
    FROM generate_series(1, $3) AS i
    RETURNING id, scheduled_at
)
INSERT INTO executions (id, task_id, organization_id, status, scheduled_for, attempt)
SELECT gen_random_uuid(), t.id, $1, 'pending', t.scheduled_at, 1 FROM t
"""

# Steady mode: k rows due now, with the API's wake-up (pg_notify at commit, payload = due epoch).
INSERT_STEADY = """
WITH t AS (
    INSERT INTO tasks (id, organization_id, name, url, method, schedule_type, scheduled_at,
                       retry_attempts, timeout_ms)
    SELECT gen_random_uuid(), $1, 'steady', $2, 'GET', 'once', clock_timestamp(), 0, 30000
    FROM generate_series(1, $3)
    RETURNING id, scheduled_at
), e AS (
    INSERT INTO executions (id, task_id, organization_id, status, scheduled_for, attempt)
    SELECT gen_random_uuid(), t.id, $1, 'pending', t.scheduled_at, 1 FROM t
    RETURNING scheduled_for
)
SELECT pg_notify('runlater_executions', extract(epoch FROM min(scheduled_for))::text) FROM e
"""


@dataclass
class DrainResult:
    mode: str
    count: int
    delay_ms: int
    executors: int
    seconds: float = 0.0  # first started_at → last finished_at
    per_s: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    rss_peak_mb: dict[int, float] = field(default_factory=dict)
    peak_running: int = 0
    executor_us: float | None = None
    db_us: float | None = None
    mock_us: float | None = None
    lateness: dict[str, float | None] = field(default_factory=dict)
    inserted_rate: float | None = None
    notes: list[str] = field(default_factory=list)
    statements: list = field(default_factory=list)  # top pg_stat_statements of the whole run
    server_log_problems: list[str] = field(default_factory=list)
    windows: list[dict] = field(default_factory=list)  # steady mode: lateness per 5 s of schedule


# Steady mode: lateness by when the rows fell due, in 5 s windows from the first (a stall
# shows as one bad window).
WINDOW_LATENESS = """
    SELECT floor(extract(epoch FROM scheduled_for - first.t) / 5)::int * 5 AS from_s,
           count(*) AS n,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50,
           percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99,
           max(ms) AS max
    FROM (SELECT scheduled_for, extract(epoch FROM started_at - scheduled_for) * 1000 AS ms FROM executions) e,
         (SELECT min(scheduled_for) AS t FROM executions) first
    GROUP BY 1 ORDER BY 1"""


def _org(dsn: str) -> object:
    sql_execute(dsn, "UPDATE organizations SET max_concurrency = 1000000 WHERE name = 'bench'")
    return sql_value(dsn, "SELECT id FROM organizations WHERE name = 'bench'")


def _final_count(dsn: str) -> tuple[int, int]:
    row = sql_fetch(dsn, "SELECT count(*) FILTER (WHERE status = ANY($1::text[])) AS final, "
                         "count(*) FILTER (WHERE status = 'running') AS running FROM executions", list(FINAL))[0]
    return int(row["final"]), int(row["running"])


def _wait_final(dsn: str, total: int, timeout: float, sampler: ExecutorSampler, result: DrainResult) -> None:
    started = time.monotonic()
    last_final, last_t = 0, started
    while True:
        final, running = _final_count(dsn)
        result.peak_running = max(result.peak_running, running)
        now = time.monotonic()
        rss = max(sampler.peak_kb.values(), default=0) / 1024
        log(f"{final:,}/{total:,} final, {running:,} running, {(final - last_final) / max(now - last_t, 1e-6):,.0f}/s "
            f"now, executor RSS peak {rss:.0f} MB")
        last_final, last_t = final, now
        if final >= total:
            return
        if now - started > timeout:
            raise BenchError(f"only {final:,} of {total:,} executions final after {timeout:g} s")
        time.sleep(1.0)


def _server_problems(path: Path) -> list[str]:
    text = path.read_text(errors="replace") if path.exists() else ""
    return [ln.strip()[:300] for ln in text.splitlines()
            if re.search(r"\b(ERROR|CRITICAL|Traceback)\b", ln) or (" WARNING " in ln and "open-file limit" not in ln)][:20]


def run(args: argparse.Namespace, workdir: Path) -> tuple[DrainResult, list[tuple[str, str]]]:
    steady = args.steady is not None
    mode = f"steady {args.steady}/s for {args.duration_s} s" if steady else f"backlog of {args.count:,}"
    result = DrainResult(mode, 0 if steady else args.count, args.delay_ms, args.executors)
    admin = args.database_url or os.environ.get("DATABASE_URL")
    dbname = f"runlater_drain_{os.getpid()}"
    env_rows: list[tuple[str, str]] = []
    with postgres_server(admin, keep_log=workdir / "postgresql.log") as (admin_dsn, pg):
        dsn = server = mock = None
        try:
            dsn = fresh_database(admin_dsn, dbname)
            migrate_and_key(dsn)
            statements = enable_statements(dsn)
            for item in args.db_setting:
                name, _, value = item.partition("=")
                if not re.fullmatch(r"[a-z_.]+", name) or not value:
                    raise BenchError(f"--db-setting {item!r}: use name=value")
                sql_execute(dsn, f"ALTER DATABASE \"{dbname}\" SET {name} = '{value.replace(chr(39), '')}'")
            org = _org(dsn)
            mock, mock_url = start_mock_target(args.mock_workers, workdir / "mock-target.log")
            target = f"{mock_url}/hook?delay={args.delay_ms}"
            if not steady:
                log(f"inserting {args.count:,} due executions in one statement")
                t = time.monotonic()
                asyncio.run(_execute(dsn, INSERT_BACKLOG, org, target, args.count))
                sql_execute(dsn, "VACUUM ANALYZE tasks", "VACUUM ANALYZE executions")
                log(f"inserted in {time.monotonic() - t:.1f} s")
            server_env = {"RUNLATER_ALLOW_PRIVATE_TARGETS": "1",
                          "RUNLATER_EXECUTOR_MAX_PER_ORIGIN": str(args.max_per_origin)}
            # The meters start before the server: executors claim as soon as they are up, so
            # their CPU counts from their birth (start-up included, a few hundred ms).
            seen: set[int] = set()
            ex_cpu = GroupCpu(lambda: sorted(seen))
            db_cpu = GroupCpu(pg.pids if pg is not None else lambda: [])
            mock_cpu = GroupCpu(lambda: [mock.pid, *children_of(mock.pid)])
            for m in (ex_cpu, db_cpu, mock_cpu):
                m.start()
            server = start_server(dsn, 1, args.executors, server_env, workdir / "server.log")
            port = int(server.url.rsplit(":", 1)[1])
            sampler = ExecutorSampler(server.proc.pid, port)
            sampler.executors = seen
            sampler.start()
            try:
                if steady:
                    inserted, seconds = asyncio.run(_steady(dsn, org, target, args.steady, args.duration_s))
                    result.count = inserted
                    result.inserted_rate = inserted / seconds
                    log(f"inserted {inserted:,} in {seconds:.1f} s; waiting until all are final")
                _wait_final(dsn, result.count, args.timeout, sampler, result)
            finally:
                for m in (ex_cpu, db_cpu, mock_cpu):
                    m.stop()
                sampler.stop()
            row = sql_fetch(dsn, "SELECT extract(epoch FROM max(finished_at) - min(started_at)) AS s FROM executions")[0]
            result.seconds = float(row["s"] or 0.0)
            result.per_s = result.count / result.seconds if result.seconds else 0.0
            result.statuses = {r["status"]: r["n"] for r in sql_fetch(
                dsn, "SELECT status, count(*) AS n FROM executions GROUP BY 1 ORDER BY 2 DESC")}
            late = sql_fetch(dsn, """
                SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50,
                       percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99, max(ms) AS max
                FROM (SELECT extract(epoch FROM started_at - scheduled_for) * 1000 AS ms FROM executions) s""")[0]
            result.lateness = {k: (None if late[k] is None else float(late[k])) for k in ("p50", "p99", "max")}
            if steady:
                result.windows = [dict(r) for r in sql_fetch(dsn, WINDOW_LATENESS)]
            if statements is None:
                result.statements = top_statements(dsn, 6)
            else:
                result.notes.append(statements)
            result.rss_peak_mb = {pid: kb / 1024 for pid, kb in sorted(sampler.peak_kb.items())}
            n = result.count or 1
            result.executor_us = ex_cpu.seconds * 1e6 / n
            result.db_us = db_cpu.seconds * 1e6 / n if pg is not None else None
            result.mock_us = mock_cpu.seconds * 1e6 / n
            env_rows = [("PostgreSQL", pg_settings(dsn)),
                        ("database", f"private cluster on 127.0.0.1:{pg.port}" if pg else admin_dsn.split("@")[-1]),
                        ("server", f"`runlater serve --http-workers 1 --executors {args.executors}`, "
                                   f"RUNLATER_EXECUTOR_MAX_PER_ORIGIN={args.max_per_origin}, other settings default "
                                   "(RUNLATER_EXECUTOR_MAX_INFLIGHT 5000, claim batch 500)"),
                        ("delivery target", f"`bench.mock_target --workers {args.mock_workers}`, {target}")]
            if args.db_setting:
                env_rows.append(("database settings", ", ".join(f"`{x}`" for x in args.db_setting)))
        finally:
            if server is not None:
                stop_runlater(server)
                result.server_log_problems = _server_problems(server.log_path)
            if mock is not None:
                stop_group(mock, signal.SIGTERM, wait=5, whole_group=True)
            if dsn is not None:
                drop_database(admin_dsn, dbname)
    return result, env_rows


async def _execute(dsn: str, sql: str, *args: object) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(sql, *args, timeout=600)
    finally:
        await conn.close()


async def _steady(dsn: str, org: object, target: str, rate: int, seconds: int) -> tuple[int, float]:
    """Insert due executions at ``rate`` per second for ``seconds``: (rows inserted, seconds taken)."""
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    stmt = await conn.prepare(INSERT_STEADY)
    tick = 0.01
    inserted = 0
    started = time.monotonic()
    next_log = started + 5
    try:
        while True:
            now = time.monotonic()
            elapsed = now - started
            if elapsed >= seconds:
                break
            due = int(rate * min(elapsed + tick, seconds)) - inserted
            if due > 0:
                await stmt.fetchval(org, target, due)
                inserted += due
            if now >= next_log:
                log(f"steady: {inserted:,} inserted, {seconds - elapsed:.0f} s left")
                next_log += 5
            pause = started + (inserted / rate) - time.monotonic()
            await asyncio.sleep(max(0.0, min(tick, pause)))
    finally:
        await conn.close()
    return inserted, time.monotonic() - started


def report(args: argparse.Namespace, r: DrainResult, env: list[tuple[str, str]]) -> str:
    rss = ", ".join(f"{mb:.1f} MB" for mb in r.rss_peak_mb.values()) or "n/a"
    us = lambda v: "n/a" if v is None else f"{v:,.0f}"  # noqa: E731
    late = r.lateness
    ms = lambda v: "n/a" if v is None else f"{v:,.1f} ms"  # noqa: E731
    lines = [f"# Executor {r.mode}, target delay {r.delay_ms} ms, {r.executors} executor(s)", "",
             "| measure | value |", "|---|---|"]
    if r.inserted_rate is not None:
        lines.append(f"| inserted | {r.count:,} at {r.inserted_rate:,.0f}/s |")
    lines += [f"| executions | {r.count:,} |",
              f"| first start → last finish | {r.seconds:.2f} s |",
              f"| executions/s | {r.per_s:,.0f} |",
              f"| lateness p50 / p99 / max | {ms(late.get('p50'))} / {ms(late.get('p99'))} / {ms(late.get('max'))} |",
              f"| statuses | {', '.join(f'{k} {v:,}' for k, v in r.statuses.items())} |",
              f"| peak running rows (sampled every 1 s) | {r.peak_running:,} |",
              f"| executor RSS peak | {rss} |",
              f"| CPU µs per execution: executors / PostgreSQL / mock target | {us(r.executor_us)} / {us(r.db_us)} / "
              f"{us(r.mock_us)} |", ""]
    if r.mode.startswith("backlog"):
        lines.append("Lateness in backlog mode is the time each row waited in the backlog (all were due at the start), "
                     "not schedule precision.")
    lines += [f"- {n}" for n in r.notes]
    if r.windows:
        lines += ["", "Lateness by when the rows fell due (5 s windows from the first):", "",
                  "| due at s | executions | p50 | p99 | max |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {w['from_s']}–{w['from_s'] + 5} | {w['n']:,} | {ms(w['p50'])} | {ms(w['p99'])} | {ms(w['max'])} |"
                  for w in r.windows]
    if r.statements:
        from bench.report import queries_table

        lines += ["", "Top statements over the whole run (pg_stat_statements):", "", queries_table(r.statements)]
    if r.server_log_problems:
        lines += ["", "Server log (errors, warnings):", ""] + [f"- `{p}`" for p in r.server_log_problems]
    rev = run_text(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]) or "unknown"
    lines += ["", "| | |", "|---|---|", f"| git revision | {rev} |", f"| cores | {os.cpu_count()} |",
              f"| load average at end | {' '.join(f'{x:.2f}' for x in os.getloadavg())} |",
              f"| command | `python -m bench.drain {' '.join(args.argv)}` |"]
    lines += [f"| {k} | {v} |" for k, v in env]
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.drain", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--count", type=int, help="backlog mode: this many due executions")
    mode.add_argument("--steady", help="steady mode: insert due executions at this rate, e.g. 1000/s")
    p.add_argument("--duration", default="30s", help="steady mode: how long to insert (default 30s)")
    p.add_argument("--delay-ms", type=int, default=100, help="mock target answer delay (default 100)")
    p.add_argument("--executors", type=int, default=1)
    p.add_argument("--mock-workers", type=int, default=2)
    p.add_argument("--max-per-origin", type=int, default=2000,
                   help="RUNLATER_EXECUTOR_MAX_PER_ORIGIN: every delivery goes to one origin (default 2000)")
    p.add_argument("--database-url", default=None, help="admin DSN (default: DATABASE_URL, else a private cluster)")
    p.add_argument("--db-setting", action="append", default=[], metavar="NAME=VALUE",
                   help="ALTER DATABASE … SET for the benchmark database before the server starts (repeatable)")
    p.add_argument("--timeout", type=float, default=600, help="give up when not all final after this (default 600 s)")
    p.add_argument("--out", type=Path, default=None, help="directory for drain.md and the server log")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    if args.steady is not None:
        m = re.fullmatch(r"(\d+)(/s)?", args.steady.strip())
        if not m or int(m.group(1)) <= 0:
            print("bench.drain: --steady wants a rate like 1000/s", file=sys.stderr)
            return 2
        args.steady = int(m.group(1))
        try:
            args.duration_s = parse_duration(args.duration)
        except argparse.ArgumentTypeError as exc:
            print(f"bench.drain: {exc}", file=sys.stderr)
            return 2
    elif args.count <= 0:
        print("bench.drain: --count must be positive", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sigterm)
    with tempfile.TemporaryDirectory(prefix="runlater-drain-") as tmp:
        workdir = args.out.resolve() if args.out else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            result, env = run(args, workdir)
        except BenchError as exc:
            print(f"bench.drain: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("bench.drain: interrupted; everything started was stopped", file=sys.stderr)
            return 1
        text = report(args, result, env)
    print(text)
    if args.out:
        name = f"drain-steady-{args.steady}.md" if args.steady else f"drain-{args.count}-{args.delay_ms}ms.md"
        (args.out / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
