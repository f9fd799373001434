"""The process model against a real server: killed workers, reloads, crashes and stops.

Each test starts its own ``runlater serve`` (a master and its forked HTTP workers) and
looks at the processes through /proc: a worker is a child of the master pid that holds a
listening socket on the server's port. Clients are plain sockets (http.client), and the
database is read directly to check that every acknowledged task is really there.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import ServerProcess, make_org, missing_acks, wait_until

pytestmark = pytest.mark.slow

TASK = json.dumps({"url": "https://example.com/mp", "method": "POST", "body": "{}"}).encode()


# -- processes, seen through /proc ---------------------------------------------------------


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def children(pid: int) -> set[int]:
    """Live (not zombie) children of ``pid``."""
    found: set[int] = set()
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            found = {int(p) for p in f.read().split()}
    except OSError:
        for name in os.listdir("/proc"):
            if name.isdigit():
                stat = _stat(int(name))
                if stat is not None and stat[1] == pid:
                    found.add(int(name))
    return {p for p in found if alive(p)}


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(cols[9])
        except FileNotFoundError:
            continue
    return inodes


def _holds_socket(pid: int, inodes: set[str]) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


def serving_workers(master: int, port: int) -> set[int]:
    """Children of the master with a listening socket on ``port``: the workers taking connections."""
    inodes = _listening_inodes(port)
    return {pid for pid in children(master) if _holds_socket(pid, inodes)}


def runlater_processes(port: int) -> set[int]:
    """Every live process whose command line is ``… runlater serve --port <port> …``."""
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"runlater" in argv and b"serve" in argv and b"--port" in argv:
            i = argv.index(b"--port")
            if i + 1 < len(argv) and argv[i + 1] == str(port).encode() and alive(int(name)):
                found.add(int(name))
    return found


# -- HTTP ----------------------------------------------------------------------------------

CONNECTION_ERRORS = (OSError, http.client.HTTPException)


def fresh_request(port: int, key: str | None, create: bool, timeout: float = 10,
                  gap: float = 0.0) -> tuple[int, Any]:
    """One request on a new connection, sent ``gap`` seconds after connecting; connection problems raise."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        if gap:
            conn.connect()
            time.sleep(gap)
        if create:
            conn.request("POST", "/api/v1/tasks", body=TASK,
                         headers={"content-type": "application/json", "authorization": f"Bearer {key}"})
        else:
            conn.request("GET", "/health")
        resp = conn.getresponse()
        payload = resp.read()
    finally:
        conn.close()
    return resp.status, json.loads(payload) if payload else None


@dataclass
class CreateBurst:
    """``threads`` clients, each on its own keep-alive connection, sending ``total`` creates in all.

    A connection error ends that request (it was never acknowledged) and the client opens a
    new connection for its next one, unless ``stop_on_error``. ``after(n)`` gives an event set
    once ``n`` answers have arrived.
    """

    port: int
    key: str
    total: int
    threads: int = 16
    stop_on_error: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    acks: list[tuple[str, str]] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._sent = 0
        self._answered = 0
        self._goals: list[tuple[int, threading.Event]] = []
        self._clients = [threading.Thread(target=self._run, daemon=True) for _ in range(self.threads)]

    @property
    def sent(self) -> int:
        with self.lock:
            return self._sent

    def after(self, answers: int) -> threading.Event:
        event = threading.Event()
        with self.lock:
            self._goals.append((answers, event))
            if self._answered >= answers:
                event.set()
        return event

    def start(self) -> CreateBurst:
        for t in self._clients:
            t.start()
        return self

    def join(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        for t in self._clients:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._clients), "create clients did not finish"

    def _take(self) -> bool:
        with self.lock:
            if self._sent >= self.total:
                return False
            self._sent += 1
            return True

    def _run(self) -> None:
        headers = {"content-type": "application/json", "authorization": f"Bearer {self.key}"}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            while self._take():
                try:
                    conn.request("POST", "/api/v1/tasks", body=TASK, headers=headers)
                    resp = conn.getresponse()
                    payload = resp.read()
                except CONNECTION_ERRORS as exc:
                    with self.lock:
                        self.errors.append(f"{type(exc).__name__}: {exc}")
                    conn.close()
                    if self.stop_on_error:
                        return
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
                    continue
                ack = None
                if resp.status == 202:
                    data = json.loads(payload)["data"]
                    ack = (data["task_id"], data["execution_id"])
                with self.lock:
                    self._answered += 1
                    self.statuses[resp.status] = self.statuses.get(resp.status, 0) + 1
                    if ack is not None:
                        self.acks.append(ack)
                    for goal, event in self._goals:
                        if self._answered >= goal:
                            event.set()
        finally:
            conn.close()


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def start_server(pg_dsn):
    started: list[ServerProcess] = []

    def start(http_workers: int = 2) -> ServerProcess:
        srv = ServerProcess(pg_dsn, http_workers=http_workers, executors=0)
        started.append(srv)
        srv.wait_ready()
        wait_until(lambda: len(serving_workers(srv.proc.pid, srv.port)) == http_workers, 10,
                   what=f"{http_workers} workers listening")
        return srv

    yield start
    for srv in started:
        srv.stop()


