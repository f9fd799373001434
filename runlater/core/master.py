"""The master process: fork the children, keep every position filled, stop them cleanly.

The supervisor knows nothing about HTTP or SQL. It is given a list of ``ChildSpec`` (a kind such as
``"http worker"``, how many, and the function each child runs) and keeps that many live, healthy
children of each kind until it is told to stop.

Why it is built this way:

* The master has no event loop and no threads, and it creates nothing process-wide before forking:
  every child starts from a quiet, single-threaded process. Children build their own listeners
  (``SO_REUSEPORT``), loops and pools after the fork.
* Signal handlers only append to a queue; ``signal.set_wakeup_fd`` turns a signal into a byte on a
  self-pipe so the one ``poll()`` the master sleeps in wakes for signals, for "ready" bytes from
  children and for its next deadline alike. All decisions are taken in the main loop.
* Liveness is judged by heartbeats in shared memory (``heartbeat.py``), not only by exit: a child
  stuck in a tight loop or a deadlock is as useless as a dead one.
* A child that cannot boot while the service starts means the service cannot work (bad port, bad
  database URL): the master stops with exit code 1 and one line saying which child and why, instead
  of restarting it forever. Later boot failures are retried with back-off, because the service is
  already up and the cause is more likely transient.
* SIGHUP replaces children one position at a time, new before old: the fresh child binds its own
  listener and reports ready while the old one still serves, and only then is the old one asked to
  drain. One at a time so that a reload never doubles every process's database connections at once.

The caller must keep the master quiet too: no threads, event loops or database pools before
``run()``, because a fork copies only the forking thread and whatever state the others left locked.
Call ``raise_nofile_limit()`` and ``enable_reuseport_migration()`` before ``run()`` so that every
child inherits their effect.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import resource
import select
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from runlater.core.heartbeat import HeartbeatBoard

__all__ = [
    "ChildContext",
    "ChildSpec",
    "Supervisor",
    "enable_reuseport_migration",
    "raise_nofile_limit",
]

_LOG = logging.getLogger("runlater.master")

# Signals the master acts on. They are blocked around fork() so that one arriving between the
# fork and the child's reset never runs the master's handler (or pokes its pipe) in the child.
_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# Longest the master sleeps without re-checking clocks; deadlines usually wake it sooner.
_TICK = 1.0
# Back-off after the n-th consecutive boot failure of a position: 1, 2, 4, ... capped.
_BACKOFF_FIRST = 1.0
_BACKOFF_CAP = 30.0
# A position holds at most its serving child and the one booting to replace it, plus children that
# are draining after a reload. Three slots per position covers back-to-back reloads; if they run out
# the next spawn simply waits until a draining child is reaped (bounded by graceful_timeout).
_SLOTS_PER_POSITION = 3

_PR_SET_PDEATHSIG = 1

_MIGRATE_SYSCTL = "/proc/sys/net/ipv4/tcp_migrate_req"
_NR_OPEN = "/proc/sys/fs/nr_open"
_NOFILE_WANTED = 65536


@dataclass(frozen=True)
class ChildSpec:
    """``count`` children of one ``kind``, each running ``target(context)`` in its own process.

    ``kind`` is the human noun used in log lines ("http worker", "executor"). ``target`` must not
    return until the child should exit; returning means exit code 0, ``SystemExit`` its code, any
    other exception exit code 1 after the traceback is logged.
    """

    kind: str
    count: int
    target: Callable[[ChildContext], None]

    def __post_init__(self) -> None:
        if not self.kind:
            raise ValueError("ChildSpec.kind must be a non-empty name")
        if self.count < 0:
            raise ValueError(f"ChildSpec.count for {self.kind!r} must be >= 0, got {self.count}")
        if not callable(self.target):
            raise TypeError(f"ChildSpec.target for {self.kind!r} must be callable")


class ChildContext:
    """What a child gets from the master: who it is, and two ways to report back.

    ``heartbeat()`` must be called regularly (well within the master's heartbeat timeout) once the
    child is ready; it is one store into shared memory. ``ready()`` is called once, when the child
    is serving. Stop requests arrive as SIGTERM/SIGINT, which the child handles itself.
    """

    __slots__ = ("_board", "_ready_fd", "_slot", "generation", "index", "kind")

    def __init__(
        self,
        kind: str,
        index: int,
        generation: int,
        board: HeartbeatBoard,
        slot: int,
        ready_fd: int,
    ) -> None:
        self.kind = kind
        self.index = index
        self.generation = generation
        self._board = board
        self._slot = slot
        self._ready_fd = ready_fd

    def heartbeat(self) -> None:
        self._board.beat(self._slot)

    def ready(self) -> None:
        fd, self._ready_fd = self._ready_fd, -1
        if fd < 0:
            return
        try:
            os.write(fd, b"\x01")
        except OSError:
            pass  # the master is gone; the parent-death signal ends this process shortly
        finally:
            os.close(fd)


class _Position:
    """One place the supervisor keeps filled: ``kind`` number ``index``.

    ``current`` is the child serving there (ready), ``incoming`` the one booting to fill or take
    over the place. ``failures`` counts consecutive boot failures; ``retry_at`` is the earliest
    monotonic time the next attempt may start.
    """

    __slots__ = ("current", "failures", "incoming", "index", "retry_at", "spec")

    def __init__(self, spec: ChildSpec, index: int) -> None:
        self.spec = spec
        self.index = index
        self.current: _Child | None = None
        self.incoming: _Child | None = None
        self.failures = 0
        self.retry_at = 0.0


class _Child:
    """One forked process: booting while ``ready_at`` is None, draining once ``retired_at`` is
    set (it has been sent SIGTERM), and ``killed`` once it has been sent SIGKILL."""

    __slots__ = (
        "generation",
        "kill_reason",
        "killed",
        "pid",
        "position",
        "ready_at",
        "ready_fd",
        "retired_at",
        "slot",
        "started_at",
    )

    def __init__(
        self, position: _Position, generation: int, pid: int, slot: int, ready_fd: int, now: float
    ) -> None:
        self.position = position
        self.generation = generation
        self.pid = pid
        self.slot = slot
        self.ready_fd = ready_fd
        self.started_at = now
        self.ready_at: float | None = None
        self.retired_at: float | None = None
        self.killed = False
        self.kill_reason: str | None = None

    @property
    def name(self) -> str:
        return f"{self.position.spec.kind} {self.position.index} (pid {self.pid})"


_STARTING, _RUNNING, _STOPPING, _DONE = "starting", "running", "stopping", "done"


class Supervisor:
    """Forks and watches the children described by ``specs``; see ``run()`` for the lifecycle.

    ``on_all_ready`` is called once, in the master, when every child of the first start has called
    ``ready()``. ``pre_fork`` is called in the master before every fork. ``failure`` holds the
    one-line reason after ``run()`` returned 1 (the same line is logged at error level).
    """

    def __init__(
        self,
        specs: list[ChildSpec],
        *,
        on_all_ready: Callable[[], None] | None = None,
        heartbeat_timeout: float = 30.0,
        graceful_timeout: float = 10.0,
        boot_timeout: float = 30.0,
        max_boot_failures: int = 5,
        pre_fork: Callable[[], None] | None = None,
        log: logging.Logger = _LOG,
    ) -> None:
        for name, value in (
            ("heartbeat_timeout", heartbeat_timeout),
            ("graceful_timeout", graceful_timeout),
            ("boot_timeout", boot_timeout),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if max_boot_failures < 1:
            raise ValueError(f"max_boot_failures must be >= 1, got {max_boot_failures}")
        self._positions = [_Position(spec, i) for spec in specs for i in range(spec.count)]
        self._on_all_ready = on_all_ready
        self._heartbeat_timeout = heartbeat_timeout
        self._graceful_timeout = graceful_timeout
        self._boot_timeout = boot_timeout
        self._max_boot_failures = max_boot_failures
        self._pre_fork = pre_fork
        self._log = log
        self.failure: str | None = None

        # Lifecycle state, touched only by the main loop.
        self._phase = _STARTING
        self._exit_code = 0
        self._generation = 0
        self._reloading: _Position | None = None  # the one position being replaced by a reload
        self._reload_pending = False
        self._stop_deadline = math.inf
        self._wake_at = 0.0
        self._children: dict[int, _Child] = {}  # pid -> every child not yet reaped

        # Written by signal handlers, drained by the main loop. list.append is atomic with respect
        # to Python-level signal handlers, which run between bytecodes of the main thread.
        self._signals: list[int] = []

        # Created by run(), so that building a Supervisor has no side effects.
        self._master_pid = 0
        self._board: HeartbeatBoard | None = None
        self._free_slots: list[int] = []
        self._wake_r = -1
        self._wake_w = -1
        self._saved_handlers: dict[int, object] = {}
        self._saved_wakeup_fd = -1
        self._prctl: Callable[..., int] | None = None

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        """Run the children until told to stop, and return the exit code for the process.

        Lifecycle:

        1. *starting*: one child is forked per position. When every one has called ``ready()``,
           ``on_all_ready()`` is called and the supervisor is *running*. A child that exits, or
           does not report ready within ``boot_timeout``, stops everything with exit code 1.
        2. *running*: a ready child that exits (for any reason) is replaced in its position at once;
           one whose heartbeat is older than ``heartbeat_timeout`` is SIGKILLed and replaced. A
           replacement that fails to boot is retried after 1 s, 2 s, 4 s ... (at most 30 s); after
           ``max_boot_failures`` consecutive failures the supervisor stops with exit code 1.
           SIGHUP replaces every child, one position at a time, new before old.
        3. *stopping* (SIGTERM/SIGINT, or a fatal boot failure): every child gets SIGTERM; those
           still alive after ``graceful_timeout`` (or at once, on a second SIGTERM/SIGINT) get
           SIGKILL. When all are reaped, ``run()`` returns 0 (1 after a failure).

        Each turn of the loop: wait for a signal, a ready byte or the next deadline; handle the
        queued signals; note children that reported ready; reap children that exited; maintain
        (act on deadlines, start or replace children). Only ``_maintain`` looks at clocks.

        If the master itself fails, every child is SIGKILLed and reaped before the exception
        propagates, so a crashed master never leaves orphans behind.
        """
        if self._master_pid:
            raise RuntimeError("Supervisor.run() can be called only once")
        self._master_pid = os.getpid()
        try:
            self._open()
            self._maintain()
            while self._phase is not _DONE:
                self._wait()
                self._handle_signals()
                self._collect_ready()
                self._reap()
                self._maintain()
            return self._exit_code
        except BaseException:
            self._kill_everything()
            raise
        finally:
            self._close()

    def _wait(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        for child in self._children.values():
            if child.ready_fd >= 0:
                poller.register(child.ready_fd, select.POLLIN)
        if not self._signals:
            timeout = max(0.0, self._wake_at - time.monotonic())
            poller.poll(math.ceil(timeout * 1000))
        # The bytes in the wake-up pipe carry nothing the queue does not; empty it so the next
        # poll() sleeps.
        while True:
            try:
                if not os.read(self._wake_r, 512):
                    break
            except BlockingIOError:
                break

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum in _STOP_SIGNALS:
                name = signal.Signals(signum).name
                if self._phase is _STOPPING:
                    self._log.warning("%s during graceful stop: killing children now", name)
                    self._kill_remaining()
                else:
                    self._log.info("%s received: stopping gracefully", name)
                    self._begin_stop(0)
            elif signum == signal.SIGHUP:
                self._begin_reload()
            # SIGCHLD needs no handling of its own: it woke the loop, and _reap runs every turn.

    def _collect_ready(self) -> None:
        for child in list(self._children.values()):
            if child.ready_fd >= 0:
                self._read_ready(child)

    def _reap(self) -> None:
        # Only our own pids: waitpid(-1) would also steal the exit status of processes the caller
        # started itself (e.g. with subprocess), which then could not be waited for.
        for pid, child in list(self._children.items()):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0  # someone else reaped it; all we can say is that it is gone
            if done == 0:
                continue
            del self._children[pid]
            if child.ready_fd >= 0:
                # It may have reported ready and exited within one turn; then it counts as a
                # serving child that died, not a boot failure. It is not promoted, though: that
                # would retire the child it was meant to replace.
                self._read_ready(child, promote=False)
            if child.ready_fd >= 0:
                os.close(child.ready_fd)
                child.ready_fd = -1
            self._free_slots.append(child.slot)
            self._on_exit(child, status)

    def _maintain(self) -> None:
        now = time.monotonic()
        wake = now + _TICK
        if self._phase is _STOPPING:
            if not self._children:
                self._phase = _DONE
                return
            if now >= self._stop_deadline:
                stragglers = [c for c in self._children.values() if not c.killed]
                if stragglers:
                    self._log.warning(
                        "graceful stop timed out after %.1fs: killing %d children",
                        self._graceful_timeout, len(stragglers),
                    )
                    self._kill_remaining()
            else:
                wake = min(wake, self._stop_deadline)
            self._wake_at = wake
            return

        for child in list(self._children.values()):
            if child.killed:
                continue
            wake = min(wake, self._check_deadline(child, now))

        if self._phase is _STARTING and all(p.current is not None for p in self._positions):
            self._phase = _RUNNING
            self._log.info("all %d children ready", len(self._positions))
            if self._on_all_ready is not None:
                self._on_all_ready()

        self._advance_reload()
        for pos in self._positions:
            if self._phase is _STOPPING:
                break  # a fork failure during start-up just gave up
            if pos.incoming is not None:
                continue
            if pos.current is not None and pos is not self._reloading:
                continue
            if now < pos.retry_at:
                wake = min(wake, pos.retry_at)
                continue
            self._spawn(pos)
        self._wake_at = wake

    # ------------------------------------------------------------------ events

    def _read_ready(self, child: _Child, promote: bool = True) -> None:
        try:
            data = os.read(child.ready_fd, 1)
        except BlockingIOError:
            return
        os.close(child.ready_fd)
        child.ready_fd = -1
        if data and promote:
            self._on_ready(child)
        elif data:
            child.ready_at = time.monotonic()
        # An empty read means the child closed its end without reporting ready: it is exiting,
        # and _reap will say how. If it somehow lives on, the boot deadline still applies.

    def _on_ready(self, child: _Child) -> None:
        child.ready_at = time.monotonic()
        pos = child.position
        if self._phase is _STOPPING or child.retired_at is not None or pos.incoming is not child:
            return
        pos.incoming = None
        pos.failures = 0
        old, pos.current = pos.current, child
        self._log.info("%s ready (generation %d)", child.name, child.generation)
        if old is not None:
            self._retire(old, f"replaced by pid {child.pid}")
        if pos is self._reloading:
            self._reloading = None

    def _on_exit(self, child: _Child, status: int) -> None:
        pos = child.position
        how = _describe_exit(status)
        if pos.current is child:
            pos.current = None
        if pos.incoming is child:
            pos.incoming = None
        if self._phase is _STOPPING or child.retired_at is not None:
            self._log.info("%s %s", child.name, how)
            return
        if child.ready_at is not None:
            self._log.warning("%s %s; replacing", child.name, how)
            pos.retry_at = 0.0
            return
        reason = child.kill_reason or f"{how} before it was ready"
        self._boot_failed(pos, f"{child.name} {reason}")

    def _boot_failed(self, pos: _Position, what: str) -> None:
        if self._phase is _STARTING:
            self._abort(f"{what}; stopping")
            return
        pos.failures += 1
        if pos.failures >= self._max_boot_failures:
            self._abort(f"{what}; {pos.failures} failed starts in a row, stopping")
            return
        delay = min(_BACKOFF_CAP, _BACKOFF_FIRST * 2.0 ** (pos.failures - 1))
        pos.retry_at = time.monotonic() + delay
        self._log.warning(
            "%s; retrying in %.0fs (failed start %d of %d allowed)",
            what, delay, pos.failures, self._max_boot_failures - 1,
        )

    def _check_deadline(self, child: _Child, now: float) -> float:
        """Kill ``child`` if it is past its deadline; otherwise return that deadline."""
        if child.retired_at is not None:
            deadline = child.retired_at + self._graceful_timeout
            if now >= deadline:
                self._log.warning(
                    "%s still running %.1fs after SIGTERM; killing it",
                    child.name, self._graceful_timeout,
                )
                self._kill(child, "did not drain in time")
        elif child.ready_at is None:
            deadline = child.started_at + self._boot_timeout
            if now >= deadline:
                reason = f"did not become ready within {self._boot_timeout:g}s"
                self._log.warning("%s %s; killing it", child.name, reason)
                self._kill(child, reason)
        else:
            assert self._board is not None
            last = max(self._board.last(child.slot), child.ready_at)
            deadline = last + self._heartbeat_timeout
            if now >= deadline:
                self._log.warning(
                    "%s sent no heartbeat for %.1fs; killing it", child.name, now - last
                )
                self._kill(child, "stopped sending heartbeats")
        return deadline

    # ------------------------------------------------------------------ transitions

    def _begin_reload(self) -> None:
        if self._phase is not _RUNNING:
            self._log.warning("SIGHUP while %s: ignored", self._phase)
            return
        self._generation += 1
        self._reload_pending = True
        self._log.info(
            "SIGHUP received: replacing %d children with generation %d",
            len(self._positions), self._generation,
        )

    def _advance_reload(self) -> None:
        """Pick the next position to replace, one at a time, until every one is current."""
        if not self._reload_pending or self._phase is not _RUNNING or self._reloading is not None:
            return
        for pos in self._positions:
            cur = pos.current
            # A position without a serving child, or with one booting, is left alone: a child
            # started after SIGHUP is already the new generation, and an older one that is still
            # booting becomes a stale current child that a later turn picks up.
            if cur is not None and pos.incoming is None and cur.generation < self._generation:
                self._reloading = pos
                return
        # Complete once every position serves the new generation and the old one has exited.
        if all(
            p.current is not None and p.current.generation == self._generation
            for p in self._positions
        ) and all(c.retired_at is None for c in self._children.values()):
            self._reload_pending = False
            self._log.info("reload complete: generation %d serving", self._generation)

    def _retire(self, child: _Child, why: str) -> None:
        child.retired_at = time.monotonic()
        self._log.info("%s %s; sending SIGTERM", child.name, why)
        self._send(child, signal.SIGTERM)

    def _abort(self, message: str) -> None:
        self.failure = message
        self._log.error("%s", message)
        self._begin_stop(1)

    def _begin_stop(self, code: int) -> None:
        if self._phase is _STOPPING:
            return
        self._phase = _STOPPING
        self._exit_code = code
        self._stop_deadline = time.monotonic() + self._graceful_timeout
        self._reloading = None
        self._reload_pending = False
        for child in self._children.values():
            # Draining children already have their SIGTERM; a second one could mean "hurry".
            if child.retired_at is None:
                child.retired_at = time.monotonic()
                self._send(child, signal.SIGTERM)

    def _kill(self, child: _Child, reason: str) -> None:
        child.killed = True
        child.kill_reason = reason
        self._send(child, signal.SIGKILL)

    def _kill_remaining(self) -> None:
        for child in self._children.values():
            if not child.killed:
                self._kill(child, "killed during stop")

    def _send(self, child: _Child, signum: int) -> None:
        # Safe against pid reuse: an unreaped child's pid stays ours until we waitpid() it.
        try:
            os.kill(child.pid, signum)
        except ProcessLookupError:
            pass

    def _kill_everything(self) -> None:
        """Last resort when the master itself fails: no child may outlive it."""
        if os.getpid() != self._master_pid:
            return  # never in a child: it leaves through os._exit, but be certain
        for child in self._children.values():
            self._send(child, signal.SIGKILL)
        for pid in list(self._children):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        if self._children:
            self._log.error("supervisor failed; killed %d children", len(self._children))
        self._children.clear()

    # ------------------------------------------------------------------ fork

    def _spawn(self, pos: _Position) -> None:
        if not self._free_slots:
            return  # draining children still hold every slot; retried when one is reaped
        assert self._board is not None
        slot = self._free_slots.pop()
        generation = self._generation
        now = time.monotonic()
        self._board.stamp(slot, now)
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(read_fd, False)
        if self._pre_fork is not None:
            self._pre_fork()
        # Anything buffered now would be written twice: once by us, once by the child.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        saved_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        try:
            pid = os.fork()
            if pid == 0:
                self._become_child(pos, generation, slot, read_fd, write_fd)
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, saved_mask)
            os.close(read_fd)
            os.close(write_fd)
            self._free_slots.append(slot)
            self._boot_failed(pos, f"{pos.spec.kind} {pos.index} could not be forked ({exc})")
            return
        signal.pthread_sigmask(signal.SIG_SETMASK, saved_mask)
        os.close(write_fd)
        child = _Child(pos, generation, pid, slot, read_fd, now)
        self._children[pid] = child
        pos.incoming = child
        self._log.debug("%s started (generation %d)", child.name, generation)

    def _become_child(
        self, pos: _Position, generation: int, slot: int, read_fd: int, write_fd: int
    ) -> None:
        """The first code a child runs. Never returns: the child leaves through ``os._exit`` so
        that none of the master's ``finally`` blocks, atexit hooks or buffers run in it."""
        code = 1
        try:
            # Defaults first, then unblock: a SIGTERM that arrived since the fork is delivered to
            # the default action, not to the master's handler.
            for signum in _HANDLED:
                signal.signal(signum, signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
            signal.pthread_sigmask(signal.SIG_SETMASK, ())
            self._die_with_master()
            # The master's pipes: a child writing into the wake-up pipe would wake the master for
            # nothing, and holding siblings' ready pipes would hide their EOF from the master.
            for fd in (self._wake_r, self._wake_w, read_fd):
                os.close(fd)
            for other in self._children.values():
                if other.ready_fd >= 0:
                    os.close(other.ready_fd)
            assert self._board is not None
            kind = pos.spec.kind
            pos.spec.target(ChildContext(kind, pos.index, generation, self._board, slot, write_fd))
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - whatever it was, log it and leave with code 1
            self._log.exception("%s %d (pid %d) crashed", pos.spec.kind, pos.index, os.getpid())
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError, AttributeError):
                    pass
            os._exit(code)

    def _die_with_master(self) -> None:
        assert self._prctl is not None
        if self._prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
        # The master may have died between fork() and prctl(); then nobody will signal us.
        if os.getppid() != self._master_pid:
            os._exit(1)

    # ------------------------------------------------------------------ setup and teardown

    def _open(self) -> None:
        # Loaded in the master so children do not dlopen() after fork.
        self._prctl = ctypes.CDLL(None, use_errno=True).prctl
        slots = max(1, _SLOTS_PER_POSITION * len(self._positions))
        self._board = HeartbeatBoard(slots)
        self._free_slots = list(range(slots - 1, -1, -1))
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        for signum in _HANDLED:
            self._saved_handlers[signum] = signal.signal(signum, self._on_signal)
        # The full-buffer warning would be noise: the queue, not the pipe, carries the signals.
        self._saved_wakeup_fd = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def _close(self) -> None:
        if os.getpid() != self._master_pid:
            return
        if self._wake_w >= 0:
            signal.set_wakeup_fd(self._saved_wakeup_fd)
        for signum, handler in self._saved_handlers.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._saved_handlers.clear()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        for child in self._children.values():
            if child.ready_fd >= 0:
                os.close(child.ready_fd)
                child.ready_fd = -1
        if self._board is not None:
            self._board.close()
            self._board = None


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = "unknown"
        return f"exited with signal {signum} ({name})"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"


def raise_nofile_limit(log: logging.Logger = _LOG) -> int:
    """Raise the soft open-file limit to the hard limit and return the new soft limit.

    Call it in the master before forking, so every child inherits it: each connection, pooled
    database connection and outbound request holds a descriptor, and the usual default soft
    limit of 1024 is reached long before the CPU is busy.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        # RLIMIT_NOFILE may not be set to "infinity"; the kernel's real ceiling is fs.nr_open.
        try:
            with open(_NR_OPEN) as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    if soft != resource.RLIM_INFINITY and soft < _NOFILE_WANTED:
        log.warning(
            "open-file limit is %d (hard limit); under load connections will fail with EMFILE"
            " before %d are open; raise it with `ulimit -Hn` or LimitNOFILE= in the unit file",
            soft, _NOFILE_WANTED,
        )
    return soft


def enable_reuseport_migration(
    log: logging.Logger = _LOG, *, path: str = _MIGRATE_SYSCTL
) -> bool:
    """Make sure ``net.ipv4.tcp_migrate_req`` is 1; return whether it is.

    With SO_REUSEPORT every HTTP worker owns its own listening socket. When a worker closes its
    listener (it is being replaced or stopped), connections still in that socket's accept queue are
    reset by default; with ``tcp_migrate_req=1`` (Linux 5.14+) the kernel moves them to a sibling
    listener instead, which is what lets SIGHUP replace workers without failing a connection.
    The setting is per network namespace and needs root; without it, the warning says so.
    """
    try:
        with open(path) as f:
            value = f.read().strip()
    except FileNotFoundError:
        log.warning(
            "%s does not exist (Linux < 5.14?): connections queued on a worker's listener"
            " when it closes will be reset", path,
        )
        return False
    except OSError as exc:
        log.warning("could not read %s: %s", path, exc)
        return False
    if value != "0":
        return True
    if os.geteuid() != 0:
        log.warning(
            "%s is 0 and we are not root: connections queued on a worker's listener when it"
            " closes will be reset; set net.ipv4.tcp_migrate_req=1 to avoid that", path,
        )
        return False
    try:
        with open(path, "w") as f:
            f.write("1")
    except OSError as exc:
        log.warning("could not set %s to 1: %s; queued connections may be reset on reload",
                    path, exc)
        return False
    log.info(
        "set net.ipv4.tcp_migrate_req=1: a closing worker's queued connections move to a sibling"
    )
    return True
