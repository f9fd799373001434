"""The supervisor, exercised with real processes.

Each multi-process test runs ``tests/master_children.py`` (a Supervisor with chosen child targets)
in a subprocess and watches its pipes: ``READY`` and ``child|kind|index|generation|pid`` lines on
stdout, the supervisor's log on stderr. Everything waits on a pipe, a socket or a pidfd with a
deadline; nothing sleeps and hopes.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from runlater.core.heartbeat import HeartbeatBoard
from runlater.core.master import (
    ChildSpec,
    Supervisor,
    enable_reuseport_migration,
    raise_nofile_limit,
)

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "master_children.py"
MIGRATE_SYSCTL = Path("/proc/sys/net/ipv4/tcp_migrate_req")


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Child:
    kind: str
    index: int
    generation: int
    pid: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie nobody has reaped yet counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_dead(pid: int, timeout: float) -> bool:
    """Wait on a pidfd, which becomes readable when the process terminates (ours or not)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.poll(int(timeout * 1000))
    finally:
        os.close(fd)
    return not is_alive(pid)


def ask(port: int, timeout: float = 5.0) -> tuple[int, int]:
    """One request to the TCP server children: returns (pid, generation) of the answering child."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        data = b""
        while chunk := s.recv(64):
            data += chunk
    if not data:
        raise ConnectionError("connection closed without an answer")
    pid, generation = data.split()
    return int(pid), int(generation)


class Master:
    """A supervisor driver running in a subprocess, with its output collected by two threads."""

    def __init__(self, tmp_path: Path, port: int, config: dict) -> None:
        self.port = port
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
            RUNLATER_TEST_PORT=str(port),
            RUNLATER_TEST_DIR=str(tmp_path),
        )
        self.proc = subprocess.Popen(
            [sys.executable, str(DRIVER), json.dumps(config)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )
        self._cond = threading.Condition()
        self.out: list[str] = []
        self.err: list[str] = []
        self._pumps = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._pumps:
            t.start()

    def _pump(self, stream, lines: list[str]) -> None:
        for raw in stream:
            with self._cond:
                lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _describe(self) -> str:
        return "\nstdout:\n" + "\n".join(self.out) + "\nstderr:\n" + "\n".join(self.err)

    def wait_line(
        self, lines: list[str], match: Callable[[str], bool], timeout: float, start: int = 0
    ) -> str:
        """The first line at index >= ``start`` that matches; fails after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in lines[start:]:
                    if match(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"no matching line within {timeout}s" + self._describe())
                self._cond.wait(left)

    def wait_ready(self, timeout: float = 10.0) -> None:
        self.wait_line(self.out, lambda line: line == "READY", timeout)

    def wait_log(self, text: str, timeout: float = 10.0, start: int = 0) -> str:
        return self.wait_line(self.err, lambda line: text in line, timeout, start)

    def children(self) -> list[Child]:
        with self._cond:
            lines = list(self.out)
        found = []
        for line in lines:
            if line.startswith("child|"):
                _, kind, index, generation, pid = line.split("|")
                found.append(Child(kind, int(index), int(generation), int(pid)))
        return found

    def wait_child(self, match: Callable[[Child], bool], timeout: float) -> Child:
        line = self.wait_line(
            self.out,
            lambda line: line.startswith("child|") and match(_parse_child(line)),
            timeout,
        )
        return _parse_child(line)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"master still running after {timeout}s" + self._describe())

    def cleanup(self) -> None:
        """Whatever a failed test left behind: the master, then any child it announced."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for child in self.children():
            if is_alive(child.pid):
                try:
                    os.kill(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for t in self._pumps:
            t.join(5)
        self.proc.stdout.close()
        self.proc.stderr.close()


def _parse_child(line: str) -> Child:
    _, kind, index, generation, pid = line.split("|")
    return Child(kind, int(index), int(generation), int(pid))


@pytest.fixture
def start_master(tmp_path):
    started: list[Master] = []

    def start(specs, **config) -> Master:
        master = Master(tmp_path, free_port(), {"specs": specs, **config})
        started.append(master)
        return master

    yield start
    for master in started:
        master.cleanup()


def assert_all_dead(master: Master, timeout: float = 5.0) -> None:
    children = master.children()
    assert children, "the test expected children to have been started"
    alive = [c for c in children if not wait_dead(c.pid, timeout)]
    assert not alive, f"children outlived the master: {alive}"


WEB = ["http worker", 2, "tcp_server"]
EXECUTOR = ["executor", 1, "idle"]


# --------------------------------------------------------------------------- start and stop


@pytest.mark.slow
def test_ready_line_after_every_child_is_ready_and_sigterm_stops_cleanly(start_master):
    master = start_master([WEB, EXECUTOR], graceful_timeout=3.0)
    master.wait_ready()
    children = master.children()
    assert sorted((c.kind, c.index) for c in children) == [
        ("executor", 0), ("http worker", 0), ("http worker", 1)
    ]
    # READY comes after every child announced itself, i.e. on_all_ready waited for all of them.
    assert master.out.index("READY") == len(master.out) - 1
    pid, generation = ask(master.port)
    assert pid in {c.pid for c in children if c.kind == "http worker"}
    assert generation == 0

    began = time.monotonic()
    master.signal(signal.SIGTERM)
    assert master.wait_exit(4.0) == 0
    assert time.monotonic() - began < 4.0
    # The master reaps its children before returning, so none may exist at all now.
    assert not [c for c in children if is_alive(c.pid)]
    assert any("SIGTERM received: stopping gracefully" in line for line in master.err)
    with pytest.raises(ConnectionRefusedError):
        ask(master.port)


@pytest.mark.slow
def test_sigint_stops_like_sigterm(start_master):
    master = start_master([EXECUTOR])
    master.wait_ready()
    master.signal(signal.SIGINT)
    assert master.wait_exit(4.0) == 0
    assert_all_dead(master, timeout=0.1)


@pytest.mark.slow
def test_child_ignoring_sigterm_is_killed_at_graceful_timeout(start_master):
    master = start_master([["stuck", 1, "stubborn"], EXECUTOR], graceful_timeout=1.5)
    master.wait_ready()
    began = time.monotonic()
    master.signal(signal.SIGTERM)
    assert master.wait_exit(3.5) == 0
    took = time.monotonic() - began
    assert 1.4 <= took < 2.5, took
    assert_all_dead(master, timeout=0.1)
    master.wait_log("graceful stop timed out after 1.5s: killing 1 children", timeout=1)


@pytest.mark.slow
def test_second_stop_signal_kills_at_once(start_master):
    master = start_master([["stuck", 1, "stubborn"]], graceful_timeout=30.0)
    master.wait_ready()
    master.signal(signal.SIGTERM)
    master.wait_log("SIGTERM received: stopping gracefully")
    began = time.monotonic()
    master.signal(signal.SIGINT)
    assert master.wait_exit(3.0) == 0
    assert time.monotonic() - began < 2.0
    master.wait_log("SIGINT during graceful stop: killing children now", timeout=1)
    assert_all_dead(master, timeout=0.1)


@pytest.mark.slow
def test_children_die_with_a_sigkilled_master(start_master):
    master = start_master([WEB, EXECUTOR])
    master.wait_ready()
    assert len(master.children()) == 3
    master.proc.kill()
    master.wait_exit(5.0)
    # Nobody reaps or signals them now but the kernel's parent-death signal.
    assert_all_dead(master, timeout=5.0)


@pytest.mark.slow
def test_master_failure_kills_children_before_propagating(start_master):
    master = start_master([WEB, EXECUTOR], fail_on_ready=True)
    assert master.wait_exit(10.0) == 1  # the uncaught exception's exit code
    master.wait_log("on_all_ready failed on purpose", timeout=1)
    master.wait_log("supervisor failed; killed 3 children", timeout=1)
    assert_all_dead(master, timeout=0.1)


# --------------------------------------------------------------------------- boot failures


@pytest.mark.slow
def test_child_exiting_before_ready_at_start_stops_master_with_exit_1(start_master):
    master = start_master([WEB, ["executor", 1, "exit_at_boot"]])
    began = time.monotonic()
    assert master.wait_exit(5.0) == 1
    assert time.monotonic() - began < 5.0
    errors = [line for line in master.err if line.startswith("ERROR")]
    assert len(errors) == 1, master.err
    assert "executor 0 (pid" in errors[0]
    assert "exited with code 3 before it was ready; stopping" in errors[0]
    assert "READY" not in master.out
    # Exactly one attempt: no crash loop.
    assert len([c for c in master.children() if c.kind == "executor"]) == 1
    assert_all_dead(master, timeout=0.1)


@pytest.mark.slow
def test_child_not_ready_within_boot_timeout_stops_master_with_exit_1(start_master):
    master = start_master([EXECUTOR, ["slow", 1, "never_ready"]], boot_timeout=1.0)
    assert master.wait_exit(5.0) == 1
    master.wait_log("ERROR runlater.master: slow 0 (pid", timeout=1)
    master.wait_log("did not become ready within 1s; stopping", timeout=1)
    assert "READY" not in master.out
    assert_all_dead(master, timeout=0.1)


@pytest.mark.slow
def test_replacement_that_cannot_boot_backs_off_then_stops_master(start_master, tmp_path):
    master = start_master([["flaky", 1, "fails_if_marker"]], max_boot_failures=3)
    master.wait_ready()
    first = master.children()[0]
    (tmp_path / "fail").touch()
    os.kill(first.pid, signal.SIGKILL)
    master.wait_log("retrying in 1s (failed start 1 of 2 allowed)")
    began = time.monotonic()
    master.wait_log("retrying in 2s (failed start 2 of 2 allowed)", timeout=5)
    assert master.wait_exit(10.0) == 1
    # 1 s then 2 s of back-off between the first failure and the third.
    assert time.monotonic() - began >= 2.9
    master.wait_log("exited with code 4 before it was ready; 3 failed starts in a row, stopping",
                    timeout=1)
    assert len(master.children()) == 4  # the original and three failed attempts
    assert_all_dead(master, timeout=0.1)


@pytest.mark.slow
def test_replacement_boots_again_once_the_cause_is_gone(start_master, tmp_path):
    master = start_master([["flaky", 1, "fails_if_marker"]], max_boot_failures=5)
    master.wait_ready()
    first = master.children()[0]
    (tmp_path / "fail").touch()
    os.kill(first.pid, signal.SIGKILL)
    mark = master.wait_log("retrying in 1s (failed start 1 of 4 allowed)")
    (tmp_path / "fail").unlink()
    start = master.err.index(mark)
    ready = master.wait_log("ready (generation 0)", timeout=5, start=start)
    assert f"(pid {first.pid})" not in ready
    master.signal(signal.SIGTERM)
    assert master.wait_exit(4.0) == 0
    assert_all_dead(master, timeout=0.1)


# --------------------------------------------------------------------------- replacing children


@pytest.mark.slow
def test_killed_child_is_replaced_and_the_new_one_answers(start_master):
    master = start_master([WEB, EXECUTOR])
    master.wait_ready()
    victim = next(c for c in master.children() if c.kind == "http worker" and c.index == 1)
    os.kill(victim.pid, signal.SIGKILL)
    master.wait_log(f"http worker 1 (pid {victim.pid}) exited with signal 9 (SIGKILL); replacing")
    new = master.wait_child(lambda c: c.kind == "http worker" and c.index == 1
                            and c.pid != victim.pid, timeout=5)
    assert new.generation == 0
    # Connections are spread over listeners by a hash of the client's address and port; a few
    # dozen fresh connections reach each of two listeners with near certainty.
    answered = {ask(master.port)[0] for _ in range(200)}
    assert new.pid in answered
    assert victim.pid not in answered
    master.signal(signal.SIGTERM)
    assert master.wait_exit(4.0) == 0
    assert_all_dead(master, timeout=0.1)


@pytest.mark.slow
def test_hung_child_is_killed_and_replaced_while_beating_children_are_left_alone(start_master):
    master = start_master([["hang", 1, "hang_after_ready"], EXECUTOR], heartbeat_timeout=1.0)
    master.wait_ready()
    began = time.monotonic()
    first = next(c for c in master.children() if c.kind == "hang")
    second = master.wait_child(lambda c: c.kind == "hang" and c.pid != first.pid, timeout=4)
    assert time.monotonic() - began < 3.0
    master.wait_log(f"hang 0 (pid {first.pid}) sent no heartbeat for")
    assert wait_dead(first.pid, 1.0)
    # The replacement hangs as well and is replaced in turn: detection keeps working.
    master.wait_child(lambda c: c.kind == "hang" and c.pid not in (first.pid, second.pid),
                      timeout=4)
    # Two heartbeat timeouts have passed; the executor, which beats, was never touched.
    assert len([c for c in master.children() if c.kind == "executor"]) == 1
    assert not any("executor 0" in line and "heartbeat" in line for line in master.err)
    master.signal(signal.SIGTERM)
    assert master.wait_exit(4.0) == 0
    assert_all_dead(master, timeout=0.1)


class Hammer:
    """Client threads that request in a loop until stopped (bounded by count and time)."""

    def __init__(self, port: int, threads: int = 4, max_requests: int = 200_000,
                 max_seconds: float = 60.0) -> None:
        self.port = port
        self.answers: list[tuple[int, int]] = []
        self.errors: list[str] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._max_requests = max_requests
        self._deadline = time.monotonic() + max_seconds
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            try:
                answer = ask(self.port)
            except OSError as exc:
                with self._cond:
                    self.errors.append(repr(exc))
                    self._cond.notify_all()
                continue
            with self._cond:
                self.answers.append(answer)
                self._cond.notify_all()
                if len(self.answers) + len(self.errors) >= self._max_requests:
                    return

    def wait_answers(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.answers) < count:
                left = deadline - time.monotonic()
                assert left > 0, f"only {len(self.answers)} answers, errors: {self.errors[:5]}"
                self._cond.wait(left)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)


@pytest.mark.slow
def test_sighup_replaces_every_child_without_refusing_a_connection(start_master):
    # One HTTP worker: with a sibling listener to fall back on, even an old-before-new reload would
    # refuse nothing, so only a single worker shows that the new child listens before the old
    # one closes.
    master = start_master([["http worker", 1, "tcp_server"], EXECUTOR],
                          graceful_timeout=5.0, migrate=True)
    master.wait_ready()
    if MIGRATE_SYSCTL.read_text().strip() != "1":
        pytest.skip("net.ipv4.tcp_migrate_req is not 1 (needs root and Linux 5.14+)")
    old = master.children()
    reloads = 2
    hammer = Hammer(master.port)
    try:
        hammer.wait_answers(200)
        for generation in range(1, reloads + 1):
            master.signal(signal.SIGHUP)
            master.wait_log(f"reload complete: generation {generation} serving", timeout=20)
        # Every older child has exited by now; what answers from here on is the last generation.
        with hammer._cond:
            after = len(hammer.answers)
        hammer.wait_answers(after + 500)
    finally:
        hammer.stop()

    assert hammer.errors == [], f"{len(hammer.errors)} failed requests: {hammer.errors[:5]}"
    children = master.children()
    assert len(children) == len(old) * (reloads + 1)
    newest = [c for c in children if c.generation == reloads]
    assert sorted((c.kind, c.index) for c in newest) == sorted((c.kind, c.index) for c in old)
    assert not [c for c in children if c.generation < reloads and is_alive(c.pid)]
    web = {c.generation: c.pid for c in children if c.kind == "http worker"}
    # Generation 0 answered before the reloads, only the last one after them, and nothing else.
    assert set(hammer.answers) <= {(pid, gen) for gen, pid in web.items()}
    assert set(hammer.answers[:200]) == {(web[0], 0)}
    assert set(hammer.answers[after:]) == {(web[reloads], reloads)}
    master.signal(signal.SIGTERM)
    assert master.wait_exit(7.0) == 0
    assert_all_dead(master, timeout=0.1)


# --------------------------------------------------------------------------- in-process pieces


def test_heartbeat_board_slots_are_independent():
    board = HeartbeatBoard(3)
    try:
        board.stamp(0, 10.0)
        board.stamp(2, 30.0)
        before = time.monotonic()
        board.beat(1)
        assert board.last(0) == 10.0
        assert board.last(1) >= before
        assert board.last(2) == 30.0
    finally:
        board.close()


def test_supervisor_rejects_bad_settings():
    spec = ChildSpec("executor", 1, lambda ctx: None)
    with pytest.raises(ValueError, match="heartbeat_timeout"):
        Supervisor([spec], heartbeat_timeout=0)
    with pytest.raises(ValueError, match="max_boot_failures"):
        Supervisor([spec], max_boot_failures=0)
    with pytest.raises(ValueError, match="count"):
        ChildSpec("executor", -1, lambda ctx: None)


def test_raise_nofile_limit_reaches_the_hard_limit(caplog):
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with caplog.at_level(logging.WARNING, logger="runlater.master"):
        soft = raise_nofile_limit()
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == soft
    if hard != resource.RLIM_INFINITY:
        assert soft == hard
    assert (soft < 65536) == any("open-file limit" in r.message for r in caplog.records)


def test_reuseport_migration_switches_the_sysctl_on_when_root(tmp_path, caplog, monkeypatch):
    sysctl = tmp_path / "tcp_migrate_req"
    log = logging.getLogger("runlater.master")

    with caplog.at_level(logging.INFO, logger="runlater.master"):
        assert enable_reuseport_migration(log, path=str(sysctl)) is False
    assert "does not exist" in caplog.records[-1].message

    sysctl.write_text("1\n")
    assert enable_reuseport_migration(log, path=str(sysctl)) is True

    sysctl.write_text("0\n")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with caplog.at_level(logging.INFO, logger="runlater.master"):
        assert enable_reuseport_migration(log, path=str(sysctl)) is False
    assert caplog.records[-1].levelno == logging.WARNING
    assert sysctl.read_text() == "0\n"

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with caplog.at_level(logging.INFO, logger="runlater.master"):
        assert enable_reuseport_migration(log, path=str(sysctl)) is True
    assert caplog.records[-1].levelno == logging.INFO
    assert sysctl.read_text() == "1"