# -- tests ---------------------------------------------------------------------------------


def test_a_killed_worker_is_replaced_and_service_continues(start_server, pg_dsn):
    srv = start_server(2)
    org = make_org(pg_dsn)
    master, port = srv.proc.pid, srv.port
    before = serving_workers(master, port)
    assert len(before) == 2 and children(master) == before

    # Keep-alive connections opened before the kill: some are served by the victim.
    # (16 of them: the chance that none lands on the victim is 2**-16.)
    kept = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(16)]
    try:
        for conn in kept:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
        victim = min(before)
        survivor = max(before)
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: not alive(victim), 5, what="victim gone")

        # The kill instant: a request on a connection the victim held fails; one retry on a
        # new connection must succeed. Nothing else may fail.
        retried = 0
        for i, conn in enumerate(kept):
            try:
                conn.request("GET", "/health")
                status = conn.getresponse().status
            except CONNECTION_ERRORS:
                conn.close()
                retried += 1
                status = fresh_request(port, org.key, create=bool(i % 2))[0]
            assert status in (200, 202)
        assert retried >= 1, "no connection was served by the killed worker"
    finally:
        for conn in kept:
            conn.close()

    for i in range(20):  # while the replacement boots, the survivor serves everything
        assert fresh_request(port, org.key, create=bool(i % 2))[0] in (200, 202)

    def replaced() -> set[int]:
        now = serving_workers(master, port)
        return now if len(now) == 2 and victim not in now and survivor in now else set()

    after = wait_until(replaced, 15, what="a new worker replacing the killed one")
    (newcomer,) = after - before
    assert children(master) == after and srv.proc.poll() is None
    for i in range(60):
        assert fresh_request(port, org.key, create=bool(i % 3 == 0))[0] in (200, 202)
    assert alive(newcomer)


@dataclass
class FreshConnectionClient:
    """Opens a NEW connection for every request (health, and every 4th a create); records problems.

    ``gap`` is how long it waits between connecting and sending its request.
    """

    port: int
    key: str
    gap: float = 0.0
    max_requests: int = 20_000
    max_seconds: float = 90.0
    stop: threading.Event = field(default_factory=threading.Event)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    count: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._goals: list[tuple[int, threading.Event]] = []
        self._done = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def after(self, more: int) -> threading.Event:
        """An event set once ``more`` further requests are done (or the client has stopped)."""
        event = threading.Event()
        with self._lock:
            self._goals.append((self.count + more, event))
            if self._done:
                event.set()
        return event

    def start(self) -> FreshConnectionClient:
        self._thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        try:
            for i in range(self.max_requests):
                if self.stop.is_set() or time.monotonic() > deadline:
                    break
                try:
                    status = fresh_request(self.port, self.key, create=i % 4 == 3, gap=self.gap)[0]
                except CONNECTION_ERRORS as exc:
                    with self._lock:
                        self.errors.append(f"request {i} (gap {self.gap}s): {type(exc).__name__}: {exc}")
                    status = None
                with self._lock:
                    self.count += 1
                    if status is not None:
                        self.statuses[status] = self.statuses.get(status, 0) + 1
                    for goal, event in self._goals:
                        if self.count >= goal:
                            event.set()
        finally:
            with self._lock:
                self._done = True
                for _, event in self._goals:
                    event.set()  # never leave the test waiting on a client that has stopped


