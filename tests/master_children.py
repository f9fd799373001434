"""Child targets for tests/test_master.py, and the driver that runs a Supervisor with them.

Run as ``python tests/master_children.py '<json config>'``. The driver writes ``READY`` on stdout
when ``on_all_ready`` fires and logs the supervisor at debug level on stderr. Every child writes
``child|<kind>|<index>|<generation>|<pid>`` on stdout as its first act, so a test learns each
child's pid from the same pipe. Writes use ``os.write`` of whole short lines, which a pipe keeps
atomic, so lines from different processes never interleave.

Environment: ``RUNLATER_TEST_PORT`` (port the TCP server children bind), ``RUNLATER_TEST_DIR``
(where ``fails_if_marker`` looks for the file ``fail``).
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import sys
import time

from runlater.core.master import (
    ChildContext,
    ChildSpec,
    Supervisor,
    enable_reuseport_migration,
)

BEAT_EVERY = 0.2


def _say(line: str) -> None:
    os.write(1, (line + "\n").encode())


def _announce(ctx: ChildContext) -> None:
    _say(f"child|{ctx.kind}|{ctx.index}|{ctx.generation}|{os.getpid()}")


def _stop_flag() -> list[bool]:
    """A flag that SIGTERM/SIGINT set; the child notices it within one beat."""
    flag = [False]

    def on_signal(signum: int, frame: object) -> None:
        flag[0] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return flag


def tcp_server(ctx: ChildContext) -> None:
    """Answer every connection with ``<pid> <generation>`` and close it.

    The client sends nothing, so closing never discards unread input (which would turn the close
    into a reset). On SIGTERM it answers what is already queued on its listener, then closes it;
    whatever lands in the queue after that is moved to a sibling by tcp_migrate_req.
    """
    stop = _stop_flag()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("127.0.0.1", int(os.environ["RUNLATER_TEST_PORT"])))
    listener.listen(512)
    listener.setblocking(False)
    answer = f"{os.getpid()} {ctx.generation}\n".encode()
    _announce(ctx)
    ctx.ready()
    while not stop[0]:
        ctx.heartbeat()
        readable, _, _ = select.select([listener], [], [], BEAT_EVERY)
        if readable:
            _answer_queued(listener, answer)
    _answer_queued(listener, answer)
    listener.close()


def _answer_queued(listener: socket.socket, answer: bytes) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        with conn:
            conn.setblocking(True)
            conn.sendall(answer)


def idle(ctx: ChildContext) -> None:
    """A well-behaved child with nothing to do: ready, beats, exits 0 on SIGTERM."""
    stop = _stop_flag()
    _announce(ctx)
    ctx.ready()
    while not stop[0]:
        ctx.heartbeat()
        time.sleep(BEAT_EVERY)


def exit_at_boot(ctx: ChildContext) -> None:
    _announce(ctx)
    sys.exit(3)


def never_ready(ctx: ChildContext) -> None:
    _announce(ctx)
    while True:
        ctx.heartbeat()
        time.sleep(BEAT_EVERY)


def hang_after_ready(ctx: ChildContext) -> None:
    """Ready, one beat, then wedged: alive but useless, which only the heartbeat reveals."""
    _announce(ctx)
    ctx.ready()
    ctx.heartbeat()
    while True:
        signal.pause()


def stubborn(ctx: ChildContext) -> None:
    """Ignores SIGTERM, so only SIGKILL ends it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _announce(ctx)
    ctx.ready()
    while True:
        ctx.heartbeat()
        time.sleep(BEAT_EVERY)


def fails_if_marker(ctx: ChildContext) -> None:
    """Boots like ``idle`` unless the test has created the marker file; then exits with code 4."""
    if os.path.exists(os.path.join(os.environ["RUNLATER_TEST_DIR"], "fail")):
        _announce(ctx)
        sys.exit(4)
    idle(ctx)


TARGETS = {
    f.__name__: f
    for f in (tcp_server, idle, exit_at_boot, never_ready, hang_after_ready, stubborn,
              fails_if_marker)
}


def main() -> int:
    config = json.loads(sys.argv[1])
    logging.basicConfig(
        level=logging.DEBUG, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    if config.pop("migrate", False):
        enable_reuseport_migration()
    fail_on_ready = config.pop("fail_on_ready", False)
    specs = [ChildSpec(kind, count, TARGETS[name]) for kind, count, name in config.pop("specs")]

    def on_all_ready() -> None:
        if fail_on_ready:
            raise RuntimeError("on_all_ready failed on purpose")
        _say("READY")

    return Supervisor(specs, on_all_ready=on_all_ready, **config).run()


if __name__ == "__main__":
    sys.exit(main())
