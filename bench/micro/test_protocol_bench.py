"""Per-request cost of HttpProtocol: parse, build the Request, call the handler, encode, write.

Run:  .venv/bin/pytest bench/micro/test_protocol_bench.py -p no:cacheprovider --benchmark-enable

No sockets: a transport that only counts bytes stands in, so the numbers are the protocol's own
Python cost per request, the part a worker process pays on top of the kernel's. Each benchmark
records ``requests_per_call`` in extra_info; divide the per-call time by it.

* ``post_json``: one create-sized POST per data_received answered with a prebuilt Response --
  the shape of a keep-alive client sending requests one at a time.
* ``post_json_pipelined_16``: sixteen of them in one data_received (one coalesced write).
* ``post_json_future_batch_64``: 64 connections each send one POST whose handler returns a
  future; the futures are then resolved together and the loop runs their callbacks -- the
  batched create path, minus the database.
* ``get_with_query``: a list request with a query string and a percent-encoded path.

Run as a script it serves the prebuilt answer on one process, a target for wrk:

    .venv/bin/python bench/micro/test_protocol_bench.py 8089 &
    wrk -t1 -c64 -d10s http://127.0.0.1:8089/api/v1/tasks
"""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from runlater.http.messages import Response
from runlater.http.protocol import HttpProtocol, ProtocolConfig

POST = (
    b"POST /api/v1/tasks HTTP/1.1\r\n"
    b"Host: localhost:8080\r\n"
    b"User-Agent: k6/0.50.0 (https://k6.io/)\r\n"
    b"Authorization: Bearer rl_live_0123456789abcdef0123456789abcdef\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: 72\r\n"
    b"\r\n"
    b'{"url":"https://target.example/hook","method":"POST","delay":"5m","q":1}'
)
GET = (
    b"GET /api/v1/tasks/caf%C3%A9?limit=50&queue=emails&status=pending HTTP/1.1\r\n"
    b"Host: localhost:8080\r\n"
    b"Authorization: Bearer rl_live_0123456789abcdef0123456789abcdef\r\n"
    b"Accept: application/json\r\n"
    b"\r\n"
)
CREATED = Response(202, b'{"data":{"id":"0190f1c2-7b7e-7000-8000-0123456789ab","status":"scheduled"}}')


class CountingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        raise AssertionError("the benchmark connection must stay open")

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return ("10.0.0.2", 40000) if name == "peername" else default


@pytest.fixture
def loop():
    loop = uvloop.new_event_loop()
    yield loop
    loop.close()


def connect(loop, handler) -> tuple[HttpProtocol, CountingTransport]:
    transport = CountingTransport()
    protocol = HttpProtocol(handler, ProtocolConfig(), loop, None)
    protocol.connection_made(transport)
    return protocol, transport


def test_post_json(benchmark, loop):
    assert len(POST.partition(b"\r\n\r\n")[2]) == 72
    protocol, transport = connect(loop, lambda request: CREATED)
    benchmark.extra_info["requests_per_call"] = 1
    benchmark(protocol.data_received, POST)
    assert transport.written > 0


def test_post_json_pipelined_16(benchmark, loop):
    protocol, transport = connect(loop, lambda request: CREATED)
    benchmark.extra_info["requests_per_call"] = 16
    benchmark(protocol.data_received, POST * 16)
    assert transport.written > 0


def test_post_json_future_batch_64(benchmark, loop):
    pending: list[asyncio.Future] = []

    def handler(request):
        future = loop.create_future()
        pending.append(future)
        return future

    connections = [connect(loop, handler) for _ in range(64)]

    def batch() -> None:
        for protocol, _ in connections:
            protocol.data_received(POST)
        for future in pending:
            future.set_result(CREATED)
        pending.clear()
        # Done-callbacks run in the order they were scheduled, so when this one runs all the
        # protocols have written their answers.
        last = loop.create_future()
        loop.call_soon(last.set_result, None)
        loop.run_until_complete(last)

    benchmark.extra_info["requests_per_call"] = 64
    benchmark(batch)
    assert all(transport.written > 0 for _, transport in connections)


def test_get_with_query(benchmark, loop):
    protocol, transport = connect(loop, lambda request: Response(200, b'{"data":[],"has_more":false}'))
    benchmark.extra_info["requests_per_call"] = 1
    benchmark(protocol.data_received, GET)
    assert transport.written > 0


async def _serve_forever(port: int) -> None:
    from runlater.http.server import serve

    await serve(lambda request: CREATED, ProtocolConfig(), "127.0.0.1", port)
    await asyncio.Event().wait()


if __name__ == "__main__":
    import sys

    uvloop.run(_serve_forever(int(sys.argv[1]) if len(sys.argv) > 1 else 8089))