def all_progress(clients: list[FreshConnectionClient], requests: int, timeout: float) -> bool:
    events = [c.after(requests) for c in clients]
    deadline = time.monotonic() + timeout
    return all(e.wait(max(0.0, deadline - time.monotonic())) for e in events)


class RefusedConnections(AssertionError):
    """Connections that got no answer during a reload."""


def test_sighup_replaces_every_worker_without_refusing_a_connection(start_server, pg_dsn):
    srv = start_server(2)
    org = make_org(pg_dsn)
    master, port = srv.proc.pid, srv.port
    # Clients that send the moment they are connected, and clients that send 20 ms later
    # (a pre-connected pool, a proxy, a slow network): neither may ever go unanswered.
    clients = [FreshConnectionClient(port, org.key, gap=gap).start() for gap in (0.0,) * 3 + (0.02,) * 8]
    try:
        for reload in range(3):
            old = serving_workers(master, port)
            assert len(old) == 2
            assert all_progress(clients, 30, 20), "clients are not making progress"
            os.kill(master, signal.SIGHUP)

            def renewed(old: set[int] = old) -> set[int]:
                now = serving_workers(master, port)
                done = len(now) == 2 and not now & old and not any(alive(p) for p in old)
                return now if done else set()

            new = wait_until(renewed, 30, what=f"reload {reload}: every worker replaced")
            assert children(master) == new
            assert all_progress(clients, 50, 20), "clients stalled after the reload"
    finally:
        for c in clients:
            c.finish()
    assert srv.proc.poll() is None
    statuses: dict[int, int] = {}
    for c in clients:
        for status, n in c.statuses.items():
            statuses[status] = statuses.get(status, 0) + n
    assert set(statuses) <= {200, 202}, statuses
    assert sum(statuses.values()) >= len(clients) * 3 * 80
    errors = [e for c in clients for e in c.errors]
    if errors:
        total = len(errors) + sum(statuses.values())
        raise RefusedConnections(f"{len(errors)} of {total} connections got no answer: {errors[:5]}")


def test_acknowledged_creates_survive_a_worker_killed_mid_burst(start_server, pg_dsn, sql):
    srv = start_server(2)
    org = make_org(pg_dsn)
    master, port = srv.proc.pid, srv.port
    workers = serving_workers(master, port)
    burst = CreateBurst(port, org.key, total=3000, threads=16).start()
    assert burst.after(500).wait(60), f"burst did not get going: {burst.statuses} {burst.errors[:3]}"
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    burst.join(90)

    assert not alive(victim)
    assert burst.errors, "the kill interrupted nothing: the test proved nothing"
    assert set(burst.statuses) <= {202, 503}, burst.statuses
    assert len(burst.acks) >= 500
    missing = missing_acks(sql, burst.acks)
    assert missing == [], f"{len(missing)} of {len(burst.acks)} acknowledged tasks are missing: {missing[:3]}"
    # And the master put a new worker in the dead one's place.
    def replaced() -> bool:
        now = serving_workers(master, port)
        return len(now) == 2 and victim not in now

    wait_until(replaced, 15, what="replacement worker")


def test_sigterm_stops_gracefully_keeping_every_acknowledged_create(start_server, pg_dsn, sql):
    srv = start_server(2)
    org = make_org(pg_dsn)
    master, port = srv.proc.pid, srv.port
    workers = serving_workers(master, port)
    family = runlater_processes(port)
    assert family == workers | {master}

    burst = CreateBurst(port, org.key, total=20_000, threads=16, stop_on_error=True).start()
    assert burst.after(500).wait(60), f"burst did not get going: {burst.statuses} {burst.errors[:3]}"
    stopped_at = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    code = srv.proc.wait(15)
    took = time.monotonic() - stopped_at
    burst.join(30)

    assert code == 0, (code, srv.stderr[-20:])
    assert took < 10.5, f"master took {took:.1f}s to stop"
    assert burst.sent < burst.total, "the burst ended before the stop: nothing was in flight"
    assert set(burst.statuses) <= {202, 503}, burst.statuses
    missing = missing_acks(sql, burst.acks)
    assert missing == [], f"{len(missing)} of {len(burst.acks)} acknowledged tasks are missing: {missing[:3]}"
    wait_until(lambda: not any(alive(p) for p in family), 5, what="every server process gone")
    assert runlater_processes(port) == set()
