"""Memory per idle keep-alive connection: hold N connections open against a running server.

    python -m bench.idle_connections --url http://127.0.0.1:8080 --connections 10000 \\
        --master-pid PID [--key KEY] [--hold 10]

Steps: read the RSS of every server worker; open N keep-alive connections (a bounded number
of handshakes at a time, so the listen backlog never overflows); send one ``GET /health`` on
each and read the answer; leave them all idle for ``--hold`` seconds while sampling RSS; then
send one more request on every connection (with ``--key``: an authenticated
``GET /api/v1/tasks?limit=1``, to show a connection that idled still serves the API) and read
the RSS again. The report gives the connections established, every kind of failure, the
RSS before/idle/after and the bytes of RSS per idle connection.

The server closes an idle connection after ``RUNLATER_KEEPALIVE_TIMEOUT`` seconds (default 5),
so start it with a value above ``--hold`` plus the time it takes to open N connections, e.g.
``RUNLATER_KEEPALIVE_TIMEOUT=120 runlater serve ...``. A connection the server closes while
idle is counted as ``closed_while_idle``, never silently dropped.

Each request round keeps at most ``--in-flight`` requests outstanding: the point is holding
connections, not a thundering herd of ``SELECT 1`` through an 8-connection pool.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

# --------------------------------------------------------------------------------------------
# Process helpers (also used by bench.ceiling)


def raise_nofile() -> tuple[int, int]:
    """Raise the soft open-file limit to the hard limit; 10,000 sockets need more than 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft, hard


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (scans /proc: /proc/PID/task/*/children is not always built in)."""
    kids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces: split after the last ')'.
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            kids.append(int(name))
    return sorted(kids)


def rss_kb(pid: int) -> int | None:
    """VmRSS of a process in KiB, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_map(pids: list[int]) -> dict[int, int]:
    return {pid: kb for pid in pids if (kb := rss_kb(pid)) is not None}


# --------------------------------------------------------------------------------------------
# A minimal keep-alive HTTP/1.1 client connection


class _Conn(asyncio.Protocol):
    """One keep-alive connection; one request at a time; answers parsed just enough to count."""

    __slots__ = ("transport", "buf", "waiter", "closed", "idle_close", "in_request")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.closed = False
        self.idle_close = False  # the peer closed while no request was outstanding
        self.in_request = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("closed by peer during the request"))
        elif not self.in_request:
            self.idle_close = True

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None:
            return
        head = bytes(self.buf[:end]).split(b"\r\n")
        try:
            status = int(head[0].split()[1])
        except (IndexError, ValueError):
            status = -1
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        if len(self.buf) < end + 4 + length:
            return
        del self.buf[: end + 4 + length]
        waiter, self.waiter = self.waiter, None
        self.in_request = False
        if not waiter.done():
            waiter.set_result(status)

    async def request(self, raw: bytes, timeout: float) -> int:
        if self.closed or self.transport is None:
            raise ConnectionError("connection already closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.in_request = True
        self.transport.write(raw)
        return await asyncio.wait_for(self.waiter, timeout)


@dataclass
class IdleResult:
    url: str
    target_connections: int
    established: int = 0
    connect_errors: int = 0
    connect_error_kinds: dict[str, int] = field(default_factory=dict)
    first_ok: int = 0
    first_failed: int = 0
    closed_while_idle: int = 0
    open_after_hold: int = 0
    second_ok: int = 0
    second_failed: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)
    second_path: str = "/health"
    hold_s: float = 0.0
    open_s: float = 0.0
    pids: list[int] = field(default_factory=list)
    rss_before_kb: dict[int, int] = field(default_factory=dict)
    rss_idle_kb: dict[int, int] = field(default_factory=dict)
    rss_after_kb: dict[int, int] = field(default_factory=dict)
    nofile_soft: int = 0

    @property
    def errors(self) -> int:
        return self.connect_errors + self.first_failed + self.closed_while_idle + self.second_failed

    @property
    def bytes_per_idle_connection(self) -> float | None:
        if not self.established or not self.rss_before_kb or not self.rss_idle_kb:
            return None
        grown = sum(self.rss_idle_kb.values()) - sum(self.rss_before_kb.values())
        return grown * 1024 / self.established

    def summary(self) -> dict[str, object]:
        d = asdict(self)
        d["errors"] = self.errors
        d["bytes_per_idle_connection"] = self.bytes_per_idle_connection
        return d

    def markdown(self) -> str:
        def mb(m: dict[int, int]) -> str:
            if not m:
                return "n/a"
            return ", ".join(f"{kb / 1024:.1f}" for _, kb in sorted(m.items())) + f" (sum {sum(m.values()) / 1024:.1f})"

        per = self.bytes_per_idle_connection
        rows = [
            ("connections asked / established", f"{self.target_connections:,} / {self.established:,}"),
            ("connect errors", f"{self.connect_errors}" + (f" {self.connect_error_kinds}" if self.connect_error_kinds else "")),
            ("first request (GET /health) ok / failed", f"{self.first_ok:,} / {self.first_failed}"),
            (f"closed by the server during the {self.hold_s:g} s idle hold", f"{self.closed_while_idle}"),
            (f"second request ({self.second_path}) ok / failed", f"{self.second_ok:,} / {self.second_failed}"),
            ("status codes seen", ", ".join(f"{k}: {v:,}" for k, v in sorted(self.status_counts.items())) or "none"),
            ("time to open all connections", f"{self.open_s:.1f} s"),
            ("worker RSS MB before", mb(self.rss_before_kb)),
            ("worker RSS MB with all connections idle", mb(self.rss_idle_kb)),
            ("worker RSS MB after the second request", mb(self.rss_after_kb)),
            ("RSS per idle connection", "n/a" if per is None else f"{per:,.0f} bytes"),
        ]
        lines = ["| measure | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in rows]
        return "\n".join(lines)


def _request_bytes(host: str, path: str, key: str | None) -> bytes:
    auth = f"authorization: Bearer {key}\r\n" if key else ""
    return f"GET {path} HTTP/1.1\r\nhost: {host}\r\n{auth}\r\n".encode()


async def _round(conns: list[_Conn], raw: bytes, in_flight: int, timeout: float,
                 statuses: dict[str, int]) -> tuple[int, int]:
    """One request on every open connection, at most ``in_flight`` outstanding; (ok, failed)."""
    sem = asyncio.Semaphore(in_flight)
    ok = failed = 0

    async def one(c: _Conn) -> None:
        nonlocal ok, failed
        async with sem:
            try:
                status = await c.request(raw, timeout)
            except (OSError, TimeoutError, ConnectionError) as exc:
                failed += 1
                statuses[type(exc).__name__] = statuses.get(type(exc).__name__, 0) + 1
                return
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if 200 <= status < 300:
                ok += 1
            else:
                failed += 1

    await asyncio.gather(*(one(c) for c in conns))
    return ok, failed


async def run_idle(url: str, connections: int, *, pids: list[int] | None = None, master_pid: int | None = None,
                   key: str | None = None, hold: float = 10.0, connect_concurrency: int = 256,
                   in_flight: int = 64, timeout: float = 30.0,
                   progress=lambda msg: print(msg, file=sys.stderr, flush=True)) -> IdleResult:
    """Run the idle-connection test against a server already listening on ``url``."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    soft, _ = raise_nofile()
    result = IdleResult(url=url, target_connections=connections, hold_s=hold, nofile_soft=soft)
    if soft < connections + 100:
        progress(f"[idle] warning: open-file limit {soft} is below {connections} connections + slack")

    def worker_pids() -> list[int]:
        if pids:
            return list(pids)
        if master_pid:
            return children_of(master_pid)
        return []

    result.pids = worker_pids()
    result.rss_before_kb = rss_map(result.pids)
    loop = asyncio.get_running_loop()
    conns: list[_Conn] = []
    sem = asyncio.Semaphore(connect_concurrency)

    async def connect() -> None:
        async with sem:
            try:
                _, proto = await asyncio.wait_for(loop.create_connection(_Conn, host, port), timeout)
            except (OSError, TimeoutError) as exc:
                result.connect_errors += 1
                kind = type(exc).__name__ + (f"[{exc.errno}]" if isinstance(exc, OSError) and exc.errno else "")
                result.connect_error_kinds[kind] = result.connect_error_kinds.get(kind, 0) + 1
                return
            conns.append(proto)

    started = time.monotonic()
    progress(f"[idle] opening {connections:,} keep-alive connections to {host}:{port}")
    await asyncio.gather(*(connect() for _ in range(connections)))
    result.established = len(conns)
    result.first_ok, result.first_failed = await _round(
        conns, _request_bytes(host, "/health", key), in_flight, timeout, result.status_counts)
    result.open_s = time.monotonic() - started
    progress(f"[idle] {result.established:,} established, {result.first_ok:,} answered /health "
             f"in {result.open_s:.1f} s; holding them idle for {hold:g} s")

    # Sample RSS through the hold and keep the last reading: the allocator may still be settling
    # right after the burst, and what counts is the steady cost of a connection that sits there.
    deadline = time.monotonic() + hold
    while (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(min(1.0, left))
    result.rss_idle_kb = rss_map(result.pids)
    alive = [c for c in conns if not c.closed]
    result.closed_while_idle = sum(1 for c in conns if c.idle_close)
    result.open_after_hold = len(alive)

    if key:
        result.second_path = "/api/v1/tasks?limit=1"
    progress(f"[idle] {len(alive):,} still open after the hold; one more request on each ({result.second_path})")
    second_statuses: dict[str, int] = {}
    result.second_ok, result.second_failed = await _round(
        alive, _request_bytes(host, result.second_path, key), in_flight, timeout, second_statuses)
    for k, v in second_statuses.items():
        result.status_counts[k] = result.status_counts.get(k, 0) + v
    result.rss_after_kb = rss_map(result.pids)

    for c in conns:
        if c.transport is not None:
            c.transport.close()
    await asyncio.sleep(0.2)  # let the close callbacks run before the loop goes away
    return result


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.idle_connections",
                                description="Hold N idle keep-alive connections to a running server and measure its RSS.")
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--connections", type=int, default=10_000)
    p.add_argument("--key", default=None, help="API key: the second request becomes an authenticated task list")
    p.add_argument("--pids", default=None, help="comma-separated worker pids whose RSS to read")
    p.add_argument("--master-pid", type=int, default=None, help="read the RSS of this process's children")
    p.add_argument("--hold", type=float, default=10.0, help="seconds to keep every connection idle (default 10)")
    p.add_argument("--in-flight", type=int, default=64, help="outstanding requests per round (default 64)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of Markdown")
    args = p.parse_args(argv)
    pids = [int(x) for x in args.pids.split(",") if x] if args.pids else None
    if not pids and not args.master_pid:
        print("[idle] no --pids or --master-pid: RSS will not be measured", file=sys.stderr)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(run_idle(args.url, args.connections, pids=pids, master_pid=args.master_pid, key=args.key,
                             hold=args.hold, in_flight=args.in_flight))
    if args.json:
        print(json.dumps(result.summary(), indent=2, default=str))
    else:
        print(result.markdown())
    return 0 if result.errors == 0 and result.established == args.connections else 1


if __name__ == "__main__":
    sys.exit(_main())
