"""A fast mock delivery target: upstream's load-test endpoint (spec §9.1) plus request recording.

Any method and path. Query parameters, applied in this order:

=================  =====================================================================
``delay=<ms>``     answer after that many milliseconds (a timer; the loop keeps serving)
``jitter=<ms>``    plus a uniform random 0..ms-1 ms; 0 or negative means no jitter
``status=<code>``  response status (default 200; values outside 200..599 are ignored)
``fail_rate=<p>``  with probability p/100 answer 500 instead (wins over ``status``)
``retry_after=v``  add ``Retry-After: v`` (seconds or an HTTP date, sent as given)
=================  =====================================================================

The body is always ``{"status":"ok","method":<METHOD>,"path":<PATH>}`` with
``content-type: application/json`` (JSON-escaped, unlike upstream); HEAD, 204 and 304 carry none.
Non-numeric parameters are ignored, as upstream. Unlike upstream, ``jitter=0`` does not drop the
connection.

In-process use (tests)::

    target = await MockTarget.start("127.0.0.1")      # port 0: any free port
    await client.request("GET", target.url("/x", delay=50), [], None, 5)
    [req] = await target.wait_for(1)                   # event-based, no polling
    await target.stop()

Command line (benchmarks)::

    python -m bench.mock_target --port 9000 --workers 2 [--record]

forks N processes that each bind the port with SO_REUSEPORT and prints
``listening on http://HOST:PORT`` once all of them accept. Recording is off by default there.
The server is a bare uvloop + httptools protocol, a few µs per request, so that it is never the
bottleneck of a benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import ClassVar, Self
from urllib.parse import parse_qsl, unquote, urlencode

import httptools
import orjson
import uvloop

__all__ = ["MockTarget", "RecordedRequest", "main"]

_REASONS = {status.value: status.phrase for status in HTTPStatus}

# Cache of complete responses keyed by what they depend on; bounded so random paths cannot
# grow it without limit (it is simply cleared when full).
_CACHE_LIMIT = 4096


class RecordedRequest:
    """One request as the target saw it. ``headers`` are (lower-case name, value) pairs."""

    __slots__ = ("method", "path", "query", "headers", "body", "monotonic", "wall")

    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        headers: list[tuple[str, str]],
        body: bytes,
        monotonic: float,
        wall: float,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.monotonic = monotonic  # time.monotonic() when the request was complete
        self.wall = wall  # time.time() at the same moment

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def __repr__(self) -> str:
        return f"<RecordedRequest {self.method} {self.path}?{self.query} {len(self.body)} bytes>"


class _State:
    """What every connection of one server shares."""

    def __init__(self, loop: asyncio.AbstractEventLoop, record: bool) -> None:
        self.loop = loop
        self.record = record
        self.requests: list[RecordedRequest] = []
        self.waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.connections = 0  # accepted since start
        self.open: set[_MockProtocol] = set()
        self.all_closed: asyncio.Future[None] | None = None
        self.cache: dict[tuple[int, str, str, str | None, bool, bool], bytes] = {}

    def add(self, request: RecordedRequest) -> None:
        self.requests.append(request)
        if self.waiters:
            count = len(self.requests)
            still = []
            for n, future in self.waiters:
                if count >= n:
                    if not future.done():
                        future.set_result(None)
                else:
                    still.append((n, future))
            self.waiters = still


def _response(
    state: _State,
    status: int,
    method: str,
    path: str,
    retry_after: str | None,
    keep_alive: bool,
) -> bytes:
    head_only = method == "HEAD"
    key = (status, method, path, retry_after, keep_alive, head_only)
    cached = state.cache.get(key)
    if cached is not None:
        return cached
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"]
    body = b""
    if status not in (204, 304):
        body = orjson.dumps({"status": "ok", "method": method, "path": path})
        lines.append(f"content-type: application/json\r\ncontent-length: {len(body)}\r\n")
    if retry_after is not None:
        lines.append(f"retry-after: {retry_after}\r\n")
    if not keep_alive:
        lines.append("connection: close\r\n")
    lines.append("\r\n")
    data = "".join(lines).encode("latin-1", "replace")
    if not head_only:
        data += body
    if len(state.cache) >= _CACHE_LIMIT:
        state.cache.clear()
    state.cache[key] = data
    return data


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


class _MockProtocol(asyncio.Protocol):
    """One client connection. Call order: connection_made, data_received* (parser callbacks
    fire inside it: on_message_begin, on_url, [on_header, on_body,] on_message_complete),
    connection_lost. Responses leave in request order even when delays finish out of order."""

    # The recording subclass fills these per request; here they stay empty and shared.
    _headers: ClassVar[list[tuple[str, str]]] = []
    _body: ClassVar[list[bytes]] = []

    def __init__(self, state: _State) -> None:
        self._state = state
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url: list[bytes] = []
        # Responses not yet written, oldest first, as [data or None while delayed, close-after,
        # delay timer or None].
        self._queue: deque[list] = deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._state.connections += 1
        self._state.open.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            transport = self._transport
            if transport is not None and not transport.is_closing():
                transport.write(
                    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                )
                transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        state = self._state
        state.open.discard(self)
        self._transport = None
        self.cancel_pending()  # nobody left to answer
        if not state.open and state.all_closed is not None and not state.all_closed.done():
            state.all_closed.set_result(None)

    def on_message_begin(self) -> None:
        self._url = []

    def on_url(self, url: bytes) -> None:
        self._url.append(url)

    def on_message_complete(self) -> None:
        state = self._state
        method = self._parser.get_method().decode("ascii")
        raw = self._url[0] if len(self._url) == 1 else b"".join(self._url)
        path, _, query = raw.decode("latin-1").partition("?")
        if "%" in path:
            path = unquote(path)
        status = 200
        delay = 0.0
        retry_after = None
        if query:
            params = dict(parse_qsl(query, keep_blank_values=True))
            delay_ms = _int(params.get("delay"))
            if delay_ms is not None and delay_ms > 0:
                delay = delay_ms / 1000
            jitter_ms = _int(params.get("jitter"))
            if jitter_ms is not None and jitter_ms > 0:
                delay += random.randrange(jitter_ms) / 1000
            code = _int(params.get("status"))
            if code is not None and 200 <= code <= 599:
                status = code
            fail_rate = params.get("fail_rate")
            if fail_rate is not None:
                try:
                    if random.random() * 100 < float(fail_rate):
                        status = 500
                except ValueError:
                    pass
            retry_after = params.get("retry_after")
        keep_alive = self._parser.should_keep_alive()
        if state.record:
            state.add(
                RecordedRequest(
                    method,
                    path,
                    query,
                    self._headers,
                    b"".join(self._body),
                    time.monotonic(),
                    time.time(),
                )
            )
        data = _response(state, status, method, path, retry_after, keep_alive)
        if delay:
            slot: list = [None, not keep_alive, None]
            slot[2] = state.loop.call_later(delay, self._delayed, slot, data)
            self._queue.append(slot)
        elif self._queue:
            self._queue.append([data, not keep_alive, None])
        else:
            self._write(data, not keep_alive)

    def _delayed(self, slot: list, data: bytes) -> None:
        slot[0] = data
        queue = self._queue
        while queue and queue[0][0] is not None:
            ready, close, _ = queue.popleft()
            self._write(ready, close)

    def cancel_pending(self) -> None:
        for slot in self._queue:
            if slot[2] is not None:
                slot[2].cancel()
        self._queue.clear()

    def _write(self, data: bytes, close: bool) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        if close:
            transport.close()


class _RecordingProtocol(_MockProtocol):
    def on_message_begin(self) -> None:
        self._url = []
        self._headers = []
        self._body = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)


class MockTarget:
    """An in-process mock target on the running event loop.

    Lifecycle: ``await MockTarget.start(host, port)`` returns a started target; ``await stop()``
    closes the listener and every connection and cancels delayed answers; it is idempotent.
    ``requests`` lists what arrived (when ``record``), ``connections`` counts accepted ones.
    """

    def __init__(self, host: str, port: int, record: bool) -> None:
        self.host = host
        self.port = port
        self._record = record
        self._server: asyncio.AbstractServer | None = None
        self._state: _State | None = None
        self._stopped = False

    @classmethod
    async def start(
        cls, host: str = "127.0.0.1", port: int = 0, *, record: bool = True
    ) -> MockTarget:
        target = cls(host, port, record)
        loop = asyncio.get_running_loop()
        state = target._state = _State(loop, record)
        protocol = _RecordingProtocol if record else _MockProtocol
        target._server = await loop.create_server(lambda: protocol(state), host, port, backlog=1024)
        target.port = target._server.sockets[0].getsockname()[1]
        return target

    @property
    def started(self) -> bool:
        return self._server is not None and not self._stopped

    @property
    def requests(self) -> list[RecordedRequest]:
        assert self._state is not None, "MockTarget was not started"
        return self._state.requests

    @property
    def connections(self) -> int:
        """Connections accepted since start (keep-alive reuse shows as fewer than requests)."""
        assert self._state is not None, "MockTarget was not started"
        return self._state.connections

    @property
    def open_connections(self) -> int:
        assert self._state is not None, "MockTarget was not started"
        return len(self._state.open)

    def url(self, path: str = "/", **params: object) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = f"?{urlencode(params)}" if params else ""
        return f"http://{host}:{self.port}{path}{query}"

    def clear(self) -> None:
        """Forget recorded requests (waiters count from the new, empty list)."""
        assert self._state is not None, "MockTarget was not started"
        self._state.requests.clear()

    async def wait_for(self, n: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Wait until at least ``n`` requests were recorded; returns the recorded list."""
        state = self._state
        assert state is not None, "MockTarget was not started"
        if not state.record:
            raise RuntimeError("wait_for needs a MockTarget started with record=True")
        if len(state.requests) < n:
            future: asyncio.Future[None] = state.loop.create_future()
            state.waiters.append((n, future))
            try:
                await asyncio.wait_for(future, timeout)
            except TimeoutError:
                raise TimeoutError(
                    f"mock target got {len(state.requests)} requests, waited for {n} "
                    f"during {timeout} s"
                ) from None
        return state.requests

    async def stop(self) -> None:
        if self._stopped or self._server is None or self._state is None:
            self._stopped = True
            return
        self._stopped = True
        state = self._state
        self._server.close()
        for _, future in state.waiters:
            future.cancel()
        state.waiters.clear()
        if state.open:
            state.all_closed = state.loop.create_future()
            for protocol in list(state.open):
                protocol.cancel_pending()
                if protocol._transport is not None:
                    protocol._transport.abort()
            await state.all_closed
        await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def _listen_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _serve(sock: socket.socket, record: bool, on_ready: Callable[[], None]) -> None:
    """Run one server process on an already bound socket until SIGTERM or SIGINT."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        state = _State(loop, record)
        protocol = _RecordingProtocol if record else _MockProtocol
        sock.listen(4096)
        server = await loop.create_server(lambda: protocol(state), sock=sock, backlog=4096)
        stop = loop.create_future()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
        on_ready()
        await stop
        server.close()
        for proto in list(state.open):
            proto.cancel_pending()
            if proto._transport is not None:
                proto._transport.abort()
        await server.wait_closed()

    uvloop.run(run())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.mock_target", description="Mock delivery target for benchmarks."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    parser.add_argument("--record", action="store_true", help="keep requests in memory")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")

    # The parent binds first so that --port 0 yields one port every worker can share; it never
    # listens on this socket, so the kernel routes no connection to it.
    reservation = _listen_socket(args.host, args.port, reuse_port=True)
    port = reservation.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    banner = f"listening on http://{host}:{port}"
    if args.workers == 1:
        _serve(reservation, args.record, lambda: print(banner, flush=True))
        return 0

    children = []
    read_fd, write_fd = os.pipe()
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            reservation.close()
            code = 0
            try:
                _serve(
                    _listen_socket(args.host, port, reuse_port=True),
                    args.record,
                    lambda: (os.write(write_fd, b"1"), os.close(write_fd)),
                )
            except BaseException:  # noqa: BLE001 - report, then leave without running parent code
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        children.append(pid)
    os.close(write_fd)
    ready = 0
    while ready < args.workers:
        chunk = os.read(read_fd, args.workers)
        if not chunk:
            print("a worker failed to start", file=sys.stderr)
            break
        ready += len(chunk)
    os.close(read_fd)
    if ready == args.workers:
        print(banner, flush=True)

    def forward(signum: int, _frame: object) -> None:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    if ready < args.workers:
        forward(signal.SIGTERM, None)
    status = 0
    for pid in children:
        while True:
            try:
                _, code = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        status = status or (1 if os.waitstatus_to_exitcode(code) not in (0, -signal.SIGTERM) else 0)
    reservation.close()
    return status if ready == args.workers else 1


if __name__ == "__main__":
    sys.exit(main())
