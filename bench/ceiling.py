"""The API ceiling: runlater under wrk's seed mix, against nginx serving a static 202, same run.

    python -m bench.ceiling [--duration 20s] [--connections 64] [--threads 2] [--http-workers 2]
                            [--database-url URL] [--no-batch | --both] [--idle N] [--split]
                            [--profile] [--out DIR]

What one invocation does (see bench/README.md for the why):

1. creates the database ``runlater_bench`` from scratch on the admin DSN (``--database-url``,
   else ``DATABASE_URL``, else ``postgresql://postgres@127.0.0.1:5432/postgres``), runs
   ``runlater migrate`` and ``runlater keys create --org bench`` against it;
2. starts ``runlater serve --executors 0`` (API only: executors would compete for the two cores)
   and waits for its ``listening on`` line;
3. warms up for 3 s, then runs wrk with ``bench/wrk/seed_mix.lua`` for ``--duration`` while
   sampling the RSS of every HTTP worker; stops the server and drops the database;
4. with ``--both``, repeats 1-3 with batching forced off (every create its own transaction);
5. starts nginx on the generated ``bench/nginx/static202.conf.tmpl`` and runs the same wrk command
   (same Lua, so the request bytes are the same) against it;
   With ``--split``, the same server then takes create-only, list-only and 404-only loads, so the
   CPU each kind of request costs the server and PostgreSQL is measured apart;
6. with ``--idle N``, starts a fresh server with a long keep-alive timeout and runs
   ``bench.idle_connections`` against it;
7. with ``--profile``, one more loaded run of the batching-on server with py-spy recording one
   HTTP worker (a separate run, because py-spy's sampling slows the process it samples).

It prints progress on stderr and a Markdown report on stdout (and in ``--out DIR/ceiling.md``).
Every process it starts lives in its own process group and is stopped in a ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from bench.idle_connections import IdleResult, children_of, raise_nofile, rss_kb, run_idle

ROOT = Path(__file__).resolve().parent.parent
LUA = ROOT / "bench" / "wrk" / "seed_mix.lua"
NGINX_TEMPLATE = ROOT / "bench" / "nginx" / "static202.conf.tmpl"
DEFAULT_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
BENCH_DB = "runlater_bench"
WARMUP_S = 3
# The seed mix's fixed 20-slot pattern holds 17 creates (14 immediate + 3 delayed) and 3 lists.
CREATE_SHARE = 17 / 20

# The "batching forced off" configuration: one row per INSERT statement and transaction, and as
# many concurrent inserts as the pool allows while leaving one connection for reads.
NO_BATCH_ENV = {"RUNLATER_BATCH_MAX_ROWS": "1", "RUNLATER_BATCH_MAX_INFLIGHT": "7", "RUNLATER_DB_POOL_SIZE": "8"}
IDLE_KEEPALIVE_S = "120"


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a process (all its threads) so far, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14 and 15 of stat)


def runqueue_seconds(pid: int) -> float | None:
    """Time the process spent runnable but waiting for a CPU (schedstat's second field)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


class CpuMeter:
    """CPU seconds a set of processes used between start() and stop().

    On a shared machine req/s moves with whatever else runs; the CPU each request costs the
    server, the database and wrk moves much less, so the report shows both.
    """

    def __init__(self) -> None:
        self.start_cpu: dict[int, float] = {}
        self.start_wait: dict[int, float] = {}
        self.cpu = 0.0
        self.wait = 0.0

    def start(self, pids: list[int]) -> None:
        for pid in pids:
            c, w = cpu_seconds(pid), runqueue_seconds(pid)
            if c is not None:
                self.start_cpu[pid] = c
            if w is not None:
                self.start_wait[pid] = w

    def stop(self) -> None:
        for pid, c0 in self.start_cpu.items():
            c1 = cpu_seconds(pid)
            if c1 is not None:
                self.cpu += c1 - c0
        for pid, w0 in self.start_wait.items():
            w1 = runqueue_seconds(pid)
            if w1 is not None:
                self.wait += w1 - w0


def children_cpu() -> float:
    """CPU of this process's reaped children: wrk's share is the change across one run."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


class BenchError(Exception):
    """A reason to stop, reported as one line."""


def log(msg: str) -> None:
    print(f"[ceiling {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Small helpers


def parse_duration(text: str) -> int:
    """wrk-style duration (``20s``, ``2m``, ``1h``, bare seconds) to whole seconds."""
    m = re.fullmatch(r"\s*(\d+)\s*([smh]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: use e.g. 20s or 2m")
    seconds = int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
    if seconds < 1:
        raise argparse.ArgumentTypeError("duration must be at least 1 s")
    return seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


def run_text(cmd: list[str], **kw) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False, **kw)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (out.stdout + out.stderr).strip()


def stop_group(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, wait: float = 15.0,
               whole_group: bool = False) -> int | None:
    """Stop a process started with start_new_session: ``sig`` first, SIGKILL to its group after.

    By default ``sig`` goes to the leader only: runlater's master must be the one to stop its
    workers (it drains them in order); signalling the whole group would race that. Whatever is
    left in the group after ``wait`` seconds is killed, so nothing outlives the benchmark.
    """
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            if whole_group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            log(f"pid {proc.pid} still running {wait:g} s after signal {sig}; killing its group")
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        return proc.wait(5)
    except subprocess.TimeoutExpired:
        return None


# --------------------------------------------------------------------------------------------
# Database


async def _admin(dsn: str, *statements: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


async def _fetchval(dsn: str, sql: str):  # type: ignore[no-untyped-def]
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def recreate_database(admin_dsn: str) -> str:
    try:
        asyncio.run(_admin(admin_dsn, f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)", f"CREATE DATABASE {BENCH_DB}"))
    except Exception as exc:  # noqa: BLE001
        raise BenchError(f"cannot create database {BENCH_DB} via {admin_dsn}: {exc}") from exc
    return with_database(admin_dsn, BENCH_DB)


def drop_database(admin_dsn: str) -> None:
    try:
        asyncio.run(_admin(admin_dsn, f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)"))
    except Exception as exc:  # noqa: BLE001 - cleanup must not mask the real error
        log(f"could not drop {BENCH_DB}: {exc}")


def count_tasks(dsn: str) -> int:
    return int(asyncio.run(_fetchval(dsn, "SELECT count(*) FROM tasks")))


def settled_task_count(dsn: str, limit: float = 10.0) -> int:
    """The task count once it stops moving: requests wrk left in flight still commit after it exits."""
    deadline = time.monotonic() + limit
    last = count_tasks(dsn)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = count_tasks(dsn)
        if now == last:
            return now
        last = now
    return last


def runlater_cmd(*args: str) -> list[str]:
    # The interpreter running this script, so a venv's runlater is used without activating it.
    return [sys.executable, "-m", "runlater", *args]


def prepare_database(admin_dsn: str) -> tuple[str, str]:
    """Fresh database, migrated, with one API key for org ``bench``: (dsn, key)."""
    dsn = recreate_database(admin_dsn)
    env = {**os.environ, "DATABASE_URL": dsn}
    mig = subprocess.run(runlater_cmd("migrate"), env=env, capture_output=True, text=True, timeout=120, check=False)
    if mig.returncode:
        raise BenchError(f"runlater migrate failed: {(mig.stderr or mig.stdout).strip().splitlines()[-1:]}")
    keys = subprocess.run(runlater_cmd("keys", "create", "--org", "bench"), env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    key = keys.stdout.strip().splitlines()[-1] if keys.stdout.strip() else ""
    if keys.returncode or not key.startswith("pk_live_"):
        raise BenchError(f"runlater keys create failed: {(keys.stderr or keys.stdout).strip()[-300:]}")
    return dsn, key


# --------------------------------------------------------------------------------------------
# Servers


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log_path: Path
    log_file: object = None

    @property
    def workers(self) -> list[int]:
        return children_of(self.proc.pid)


def start_runlater(dsn: str, port: int, http_workers: int, extra_env: dict[str, str], log_path: Path,
                   executors: int = 0) -> Server:
    """``runlater serve`` (API only unless ``executors``), waiting for its ``listening on`` line."""
    env = {**os.environ, "DATABASE_URL": dsn, **extra_env}
    cmd = runlater_cmd("serve", "--port", str(port), "--http-workers", str(http_workers),
                       "--executors", str(executors))
    log_file = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=ROOT)
    server = Server(proc, f"http://127.0.0.1:{port}", log_path, log_file)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if "listening on http://" in log_path.read_text(errors="replace"):
            return server
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
    stop_runlater(server)
    raise BenchError(f"runlater serve did not report 'listening on' (exit {proc.poll()}): {' | '.join(tail)}")


def stop_runlater(server: Server | None) -> int | None:
    if server is None:
        return None
    code = stop_group(server.proc, signal.SIGTERM, wait=20)
    if server.log_file is not None:
        server.log_file.close()
    return code


def start_nginx(port: int, prefix: Path) -> subprocess.Popen:
    conf = NGINX_TEMPLATE.read_text().replace("@PREFIX@", str(prefix)).replace("@PORT@", str(port))
    (prefix / "logs").mkdir(parents=True, exist_ok=True)  # nginx opens logs/error.log before reading the conf
    conf_path = prefix / "static202.conf"
    conf_path.write_text(conf)
    out = open(prefix / "nginx.out", "w")
    proc = subprocess.Popen(["nginx", "-c", str(conf_path), "-p", str(prefix)], stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.1)
    stop_group(proc, signal.SIGTERM, wait=5)
    text = "".join(f.read_text(errors="replace") for f in (prefix / "nginx.out", prefix / "error.log") if f.exists())
    raise BenchError(f"nginx did not start on port {port}: {text.strip().splitlines()[-1:] or 'no output'}")


# --------------------------------------------------------------------------------------------
# wrk


@dataclass
class WrkResult:
    target: str
    requests: int = 0
    duration_s: float = 0.0
    rps: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    non2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    raw: str = ""
    rss_max_kb: int | None = None
    rss_per_worker_kb: dict[int, int] = field(default_factory=dict)
    tasks_committed: int | None = None
    server_notes: list[str] = field(default_factory=list)
    server_cpu_s: float | None = None  # HTTP workers (or nginx workers)
    db_cpu_s: float | None = None  # PostgreSQL backends of the benchmark database
    wrk_cpu_s: float | None = None
    server_procs: int = 0
    server_wait_s: float | None = None  # summed run-queue wait of the server processes
    split: list["WrkResult"] = field(default_factory=list)  # --split runs on the same server

    def us_per_request(self, seconds: float | None) -> str:
        if seconds is None or not self.requests:
            return "n/a"
        return f"{seconds * 1e6 / self.requests:,.0f}"

    @property
    def errors(self) -> int:
        return sum(self.socket_errors.values())


def parse_wrk(target: str, out: str) -> WrkResult:
    r = WrkResult(target=target, raw=out)
    m = re.search(r"^RESULT (.*)$", out, re.MULTILINE)
    if not m:
        raise BenchError(f"wrk printed no RESULT line for {target}: {out.strip()[-300:]}")
    kv = dict(item.split("=", 1) for item in m.group(1).split())
    r.requests = int(kv["requests"])
    r.duration_s = float(kv["duration_s"])
    r.rps = float(kv["rps"])
    r.p50_ms, r.p95_ms, r.p99_ms = float(kv["p50_ms"]), float(kv["p95_ms"]), float(kv["p99_ms"])
    # wrk prints these two lines only when they are non-zero.
    if m := re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out):
        r.non2xx = int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        r.socket_errors = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups())))
    return r


class RssSampler(threading.Thread):
    """Max VmRSS per HTTP worker while the load runs (workers are re-read: one may be replaced)."""

    def __init__(self, master_pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.master_pid = master_pid
        self.interval = interval
        self.max_kb: dict[int, int] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            for pid in children_of(self.master_pid):
                kb = rss_kb(pid)
                if kb is not None and kb > self.max_kb.get(pid, 0):
                    self.max_kb[pid] = kb
            self._stop_event.wait(self.interval)

    def stop(self) -> dict[int, int]:
        self._stop_event.set()
        self.join(5)
        return self.max_kb


def run_wrk(label: str, url: str, key: str, threads: int, connections: int, seconds: int,
            lua: Path = LUA) -> tuple[str, float]:
    """Run wrk to completion, logging the seconds left: (its stdout+stderr, its CPU seconds)."""
    # --timeout 5s: wrk's default of 2 s would count slow answers of an overloaded server as socket
    # errors; the server's own bound (503 after the 1 s pool wait) should be what shows instead.
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s", str(lua), url]
    env = {**os.environ, "RUNLATER_KEY": key}
    cpu_before = children_cpu()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    started = time.monotonic()
    try:
        step = 5 if seconds > 6 else seconds
        while True:
            try:
                out, _ = proc.communicate(timeout=step)
                break
            except subprocess.TimeoutExpired:
                left = seconds - (time.monotonic() - started)
                log(f"{label}: {max(0, round(left))} s left")
                if left < -30:
                    raise BenchError(f"wrk against {label} did not stop 30 s after its duration")
    finally:
        if proc.poll() is None:
            stop_group(proc, signal.SIGTERM, wait=3, whole_group=True)
    if proc.returncode:
        raise BenchError(f"wrk against {label} exited {proc.returncode}: {out.strip()[-300:]}")
    return out, children_cpu() - cpu_before


# --------------------------------------------------------------------------------------------
# Phases


@dataclass
class Options:
    seconds: int
    connections: int
    threads: int
    http_workers: int
    admin_dsn: str
    workdir: Path
    out: Path | None
    split: bool = False


def server_log_notes(path: Path) -> list[str]:
    """Lines of a server log worth a reader's attention after a run (errors, unflushed rows)."""
    notes = []
    text = path.read_text(errors="replace") if path.exists() else ""
    for line in text.splitlines():
        if re.search(r"\b(ERROR|CRITICAL|Traceback|unflushed)\b", line) or " WARNING " in line and "open-file limit" not in line:
            notes.append(line.strip())
    # The per-worker totals the server logs when it stops: useful to see the batch sizes.
    notes += [line.strip() for line in text.splitlines() if "tasks created in" in line]
    return notes


# Variants of the seed mix for --split: the same Lua with its 20-slot pattern made uniform, so each
# run costs exactly what one kind of request costs. "404" keeps the list request's headers but asks
# for a path no route matches: the HTTP layer, routing and the answer, with no database at all.
SPLIT_VARIANTS = (
    ("create only (POST /api/v1/tasks)", "1", None),
    ("list only (GET /api/v1/tasks?limit=20)", "3", None),
    ("404 only (HTTP layer, no database)", "3", "/bench-no-such-route"),
)


def split_lua(workdir: Path, slot: str, path: str | None) -> Path:
    text = LUA.read_text()
    text, n = re.subn(r"(?m)^local pattern = \{.*\}$", "local pattern = { " + ", ".join([slot] * 20) + " }", text)
    if n != 1:
        raise BenchError(f"--split: cannot find the 20-slot pattern in {LUA}")
    if path is not None:
        text = text.replace('"/api/v1/tasks?limit=20"', f'"{path}"')
    out = workdir / f"split-{slot}-{'404' if path else 'api'}.lua"
    out.write_text(text)
    return out


def measure_variant(opts: Options, label: str, url: str, key: str, dsn: str, master_pid: int, lua: Path) -> WrkResult:
    run_wrk(f"{label} warm-up", url, key, opts.threads, opts.connections, WARMUP_S, lua)
    server_cpu, db_cpu = CpuMeter(), CpuMeter()
    workers = children_of(master_pid)
    server_cpu.start(workers)
    db_cpu.start(_db_backends(dsn))
    seconds = max(5, opts.seconds // 2)
    log(f"{label}: measuring for {seconds} s")
    try:
        out, wrk_cpu = run_wrk(label, url, key, opts.threads, opts.connections, seconds, lua)
    finally:
        server_cpu.stop()
        db_cpu.stop()
    r = parse_wrk(label, out)
    r.server_cpu_s, r.db_cpu_s, r.wrk_cpu_s = server_cpu.cpu, db_cpu.cpu, wrk_cpu
    r.server_wait_s, r.server_procs = server_cpu.wait, len(workers)
    _save(opts, f"wrk-split-{lua.stem}.txt", out)
    return r


def _db_backends(dsn: str) -> list[int]:
    return list(asyncio.run(_fetchval(
        dsn, f"SELECT coalesce(array_agg(pid), '{{}}') FROM pg_stat_activity "
             f"WHERE datname = '{BENCH_DB}' AND pid <> pg_backend_pid()")))


def runlater_phase(opts: Options, label: str, extra_env: dict[str, str], slug: str) -> WrkResult:
    log(f"{label}: fresh database {BENCH_DB}, migrate, key")
    dsn, key = prepare_database(opts.admin_dsn)
    port = free_port()
    server = None
    try:
        server = start_runlater(dsn, port, opts.http_workers, extra_env, opts.workdir / f"server-{slug}.log")
        log(f"{label}: serving on {server.url} (master {server.proc.pid}, workers {server.workers}); warm-up {WARMUP_S} s")
        run_wrk(f"{label} warm-up", server.url, key, opts.threads, opts.connections, WARMUP_S)
        before = settled_task_count(dsn)
        workers = server.workers
        # The pools are open after the warm-up, so their backends exist now and live through the run.
        server_cpu, db_cpu = CpuMeter(), CpuMeter()
        server_cpu.start(workers)
        db_cpu.start(_db_backends(dsn))
        sampler = RssSampler(server.proc.pid)
        sampler.start()
        log(f"{label}: measuring for {opts.seconds} s")
        try:
            out, wrk_cpu = run_wrk(label, server.url, key, opts.threads, opts.connections, opts.seconds)
        finally:
            peaks = sampler.stop()
            server_cpu.stop()
            db_cpu.stop()
        result = parse_wrk(label, out)
        result.tasks_committed = settled_task_count(dsn) - before
        result.rss_per_worker_kb = peaks
        result.rss_max_kb = max(peaks.values()) if peaks else None
        result.server_cpu_s, result.db_cpu_s, result.wrk_cpu_s = server_cpu.cpu, db_cpu.cpu, wrk_cpu
        result.server_wait_s, result.server_procs = server_cpu.wait, len(workers)
        if server.proc.poll() is not None:
            result.server_notes.append(f"server exited during the run with code {server.proc.returncode}")
        elif opts.split and not extra_env:
            for name, slot, path in SPLIT_VARIANTS:
                lua = split_lua(opts.workdir, slot, path)
                result.split.append(measure_variant(opts, name, server.url, key, dsn, server.proc.pid, lua))
    finally:
        code = stop_runlater(server)
        drop_database(opts.admin_dsn)
    if code not in (0, None):
        result.server_notes.append(f"server exited with code {code} after SIGTERM")
    result.server_notes += server_log_notes(opts.workdir / f"server-{slug}.log")
    _save(opts, f"wrk-{slug}.txt", out)
    log(f"{label}: {result.rps:,.0f} req/s, non-2xx {result.non2xx}, errors {result.errors}, "
        f"p99 {result.p99_ms:.1f} ms, max worker RSS {_mb(result.rss_max_kb)}, CPU µs/request "
        f"server {result.us_per_request(result.server_cpu_s)} + PostgreSQL {result.us_per_request(result.db_cpu_s)}")
    return result


def nginx_phase(opts: Options) -> WrkResult:
    port = free_port()
    prefix = opts.workdir / "nginx"
    prefix.mkdir(exist_ok=True)
    proc = None
    try:
        proc = start_nginx(port, prefix)
        url = f"http://127.0.0.1:{port}"
        log(f"nginx: static 202 on {url}; warm-up {WARMUP_S} s")
        # A key of the same length as a real one keeps the request bytes identical.
        fake_key = "pk_live_" + "x" * 24 + ".sk_live_" + "y" * 32
        run_wrk("nginx warm-up", url, fake_key, opts.threads, opts.connections, WARMUP_S)
        workers = children_of(proc.pid)
        meter = CpuMeter()
        meter.start(workers)
        log(f"nginx: measuring for {opts.seconds} s")
        try:
            out, wrk_cpu = run_wrk("nginx", url, fake_key, opts.threads, opts.connections, opts.seconds)
        finally:
            meter.stop()
    finally:
        # SIGQUIT would wait for keep-alive connections to finish; SIGTERM is nginx's fast stop.
        stop_group(proc, signal.SIGTERM, wait=10)
    _save(opts, "wrk-nginx.txt", out)
    result = parse_wrk("nginx static 202", out)
    result.server_cpu_s, result.wrk_cpu_s = meter.cpu, wrk_cpu
    result.server_wait_s, result.server_procs = meter.wait, len(workers)
    log(f"nginx: {result.rps:,.0f} req/s, non-2xx {result.non2xx}, errors {result.errors}, "
        f"CPU µs/request {result.us_per_request(result.server_cpu_s)}")
    return result


def idle_phase(opts: Options, connections: int, hold: float) -> IdleResult:
    log(f"idle: fresh database, server with RUNLATER_KEEPALIVE_TIMEOUT={IDLE_KEEPALIVE_S}")
    dsn, key = prepare_database(opts.admin_dsn)
    server = None
    try:
        server = start_runlater(dsn, free_port(), opts.http_workers, {"RUNLATER_KEEPALIVE_TIMEOUT": IDLE_KEEPALIVE_S},
                                opts.workdir / "server-idle.log")
        time.sleep(1.0)  # let the workers finish start-up allocations before the "before" RSS
        runner = _uvloop_run()
        result = runner(run_idle(server.url, connections, master_pid=server.proc.pid, key=key, hold=hold,
                                 progress=log))
        if server.proc.poll() is not None:
            log(f"idle: server exited during the test with code {server.proc.returncode}")
    finally:
        stop_runlater(server)
        drop_database(opts.admin_dsn)
    return result


def profile_phase(opts: Options, seconds: int) -> list[str]:
    """py-spy on one HTTP worker under the seed mix; returns Markdown lines summarizing it."""
    pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if not pyspy:
        return ["py-spy not found: install it with `pip install py-spy` into the venv to profile."]
    dsn, key = prepare_database(opts.admin_dsn)
    server = spy = None
    raw_path = (opts.out or opts.workdir) / "pyspy-worker.txt"
    try:
        server = start_runlater(dsn, free_port(), opts.http_workers, {}, opts.workdir / "server-profile.log")
        run_wrk("profile warm-up", server.url, key, opts.threads, opts.connections, WARMUP_S)
        workers = server.workers
        if not workers:
            raise BenchError("profile: the server has no HTTP worker children")
        worker = workers[0]
        spy_s = max(1, min(10, seconds - 2))
        log(f"profile: py-spy on worker {worker} for {spy_s} s during a {seconds} s load")
        spy = subprocess.Popen([pyspy, "record", "--pid", str(worker), "-d", str(spy_s), "-f", "raw",
                                "-o", str(raw_path), "--native"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        run_wrk("profile", server.url, key, opts.threads, opts.connections, seconds)
        spy_out, _ = spy.communicate(timeout=60)
    finally:
        if spy is not None and spy.poll() is None:
            stop_group(spy, signal.SIGINT, wait=10)
        stop_runlater(server)
        drop_database(opts.admin_dsn)
    if not raw_path.exists():
        return [f"py-spy wrote no profile: {spy_out.strip()[-300:]}"]
    return summarize_pyspy(raw_path.read_text())


_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]+?)(?::\d+)?\)$")
_SYSCALLS = ("write", "writev", "send", "sendto", "sendmsg", "read", "recv", "recvfrom", "epoll_wait", "epoll_pwait")


def _frame_name(frame: str) -> tuple[str, bool]:
    """(function (file), is_python) for one py-spy frame, line numbers dropped."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), False
    file = m.group("file")
    is_python = file.endswith(".py") or file.startswith("<frozen")
    # Keep the part of the path that says which package a frame belongs to.
    for marker in ("site-packages/", "runlater/", "lib/python"):
        if marker in file:
            file = file[file.index(marker):]
            break
    return f"{m.group('fn')} ({file})", is_python


def summarize_pyspy(raw: str, top: int = 15) -> list[str]:
    """Sample shares by Python function from py-spy's raw (folded) output, line numbers merged.

    py-spy samples wall-clock time of a thread that is not idle, and "not idle" includes being
    runnable but waiting for a CPU. On an oversubscribed machine a process is mostly preempted at
    wake-ups (a write() that wakes wrk or a PostgreSQL backend), so those waits pile up as time
    "in write". The tables therefore leave out samples whose native leaf is a socket or epoll
    syscall and report their share on its own line; native frames (``--native``) are folded into
    the Python function that called them. Compare with ``perf`` for the user/kernel split.
    """
    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    sys_c: Counter[str] = Counter()
    total = busy = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame_name(f) for f in stack.split(";")]
        leaf_fn = frames[-1][0].split(" (", 1)[0] if frames else ""
        if leaf_fn in _SYSCALLS:
            sys_c[leaf_fn] += n
            continue
        busy += n
        py = [name for name, is_py in frames if is_py]
        if py:
            self_c[py[-1]] += n
            for f in set(py):
                incl_c[f] += n
    if not total:
        return ["py-spy recorded no samples."]
    if not busy:
        return [f"{total:,} samples, all in socket/epoll syscalls."]
    pct = lambda n: f"{100 * n / busy:.1f}"  # noqa: E731
    lines = [f"{total:,} samples; {100 * (total - busy) / total:.1f}% have a socket/epoll syscall as native leaf "
             f"({', '.join(f'{k} {100 * v / total:.1f}%' for k, v in sys_c.most_common())}) and are left out; "
             f"the percentages below are of the other {busy:,}.", "",
             "Innermost Python function (native callees folded in):", "",
             "| % | function |", "|---:|---|"]
    lines += [f"| {pct(n)} | `{f}` |" for f, n in self_c.most_common(top)]
    # Frames on (nearly) every stack (the entry point, the loop) say nothing; leave them out.
    shown = [(f, n) for f, n in incl_c.most_common() if n < 0.95 * busy][: top + 10]
    lines += ["", "Inclusive (the function and everything it calls; frames on ≥ 95% of stacks omitted):", "",
              "| % | function |", "|---:|---|"]
    lines += [f"| {pct(n)} | `{f}` |" for f, n in shown]
    return lines


# --------------------------------------------------------------------------------------------
# Report


def _mb(kb: int | None) -> str:
    return "n/a" if kb is None else f"{kb / 1024:.1f} MB"


def _uvloop_run():
    try:
        import uvloop

        return uvloop.run
    except ImportError:
        return asyncio.run


def _save(opts: Options, name: str, text: str) -> None:
    if opts.out:
        (opts.out / name).write_text(text)


def environment(admin_dsn: str, argv: list[str]) -> list[tuple[str, str]]:
    rev = run_text(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]) or "unknown"
    dirty = run_text(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    if dirty:
        rev += " (with uncommitted changes in tracked files)"
    soft, hard = raise_nofile()
    try:
        sync = asyncio.run(_fetchval(admin_dsn, "SHOW synchronous_commit"))
        shared = asyncio.run(_fetchval(admin_dsn, "SHOW shared_buffers"))
        pgver = asyncio.run(_fetchval(admin_dsn, "SHOW server_version"))
    except Exception as exc:  # noqa: BLE001
        raise BenchError(f"cannot connect to PostgreSQL at {admin_dsn}: {exc}") from exc
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        ("date (UTC)", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")),
        ("git revision", rev),
        ("cores", f"{os.cpu_count()} ({model})"),
        ("load average at start", load),
        ("ulimit -n (soft/hard)", f"{soft}/{hard}"),
        ("PostgreSQL", f"{pgver}, synchronous_commit={sync}, shared_buffers={shared}"),
        ("wrk", run_text(["wrk", "-v"]).splitlines()[0] if run_text(["wrk", "-v"]) else "unknown"),
        ("nginx", run_text(["nginx", "-v"]) or "unknown"),
        ("command", "`" + " ".join(shlex.quote(a) for a in argv) + "`"),
    ]


def report(opts: Options, env: list[tuple[str, str]], results: list[WrkResult], idle: IdleResult | None,
           profile: list[str] | None) -> str:
    nginx = next((r for r in results if r.target.startswith("nginx")), None)
    lines = [f"# API ceiling: seed mix, wrk -t{opts.threads} -c{opts.connections} -d{opts.seconds}s, "
             f"{opts.http_workers} HTTP workers", ""]
    lines += ["| target | req/s | non-2xx | socket errors | p50 ms | p95 ms | p99 ms | vs nginx | max worker RSS |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ratio = f"{100 * r.rps / nginx.rps:.1f}%" if nginx and nginx.rps else "n/a"
        errs = str(r.errors) + (f" ({', '.join(f'{k} {v}' for k, v in r.socket_errors.items() if v)})" if r.errors else "")
        rss = _mb(r.rss_max_kb) if not r.target.startswith("nginx") else "—"
        lines.append(f"| {r.target} | {r.rps:,.0f} | {r.non2xx} | {errs} | {r.p50_ms:.2f} | {r.p95_ms:.2f} | "
                     f"{r.p99_ms:.2f} | {ratio} | {rss} |")
    cores = os.cpu_count() or 1
    lines += ["", "CPU per request (from /proc: utime+stime of each process over the measured run; much less "
              "sensitive to other load on the machine than req/s):", "",
              "| target | server µs/req | PostgreSQL backends µs/req | wrk µs/req | server+PostgreSQL vs nginx | "
              f"server processes waiting for a CPU | CPU-bound estimate, {cores} idle cores |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    nginx_us = nginx.server_cpu_s * 1e6 / nginx.requests if nginx and nginx.server_cpu_s and nginx.requests else None
    for r in results:
        if r.server_cpu_s is None or not r.requests:
            continue
        own = (r.server_cpu_s + (r.db_cpu_s or 0.0)) * 1e6 / r.requests
        total = own + (r.wrk_cpu_s or 0.0) * 1e6 / r.requests
        vs = f"{own / nginx_us:.1f}×" if nginx_us else "n/a"
        wait = (f"{100 * r.server_wait_s / (r.duration_s * r.server_procs):.0f}% of the time"
                if r.server_wait_s is not None and r.server_procs and r.duration_s else "n/a")
        lines.append(f"| {r.target} | {r.us_per_request(r.server_cpu_s)} | {r.us_per_request(r.db_cpu_s) if r.db_cpu_s is not None else '—'} | "
                     f"{r.us_per_request(r.wrk_cpu_s)} | {vs} | {wait} | {cores * 1e6 / total:,.0f} req/s |")
    lines += ["", "The estimate is cores ÷ (server + PostgreSQL + wrk CPU per request): what the run would reach "
              "if nothing else used the machine and nothing but CPU limited it. PostgreSQL's WAL writer and "
              "checkpointer are not counted.", ""]
    for r in results:
        if not r.split:
            continue
        lines += [f"Per kind of request ({r.target}, same server, right after the mixed run, each for "
                  f"{max(5, opts.seconds // 2)} s with the seed mix's Lua and one request kind only; the 404 run "
                  "expects 100% non-2xx):", "",
                  "| run | req/s | non-2xx | p50 ms | p99 ms | server µs/req | PostgreSQL µs/req | wrk µs/req |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for v in r.split:
            lines.append(f"| {v.target} | {v.rps:,.0f} | {v.non2xx} | {v.p50_ms:.2f} | {v.p99_ms:.2f} | "
                         f"{v.us_per_request(v.server_cpu_s)} | {v.us_per_request(v.db_cpu_s)} | "
                         f"{v.us_per_request(v.wrk_cpu_s)} |")
        lines.append("")
    for r in results:
        if r.tasks_committed is None:
            continue
        expected = r.requests * CREATE_SHARE
        # Each wrk thread walks the 20-slot pattern on its own, so the share is exact to ±17 per thread.
        short = r.tasks_committed < expected - 17 * opts.threads
        verdict = ("**fewer tasks in the database than creates answered: check durability**" if short
                   else "at least as many as answered")
        lines.append(f"- {r.target}: {r.requests:,} requests in {r.duration_s:.1f} s; tasks committed during the "
                     f"measured run {r.tasks_committed:,}, creates answered ≈ {expected:,.0f} (17/20 of requests): "
                     f"{verdict} (creates still in flight when wrk stops commit too, up to {opts.connections}); "
                     "RSS peak per worker: " + ", ".join(_mb(kb) for _, kb in sorted(r.rss_per_worker_kb.items())))
    lines.append("")
    notes = [(r.target, n) for r in results for n in r.server_notes]
    if notes:
        lines += ["Server log: errors, warnings, and each worker's batch totals at shutdown (warm-up included):", ""]
        lines += [f"- {t}: `{n[:300]}`" for t, n in notes]
        lines.append("")
    if idle is not None:
        lines += [f"## Idle keep-alive connections ({idle.target_connections:,}), server started with "
                  f"RUNLATER_KEEPALIVE_TIMEOUT={IDLE_KEEPALIVE_S}", "", idle.markdown(), ""]
    if profile is not None:
        lines += ["## py-spy: one HTTP worker under the seed mix (separate run)", ""] + profile + [""]
    lines += ["## Environment", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in env]
    lines += ["", "Load generator (wrk) on the same machine over loopback; the machine may be shared, so compare "
              "the ratios within this run rather than absolute numbers across runs."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=parse_duration, default=parse_duration("20s"), help="per measured run (default 20s)")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--http-workers", type=int, default=2)
    p.add_argument("--database-url", default=None, help="admin DSN (default: DATABASE_URL, else postgres on 127.0.0.1)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--no-batch", action="store_true", help="only the run with batching forced off")
    mode.add_argument("--both", action="store_true", help="batching on, batching off and nginx in one run")
    p.add_argument("--idle", type=int, default=0, metavar="N", help="also hold N idle keep-alive connections")
    p.add_argument("--idle-hold", type=float, default=10.0, help="seconds the idle connections stay idle (default 10)")
    p.add_argument("--profile", action="store_true", help="also profile one HTTP worker with py-spy (separate run)")
    p.add_argument("--split", action="store_true",
                   help="after the batching-on run, measure create-only, list-only and 404-only loads on the same server")
    p.add_argument("--out", type=Path, default=None, help="directory for ceiling.md, wrk outputs and server logs")
    return p


def _on_sigterm(signum, frame):  # type: ignore[no-untyped-def]
    # Turn SIGTERM/SIGHUP into the same unwinding as Ctrl-C so every finally block runs.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    missing = [tool for tool in ("wrk", "nginx") if shutil.which(tool) is None]
    if missing:
        print(f"bench.ceiling: {' and '.join(missing)} not found on PATH; install with: apt-get install wrk nginx-light",
              file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sigterm)
    admin_dsn = args.database_url or os.environ.get("DATABASE_URL") or DEFAULT_ADMIN_DSN
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    shown_argv = ["python", "-m", "bench.ceiling", *(sys.argv[1:] if argv is None else argv)]
    with tempfile.TemporaryDirectory(prefix="runlater-ceiling-") as tmp:
        opts = Options(args.duration, args.connections, args.threads, args.http_workers, admin_dsn,
                       args.out.resolve() if args.out else Path(tmp), args.out.resolve() if args.out else None,
                       split=args.split)
        try:
            env = environment(admin_dsn, shown_argv)
            results: list[WrkResult] = []
            if args.both or not args.no_batch:
                results.append(runlater_phase(opts, "runlater (batching on)", {}, "batch"))
            if args.both or args.no_batch:
                results.append(runlater_phase(opts, "runlater (batching off)", NO_BATCH_ENV, "nobatch"))
            results.append(nginx_phase(opts))
            idle = idle_phase(opts, args.idle, args.idle_hold) if args.idle else None
            profile = profile_phase(opts, opts.seconds) if args.profile else None
        except BenchError as exc:
            print(f"bench.ceiling: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("bench.ceiling: interrupted; everything started was stopped", file=sys.stderr)
            return 130
        text = report(opts, env, results, idle, profile)
    print(text)
    if args.out:
        (args.out / "ceiling.md").write_text(text)
        log(f"report written to {args.out / 'ceiling.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
