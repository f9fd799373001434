"""A listening socket serving ``HttpProtocol`` connections, and its graceful drain.

Each HTTP worker process calls ``serve()`` itself, after the fork: every worker owns a listening
socket bound with SO_REUSEPORT to the same port, and the kernel spreads new connections across
them. No listener is inherited, so a worker that dies takes only its own accept queue with it.
"""

from __future__ import annotations

import asyncio
import socket

from runlater.http.protocol import Handler, HttpProtocol, ProtocolConfig


class _Connections(set):
    """The live connections of one server; ``empty`` is set whenever there are none.

    Passed to each ``HttpProtocol`` as its ``connections`` set (it calls ``add`` and ``discard``),
    so ``drain()`` can wait for the last one to go without polling.
    """

    def __init__(self) -> None:
        super().__init__()
        self.empty = asyncio.Event()
        self.empty.set()

    def add(self, protocol: HttpProtocol) -> None:
        super().add(protocol)
        self.empty.clear()

    def discard(self, protocol: HttpProtocol) -> None:
        super().discard(protocol)
        if not self:
            self.empty.set()


class HttpServer:
    """What ``serve()`` returns: stop accepting with ``close_listener()``, then ``drain()``."""

    def __init__(self, server: asyncio.AbstractServer, connections: _Connections, address: tuple) -> None:
        self._server = server
        self._connections = connections
        self._address = address

    @property
    def address(self) -> tuple:
        """The bound socket address, e.g. ``("127.0.0.1", 8080)``; the port is real even if 0 was asked."""
        return self._address

    @property
    def port(self) -> int:
        return self._address[1]

    @property
    def sockets_count(self) -> int:
        """Listening sockets still open (0 after ``close_listener``)."""
        return len(self._server.sockets or ())

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def close_listener(self) -> None:
        """Stop accepting; connections already accepted carry on."""
        self._server.close()

    async def drain(self, timeout: float) -> None:
        """Let every connection finish the requests it has received, then close it.

        Idle connections close at once; busy ones answer their last request with
        ``connection: close``. Whatever is still open after ``timeout`` seconds is aborted.
        The listener is closed first if it is still open: a connection accepted during the
        drain would otherwise be left out of it.
        """
        self._server.close()
        connections = self._connections
        for protocol in list(connections):
            protocol.shutdown()
        try:
            await asyncio.wait_for(connections.empty.wait(), timeout)
        except TimeoutError:
            for protocol in list(connections):
                protocol.abort()
            # abort() schedules connection_lost for the next loop iteration; waiting here means
            # drain() returns with every connection really gone.
            await connections.empty.wait()
        await self._server.wait_closed()


def _listening_socket(host: str, port: int, reuse_port: bool, backlog: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        # REUSEADDR: a restarted worker can bind while old connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            # REUSEPORT: each worker process has its own listening socket on the shared port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve(
    handler: Handler,
    config: ProtocolConfig,
    host: str,
    port: int,
    *,
    reuse_port: bool = True,
    backlog: int = 2048,
) -> HttpServer:
    """Bind ``host:port`` and serve ``handler`` on the running loop until the listener is closed."""
    loop = asyncio.get_running_loop()
    sock = _listening_socket(host, port, reuse_port, backlog)
    address = sock.getsockname()
    connections = _Connections()
    try:
        server = await loop.create_server(
            lambda: HttpProtocol(handler, config, loop, connections), sock=sock, backlog=backlog
        )
    except BaseException:
        sock.close()
        raise
    return HttpServer(server, connections, address)
