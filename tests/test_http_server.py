"""serve() on 127.0.0.1 with real sockets: keep-alive, pipelining, drain, SO_REUSEPORT."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from runlater.http.messages import Response
from runlater.http.protocol import ProtocolConfig
from runlater.http.server import HttpServer, serve

WAIT = 10.0


@pytest.fixture
def loop():
    loop = uvloop.new_event_loop()
    yield loop
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


def run(loop, coro):
    return loop.run_until_complete(asyncio.wait_for(coro, WAIT))


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, server: HttpServer) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", server.port))

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")[:-2]
        status = int(lines[0].split(" ", 2)[1])
        headers = dict(line.split(": ", 1) for line in lines[1:])
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body

    async def at_eof(self) -> bool:
        try:
            return await self.reader.read(1) == b""
        except ConnectionResetError:
            return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


def echo_path(request):
    return Response(200, request.path.encode(), content_type=b"text/plain")


async def start(handler, port: int = 0, **kwargs) -> HttpServer:
    return await serve(handler, ProtocolConfig(), "127.0.0.1", port, **kwargs)


async def stop(server: HttpServer) -> None:
    server.close_listener()
    await server.drain(WAIT)


def test_keep_alive_connection_serves_several_requests(loop):
    clients = []

    def handler(request):
        clients.append(request.client)
        return echo_path(request)

    async def scenario():
        server = await start(handler)
        assert server.sockets_count == 1
        client = await Client.connect(server)
        for n in range(5):
            client.send(b"GET /n%d HTTP/1.1\r\nHost: t\r\n\r\n" % n)
            status, headers, body = await client.response()
            assert (status, body) == (200, b"/n%d" % n)
            assert "connection" not in headers
            assert server.connection_count == 1
        await client.close()
        await stop(server)
        assert server.sockets_count == 0

    run(loop, scenario())
    assert clients == ["127.0.0.1"] * 5


def test_pipelined_requests_over_a_socket_are_answered_in_order(loop):
    pending: list[tuple[str, asyncio.Future]] = []
    all_in = asyncio.Event()

    def handler(request):
        future = loop.create_future()
        pending.append((request.path, future))
        if len(pending) == 10:
            all_in.set()
        return future

    async def scenario():
        server = await start(handler)
        client = await Client.connect(server)
        client.send(b"".join(b"POST /p%d HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}" % n for n in range(10)))
        await all_in.wait()
        for path, future in reversed(pending):  # answers ready in the opposite order
            future.set_result(Response(200, path.encode()))
        bodies = [(await client.response())[2] for _ in range(10)]
        assert bodies == [b"/p%d" % n for n in range(10)]
        await client.close()
        await stop(server)

    run(loop, scenario())


def test_drain_finishes_the_request_in_flight_and_closes_idle_connections(loop):
    in_flight = asyncio.Event()
    answer = loop.create_future()

    def handler(request):
        if request.path == "/slow":
            in_flight.set()
            return answer
        return echo_path(request)

    async def scenario():
        server = await start(handler)
        busy = await Client.connect(server)
        idle = await Client.connect(server)
        idle.send(b"GET /quick HTTP/1.1\r\n\r\n")
        assert (await idle.response())[0] == 200
        busy.send(b"GET /slow HTTP/1.1\r\n\r\n")
        await in_flight.wait()
        assert server.connection_count == 2

        server.close_listener()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", server.port)
        draining = asyncio.ensure_future(server.drain(WAIT))
        assert await idle.at_eof()  # nothing in flight there: closed at once
        assert not draining.done()

        answer.set_result(Response(200, b"done", content_type=b"text/plain"))
        status, headers, body = await busy.response()
        assert (status, body, headers["connection"]) == (200, b"done", "close")
        assert await busy.at_eof()
        await draining
        assert server.connection_count == 0
        await busy.close()
        await idle.close()

    run(loop, scenario())


def test_drain_aborts_what_is_still_open_after_the_timeout(loop):
    in_flight = asyncio.Event()
    never = loop.create_future()

    def handler(request):
        in_flight.set()
        return never

    async def scenario():
        server = await start(handler)
        client = await Client.connect(server)
        client.send(b"GET /stuck HTTP/1.1\r\n\r\n")
        await in_flight.wait()
        server.close_listener()
        await server.drain(0.1)
        assert server.connection_count == 0
        assert await client.at_eof()
        await client.close()

    run(loop, scenario())
    never.cancel()


def test_two_servers_share_a_port_with_reuse_port_and_both_accept(loop):
    def named(name: bytes):
        return lambda request: Response(200, name, content_type=b"text/plain")

    async def scenario():
        first = await start(named(b"first"))
        second = await start(named(b"second"), port=first.port)
        assert second.port == first.port
        seen = set()
        # The kernel hashes each new connection to one of the two listeners; 200 tries that
        # all land on one side would be a 2**-199 event.
        for _ in range(200):
            client = await Client.connect(first)
            client.send(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            seen.add((await client.response())[2])
            await client.close()
            if len(seen) == 2:
                break
        assert seen == {b"first", b"second"}
        await stop(first)
        await stop(second)

    run(loop, scenario())


def test_without_reuse_port_a_second_bind_fails(loop):
    async def scenario():
        first = await start(echo_path, reuse_port=False)
        with pytest.raises(OSError):
            await start(echo_path, port=first.port, reuse_port=False)
        await stop(first)

    run(loop, scenario())


def test_drain_alone_also_stops_accepting(loop):
    async def scenario():
        server = await start(echo_path)
        client = await Client.connect(server)
        client.send(b"GET /x HTTP/1.1\r\n\r\n")
        assert (await client.response())[0] == 200
        await server.drain(WAIT)
        assert server.sockets_count == 0 and server.connection_count == 0
        assert await client.at_eof()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", server.port)
        await client.close()

    run(loop, scenario())


def test_refused_upload_still_reads_its_413() -> None:
    """A client still uploading a body we refuse must get the 413, not a reset.

    The server half-closes and discards the rest of the upload instead of closing a
    socket with unread input (which makes the kernel send RST over the answer).
    """
    import socket as socketlib
    import threading

    import uvloop

    from runlater.http.messages import Response
    from runlater.http.protocol import ProtocolConfig
    from runlater.http.server import serve

    loop = uvloop.new_event_loop()
    ready = threading.Event()
    holder: dict = {}

    async def start() -> None:
        holder["server"] = await serve(lambda req: Response(200, b"{}"), ProtocolConfig(max_body_bytes=1024),
                                       "127.0.0.1", 0)
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    assert ready.wait(10)
    port = holder["server"].port
    try:
        for _ in range(5):
            with socketlib.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 4000000\r\n\r\n")
                answer = b""
                # Upload the whole body before reading, as simple clients do (http.client,
                # curl without Expect): this must not fail with a reset or a broken pipe.
                for _ in range(32):
                    sock.sendall(b"x" * 65536)
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
                assert answer.startswith(b"HTTP/1.1 413 "), answer[:80]
    finally:
        async def stop() -> None:
            await holder["server"].drain(1.0)

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
