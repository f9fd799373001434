"""The in-process mock target (bench/mock_target.py) on its own thread, for end-to-end tests.

The executors under test are separate processes, so the target must keep answering while the
test body blocks in ``wait_until`` or in a synchronous HTTP call. It therefore runs its own event
loop on a background thread. The recorded request list belongs to that loop; the test thread
reads it only through ``snapshot()``, which copies it on the loop's own thread.

Tests share one target, so each test builds its URLs under its own path prefix (``route()``)
and filters what it reads by that prefix: a late or stray delivery of another test can never be
counted by mistake.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, str(ROOT))

from bench.mock_target import MockTarget, RecordedRequest

__all__ = ["RecordedRequest", "Route", "ThreadedTarget"]


class ThreadedTarget:
    """A recording ``MockTarget`` served by an event loop on a daemon thread."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._target: MockTarget | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    # -- lifecycle ------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> ThreadedTarget:
        self._thread = threading.Thread(target=self._run, name="mock-target", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError("mock target did not start")
        if self._error is not None:
            raise RuntimeError("mock target failed to start") from self._error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            try:
                self._target = loop.run_until_complete(MockTarget.start(self.host, 0, record=True))
            except BaseException as exc:  # noqa: BLE001 - reported by start()
                self._error = exc
                return
            self.port = self._target.port
            self._started.set()
            loop.run_forever()
            # stop() asked the loop to stop: close the listener and every connection here,
            # on the loop that owns them.
            loop.run_until_complete(self._target.stop())
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            self._started.set()
            loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if thread is None or loop is None:
            return
        if thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            if thread.is_alive():
                raise RuntimeError("mock target thread did not stop")
        self._thread = None

    # -- reading what arrived -------------------------------------------------------

    def _on_loop(self, fn: Callable[[], Any], timeout: float = 5.0) -> Any:
        loop = self._loop
        assert loop is not None and self._target is not None, "mock target not started"
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def call() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                done.set_exception(exc)

        loop.call_soon_threadsafe(call)
        return done.result(timeout)

    def snapshot(self, prefix: str | None = None) -> list[RecordedRequest]:
        """A copy of the recorded requests (optionally only paths under ``prefix``), in arrival order."""
        target = self._target
        assert target is not None
        items = self._on_loop(lambda: list(target.requests))
        if prefix is None:
            return items
        return [r for r in items if r.path.startswith(prefix)]

    def count(self, prefix: str) -> int:
        return len(self.snapshot(prefix))

    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def route(self) -> Route:
        """A fresh path prefix for one test."""
        return Route(self, f"/t/{uuid.uuid4().hex}")


class Route:
    """URLs under one test's private prefix, and the requests that arrived there."""

    def __init__(self, target: ThreadedTarget, prefix: str) -> None:
        self.target = target
        self.prefix = prefix

    def path(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def url(self, name: str = "hook", host: str | None = None, **params: object) -> str:
        query = f"?{urlencode(params)}" if params else ""
        return f"http://{host or self.target.host}:{self.target.port}{self.path(name)}{query}"

    def requests(self, name: str | None = None) -> list[RecordedRequest]:
        if name is None:
            return self.target.snapshot(self.prefix + "/")
        wanted = self.path(name)
        return [r for r in self.target.snapshot(wanted) if r.path == wanted]

    def count(self, name: str | None = None) -> int:
        return len(self.requests(name))
