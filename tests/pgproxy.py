"""A TCP proxy in front of PostgreSQL that a test can cut, stall and restore.

The proxy listens on ``127.0.0.1:<free port>`` and relays bytes to the real server, which
may be reached over TCP or over a Unix socket (the embedded PostgreSQL's DSN looks like
``postgresql://postgres:@/db?host=/tmp/xyz``; its socket is ``/tmp/xyz/.s.PGSQL.5432``).
A server under test is given ``proxy.dsn`` instead of the real DSN, so the test decides
when its database goes away:

* ``cut()``     closes every relayed connection and closes each new one as soon as it is
                accepted, like a database that went down (clients see EOF/resets at once);
* ``stall()``   stops relaying bytes in both directions and leaves new connections
                unanswered, like a database behind a dead network path (clients see nothing);
* ``restore()`` relays normally again (connections cut earlier stay gone; stalled ones resume).

Everything runs on one asyncio loop in a daemon thread; the public methods are called
from the test's thread and return once the loop has done what they ask. ``close()``
closes every socket, stops the loop and joins the thread.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Self
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

__all__ = ["PgProxy", "target_of"]


def target_of(dsn: str) -> tuple[str, str]:
    """Where ``dsn`` points: ``("unix", socket_path)`` or ``("tcp", "host:port")``.

    The host and port may sit in the authority or in the query string (``?host=/dir``),
    as libpq and asyncpg allow. Multi-host DSNs are refused: the tests never use them.
    """
    parts = urlsplit(dsn)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    host = query.get("host") or (unquote(parts.hostname) if parts.hostname else "") or "localhost"
    port = query.get("port") or (str(parts.port) if parts.port else "") or "5432"
    if "," in host or "," in port:
        raise ValueError(f"multi-host DSNs are not supported: {dsn!r}")
    if host.startswith("/"):
        return "unix", os.path.join(host, f".s.PGSQL.{port}")
    return "tcp", f"{host}:{port}"


class _Pipe(asyncio.Protocol):
    """One side of a relayed connection; whatever it reads it writes to its peer."""

    def __init__(self, proxy: PgProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self.held: list[bytes] = []  # read while the peer was not there yet (stalled client)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.proxy._pipes.add(self)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.held.append(data)
        else:
            peer.transport.write(data)

    def eof_received(self) -> bool:
        self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy._pipes.discard(self)
        self.transport = None
        if self.peer is not None:
            self.peer.close()

    # Flow control: a slow reader on one side slows the writer on the other.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.proxy._mode == "open" and self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def flush_held(self) -> None:
        if self.held and self.peer is not None and self.peer.transport is not None:
            for chunk in self.held:
                self.peer.transport.write(chunk)
            self.held.clear()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class _ClientPipe(_Pipe):
    """The side facing the proxy's client: the proxy decides what to do with it on accept."""

    dialing = False  # an upstream connection is being opened for it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.proxy._on_client(self)


class PgProxy:
    def __init__(self, upstream_dsn: str) -> None:
        self.upstream_dsn = upstream_dsn
        self.kind, self.address = target_of(upstream_dsn)
        self._mode = "open"  # "open" | "cut" | "stall"
        self._pipes: set[_Pipe] = set()
        self._clients: set[_ClientPipe] = set()
        self._connecting: set[asyncio.Task[None]] = set()
        self.accepted = 0  # client connections accepted for relaying
        self.refused = 0  # client connections closed at once because the proxy was cut
        self._server: asyncio.AbstractServer | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="pgproxy", daemon=True)
        self._thread.start()
        try:
            self._call(self._listen())
        except BaseException:
            self.close()
            raise

    # -- public controls (test thread) ------------------------------------------------

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    @property
    def dsn(self) -> str:
        """The upstream DSN with its host and port replaced by the proxy's."""
        parts = urlsplit(self.upstream_dsn)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = (userinfo + "@" if userinfo else "") + f"127.0.0.1:{self.port}"
        query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in ("host", "port")]
        return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), parts.fragment))

    @property
    def connections(self) -> int:
        """Client connections currently open through the proxy (relayed or stalled)."""
        return self._call(self._count())

    @property
    def mode(self) -> str:
        return self._mode

    def cut(self) -> None:
        self._call(self._set_mode("cut"))

    def stall(self) -> None:
        self._call(self._set_mode("stall"))

    def restore(self) -> None:
        self._call(self._set_mode("open"))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            if self._thread.is_alive():
                self._call(self._shutdown())
        finally:
            if self._thread.is_alive():
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(10)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- loop thread -------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
            self._loop.run_until_complete(self._loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)

    def _call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _listen(self) -> None:
        self._server = await self._loop.create_server(lambda: _ClientPipe(self), "127.0.0.1", 0)

    async def _count(self) -> int:
        return sum(1 for c in self._clients if c.transport is not None)

    def _on_client(self, client: _ClientPipe) -> None:
        assert client.transport is not None
        if self._mode == "cut":
            self.refused += 1
            client.abort()
            return
        self.accepted += 1
        self._clients.add(client)
        if self._mode == "open":
            self._start_upstream(client)
        # "stall": accepted by the kernel but never relayed; the client waits for a server
        # greeting that does not come until restore() connects it upstream.

    def _start_upstream(self, client: _ClientPipe) -> None:
        assert client.transport is not None
        client.transport.pause_reading()
        client.dialing = True
        task = self._loop.create_task(self._connect_upstream(client))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _connect_upstream(self, client: _ClientPipe) -> None:
        upstream = _Pipe(self)
        try:
            await self._dial(upstream)
        except (OSError, asyncio.CancelledError):
            client.abort()
            return
        finally:
            client.dialing = False
        if client.transport is None or self._mode == "cut":
            upstream.abort()
            client.abort()
            return
        upstream.peer, client.peer = client, upstream
        client.flush_held()
        upstream.flush_held()
        if self._mode == "open":
            client.transport.resume_reading()
        else:
            upstream.transport.pause_reading()  # type: ignore[union-attr]

    async def _dial(self, upstream: _Pipe) -> None:
        if self.kind == "unix":
            await self._loop.create_unix_connection(lambda: upstream, self.address)
        else:
            host, _, port = self.address.rpartition(":")
            await self._loop.create_connection(lambda: upstream, host.strip("[]"), int(port))

    async def _set_mode(self, mode: str) -> None:
        previous, self._mode = self._mode, mode
        if mode == "cut":
            for task in list(self._connecting):
                task.cancel()
            for pipe in list(self._pipes):
                pipe.abort()
            await self._settle()
        elif mode == "stall":
            for pipe in list(self._pipes):
                if pipe.transport is not None:
                    pipe.transport.pause_reading()
        elif previous == "stall":
            for pipe in list(self._pipes):
                if pipe.transport is None:
                    continue
                if pipe.peer is not None:
                    pipe.transport.resume_reading()
                elif isinstance(pipe, _ClientPipe) and not pipe.dialing:
                    self._start_upstream(pipe)  # accepted while stalled

    async def _settle(self) -> None:
        """Wait (briefly) until aborted transports have run ``connection_lost``."""
        for _ in range(200):
            self._clients = {c for c in self._clients if c.transport is not None}
            if not self._pipes and not self._connecting:
                return
            await asyncio.sleep(0.005)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._set_mode("cut")
        if self._server is not None:
            await self._server.wait_closed()
