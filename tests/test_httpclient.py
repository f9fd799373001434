"""The executors' HTTP client against the mock target and small scripted servers on 127.0.0.1.

The scripted server (``RawServer``) answers with exact bytes so framing, redirects and connection
handling can be pinned down; the mock target counts connections for the pooling tests. Retry-After
parsing is at the end.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import socket
import ssl
import subprocess
import sys
import time
from email.utils import formatdate
from pathlib import Path

import pytest
import uvloop

from runlater import __version__
from runlater.workers.httpclient import (
    ClientError,
    ConnectError,
    HttpClient,
    InvalidRequest,
    ProtocolError,
    RequestTimeout,
    TooManyRedirects,
)
from runlater.workers.retry_after import parse_http_date, parse_retry_after

ROOT = Path(__file__).resolve().parent.parent
# bench/ is not an installed package; the repository root makes it importable.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.mock_target import MockTarget

KIB = 1024


def run(coro):
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def local_client(**kwargs) -> HttpClient:
    kwargs.setdefault("allow_private", True)
    return HttpClient(**kwargs)


class Req:
    def __init__(self, method, target, headers, body, connection):
        self.method = method
        self.target = target
        self.headers = headers  # list of (lower name, value) in arrival order
        self.body = body
        self.connection = connection  # 1-based index of the connection it came on

    def header(self, name):
        for key, value in self.headers:
            if key == name:
                return value
        return None


class RawServer:
    """Answers each request with what ``handler(req, index_on_connection)`` returns: bytes
    (keep the connection), ``(bytes, "close")`` (write, then close) or None (close unanswered)."""

    def __init__(self, handler, ssl_context=None):
        self.handler = handler
        self.ssl_context = ssl_context
        self.connections = 0
        self.requests: list[Req] = []
        self._writers = set()
        self._tasks = set()

    async def start(self):
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self, path="/", host="127.0.0.1", scheme=None):
        scheme = scheme or ("https" if self.ssl_context else "http")
        return f"{scheme}://{host}:{self.port}{path}"

    async def _serve(self, reader, writer):
        self._tasks.add(asyncio.current_task())
        self._writers.add(writer)
        self.connections += 1
        connection = self.connections
        try:
            index = 0
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                    break
                request_line, *lines = head.decode("utf-8").split("\r\n")[:-2]
                method, target, _ = request_line.split(" ")
                headers = []
                for line in lines:
                    name, _, value = line.partition(":")
                    headers.append((name.lower(), value.strip()))
                length = int(dict(headers).get("content-length", "0"))
                body = await reader.readexactly(length) if length else b""
                req = Req(method, target, headers, body, connection)
                self.requests.append(req)
                reply = self.handler(req, index)
                index += 1
                if reply is None:
                    break
                data, close = (reply[0], True) if isinstance(reply, tuple) else (reply, False)
                writer.write(data)
                try:
                    await writer.drain()
                except ConnectionError:
                    break
                if close:
                    break
        finally:
            self._writers.discard(writer)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, ssl.SSLError):
                pass
            self._tasks.discard(asyncio.current_task())

    async def stop(self):
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


def response(status=200, body=b"", headers=(), reason="X"):
    head = f"HTTP/1.1 {status} {reason}\r\ncontent-length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers)
    return head.encode() + b"\r\n" + body


def redirect(status, location):
    return response(status, b"moved", [("location", location)])


# ---------------------------------------------------------------------------------------------
# Requests as sent


def test_headers_and_body_rules():
    async def main():
        target = await MockTarget.start("127.0.0.1")
        client = local_client()
        try:
            results = [
                await client.request(
                    "post",
                    target.url("/p"),
                    [("X-Custom", "1"), ("content-type", "text/plain"), ("Content-Length", "999")],
                    b"hello",
                    5,
                ),
                await client.request("GET", target.url("/g"), [], b"ignored", 5),
                await client.request("POST", target.url("/empty"), [], None, 5),
                await client.request("DELETE", target.url("/d"), [], b"ignored", 5),
                await client.request(
                    "PUT",
                    target.url("/u"),
                    [("User-Agent", "mine"), ("accept-encoding", "br")],
                    b"x",
                    5,
                ),
                await client.request("GET", target.url("/a b/ü?q=1 2"), [], None, 5),
            ]
        finally:
            await client.close()
            await target.stop()
        return results, target.requests

    results, requests = run(main())
    assert [r.status for r in results] == [200] * 6
    post, get, empty, delete, put, quoted = requests
    assert post.method == "POST" and post.body == b"hello"
    names = [name for name, _ in post.headers]
    assert names[:3] == ["host", "x-custom", "content-type"]  # host first, then caller's order
    assert post.header("content-length") == "5"  # the caller's framing header was dropped
    assert post.header("user-agent") == f"runlater/{__version__}"
    assert post.header("accept-encoding") == "identity"
    assert get.body == b"" and get.header("content-length") is None
    assert delete.body == b"" and delete.header("content-length") is None
    assert empty.header("content-length") == "0"
    assert put.header("user-agent") == "mine" and put.header("accept-encoding") == "br"
    assert quoted.path == "/a b/ü" and quoted.query == "q=1%202"
    assert results[0].url.startswith("http://127.0.0.1:") and results[0].url.endswith("/p")
    assert results[0].header("content-type") == "application/json"
    assert all(name == name.lower() for name, _ in results[0].headers)


def test_invalid_requests_are_refused_before_sending():
    async def main():
        client = local_client()
        errors = []
        for args in (
            ("GET", "ftp://example.com/", []),
            ("GET", "http:///nohost", []),
            ("GET", "http://example.com:99999/", []),
            ("GET", "http://example.com/", [("x-bad", "a\r\nInjected: 1")]),
            ("GET", "http://example.com/", [("bad name", "v")]),
            ("GE T", "http://example.com/", []),
        ):
            with pytest.raises(InvalidRequest) as info:
                await client.request(*args, None, 5)
            errors.append(info.value)
        await client.close()
        return errors

    errors = run(main())
    assert errors[0].reason == "unsupported_scheme 'ftp'"
    assert errors[1].reason.startswith("invalid_url 'http:///nohost'")
    assert errors[2].reason.startswith("invalid_url")
    assert errors[3].reason.startswith("invalid_header_value x-bad")
    assert errors[4].reason == "invalid_header_name 'bad name'"
    assert errors[5].reason == "invalid_method 'GE T'"
    assert all(isinstance(e, ValueError) for e in errors)


def test_userinfo_becomes_basic_authorization():
    async def main():
        target = await MockTarget.start("127.0.0.1")
        client = local_client()
        await client.request("GET", f"http://us%40er:p%3Ass@127.0.0.1:{target.port}/", [], None, 5)
        await client.close()
        await target.stop()
        return target.requests[0]

    req = run(main())
    assert req.header("authorization") == "Basic " + base64.b64encode(b"us@er:p:ss").decode()


# ---------------------------------------------------------------------------------------------
# Pooling


def test_sequential_requests_reuse_one_connection():
    async def main():
        target = await MockTarget.start("127.0.0.1")
        client = local_client()
        statuses = [
            (await client.request("GET", target.url(f"/{i}"), [], None, 5)).status
            for i in range(20)
        ]
        await client.close()
        await target.stop()
        return statuses, target.connections

    statuses, connections = run(main())
    assert statuses == [200] * 20
    assert connections == 1


def test_pool_cap_holds_under_200_concurrent_requests():
    async def main():
        target = await MockTarget.start("127.0.0.1", record=False)
        client = local_client(max_per_origin=10)
        url = target.url("/c", delay=20)
        results = await asyncio.gather(
            *(client.request("GET", url, [], None, 10) for _ in range(200))
        )
        await client.close()
        await target.stop()
        return results, target.connections

    results, connections = run(main())
    assert [r.status for r in results] == [200] * 200
    assert connections == 10  # never more than the cap, and every slot was used


def test_waiting_for_a_slot_counts_against_the_deadline():
    async def main():
        target = await MockTarget.start("127.0.0.1")
        client = local_client(max_per_origin=1)
        busy = asyncio.ensure_future(
            client.request("GET", target.url("/busy", delay=400), [], None, 5)
        )
        await target.wait_for(1)
        started = time.monotonic()
        with pytest.raises(RequestTimeout) as info:
            await client.request("GET", target.url("/queued"), [], None, 0.1)
        elapsed = time.monotonic() - started
        first = await busy
        after = await client.request("GET", target.url("/after"), [], None, 5)
        await client.close()
        await target.stop()
        return info.value, elapsed, first.status, after.status, target.connections

    error, elapsed, first, after, connections = run(main())
    assert error.reason == "pool_timeout"
    assert elapsed < 0.35
    assert (first, after, connections) == (200, 200, 1)


def test_cancelled_request_frees_its_slot():
    async def main():
        target = await MockTarget.start("127.0.0.1")
        client = local_client(max_per_origin=1)
        slow = asyncio.ensure_future(
            client.request("GET", target.url("/slow", delay=5000), [], None, 10)
        )
        await target.wait_for(1)
        queued = asyncio.ensure_future(client.request("GET", target.url("/queued"), [], None, 5))
        slow.cancel()
        result = await queued
        await client.close()
        await target.stop()
        return slow.cancelled(), result.status, target.connections

    cancelled, status, connections = run(main())
    assert cancelled and status == 200
    assert connections == 2  # the cancelled exchange's connection was not reused


def test_idle_connection_closed_by_server_is_replaced():
    def handler(req, index):
        return (response(200, b"bye"), "close")  # no "connection: close" header: a silent close

    async def main():
        server = await RawServer(handler).start()
        client = local_client()
        first = await client.request("GET", server.url("/1"), [], None, 5)
        second = await client.request("GET", server.url("/2"), [], None, 5)
        await client.close()
        await server.stop()
        return first.body, second.body, server.connections

    assert run(main()) == (b"bye", b"bye", 2)


def test_stale_reused_connection_is_retried_once_on_a_fresh_one():
    def handler(req, index):
        if req.connection == 1 and index == 1:
            return None  # the server's idle close races our second request
        return response(200, req.target.encode())

    async def main():
        server = await RawServer(handler).start()
        client = local_client()
        first = await client.request("POST", server.url("/1"), [], b"a", 5)
        second = await client.request("POST", server.url("/2"), [], b"b", 5)
        await client.close()
        await server.stop()
        return first.body, second.body, server.connections, [r.target for r in server.requests]

    first, second, connections, seen = run(main())
    assert (first, second) == (b"/1", b"/2")
    assert connections == 2
    assert seen == ["/1", "/2", "/2"]


def test_fresh_connection_closed_without_response_is_not_retried():
    async def main():
        server = await RawServer(lambda req, index: None).start()
        client = local_client()
        with pytest.raises(ConnectError) as info:
            await client.request("GET", server.url("/"), [], None, 5)
        await client.close()
        await server.stop()
        return info.value, server.connections

    error, connections = run(main())
    assert error.reason == "connection_closed"
    assert connections == 1


def test_close_is_idempotent_and_final():
    async def main():
        target = await MockTarget.start("127.0.0.1")
        client = local_client()
        await client.request("GET", target.url("/"), [], None, 5)
        await client.close()
        await client.close()
        with pytest.raises(ClientError) as info:
            await client.request("GET", target.url("/"), [], None, 5)
        await target.stop()
        return info.value.reason

    assert run(main()) == "client_closed"


def test_close_fails_requests_in_flight_and_queued():
    async def main():
        target = await MockTarget.start("127.0.0.1")
        client = local_client(max_per_origin=1)
        in_flight = asyncio.ensure_future(
            client.request("GET", target.url("/", delay=5000), [], None, 10)
        )
        queued = asyncio.ensure_future(client.request("GET", target.url("/q"), [], None, 10))
        await target.wait_for(1)
        started = time.monotonic()
        await client.close()
        outcomes = await asyncio.gather(in_flight, queued, return_exceptions=True)
        elapsed = time.monotonic() - started
        await target.stop()
        return outcomes, elapsed

    outcomes, elapsed = run(main())
    assert [type(o) for o in outcomes] == [ClientError, ClientError]
    assert [o.reason for o in outcomes] == ["client_closed", "client_closed"]
    assert elapsed < 1.0


# ---------------------------------------------------------------------------------------------
# Response framing


def test_response_framings():
    chunked = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    replies = {
        "/length": response(200, b"exactly"),
        "/chunked": chunked,
        "/head": b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n",
        "/nocontent": b"HTTP/1.1 204 No Content\r\n\r\n",
        "/notmodified": b"HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\n\r\n",
        "/early": b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + response(201, b"final"),
        "/close": b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
    }

    def handler(req, index):
        reply = replies[req.target]
        return (reply, "close") if req.target == "/close" else reply

    async def main():
        server = await RawServer(handler).start()
        client = local_client()
        results = {}
        for path in replies:
            method = "HEAD" if path == "/head" else "GET"
            results[path] = await client.request(method, server.url(path), [], None, 5)
        connections_before_close = server.connections
        await client.close()
        await server.stop()
        return results, connections_before_close

    results, connections = run(main())
    assert results["/length"].body == b"exactly"
    assert results["/chunked"].body == b"hello world"
    assert results["/head"].body == b"" and results["/head"].header("content-length") == "1000"
    assert (results["/nocontent"].status, results["/nocontent"].body) == (204, b"")
    assert (results["/notmodified"].status, results["/notmodified"].body) == (304, b"")
    assert (results["/early"].status, results["/early"].body) == (201, b"final")
    assert results["/early"].header("link") is None  # interim headers are not the response's
    assert results["/close"].body == b"until the end"
    assert not any(r.truncated for r in results.values())
    assert connections == 1  # every exchange, HEAD and 1xx included, left the connection reusable


def test_bodies_are_truncated_at_256_kib():
    big = bytes(range(256)) * (300 * KIB // 256)
    huge = b"z" * (3 * 1024 * KIB)

    def chunk(data, size=64 * KIB):
        parts = [
            b"%x\r\n%s\r\n" % (len(data[i : i + size]), data[i : i + size])
            for i in range(0, len(data), size)
        ]
        return (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            + b"".join(parts)
            + b"0\r\n\r\n"
        )

    replies = {
        "/big": response(200, big),  # 44 KiB over: drained, connection kept
        "/huge": response(200, huge),  # 2.75 MiB over: connection closed at once
        "/big-chunked": chunk(big),
        "/huge-chunked": chunk(huge),  # unknown length: drained up to 1 MiB, then closed
        "/after": response(200, b"small"),
    }

    async def main():
        server = await RawServer(lambda req, index: replies[req.target]).start()
        client = local_client()
        results = {}
        connections = {}
        for path in replies:
            results[path] = await client.request("GET", server.url(path), [], None, 10)
            connections[path] = server.connections
        await client.close()
        await server.stop()
        return results, connections

    results, connections = run(main())
    for path in ("/big", "/huge", "/big-chunked", "/huge-chunked"):
        assert results[path].truncated, path
        assert len(results[path].body) == 256 * KIB, path
    assert results["/big"].body == big[: 256 * KIB]
    assert results["/huge-chunked"].body == huge[: 256 * KIB]
    assert results["/after"].body == b"small" and not results["/after"].truncated
    assert connections == {
        "/big": 1,
        "/huge": 1,
        "/big-chunked": 2,
        "/huge-chunked": 2,
        "/after": 3,
    }


def test_deadline_while_draining_returns_the_truncated_response():
    declared = 400 * KIB
    sent = b"y" * (300 * KIB)  # the rest never comes

    async def main():
        server = await RawServer(
            lambda req, index: b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (declared, sent)
        ).start()
        client = local_client()
        started = time.monotonic()
        result = await client.request("GET", server.url("/"), [], None, 0.3)
        elapsed = time.monotonic() - started
        await client.close()
        await server.stop()
        return result, elapsed

    result, elapsed = run(main())
    assert result.status == 200 and result.truncated
    assert result.body == b"y" * (256 * KIB)
    assert 0.29 <= elapsed < 1.0


def test_custom_max_body_and_close_delimited_truncation():
    async def main():
        server = await RawServer(
            lambda req, index: (b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 5000, "close")
        ).start()
        client = local_client(max_body=1000)
        result = await client.request("GET", server.url("/"), [], None, 5)
        await client.close()
        await server.stop()
        return result

    result = run(main())
    assert result.truncated and result.body == b"x" * 1000


def test_malformed_and_incomplete_responses():
    replies = {
        "/garbage": (b"HELLO WORLD\r\n\r\n", "close"),
        "/short": (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b", "close"),
        "/upgrade": b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
    }

    async def main():
        server = await RawServer(lambda req, index: replies[req.target]).start()
        client = local_client()
        errors = {}
        for path in replies:
            with pytest.raises(ProtocolError) as info:
                await client.request("GET", server.url(path), [], None, 5)
            errors[path] = info.value.reason
        await client.close()
        await server.stop()
        return errors

    errors = run(main())
    assert errors["/garbage"].startswith("bad_response")
    assert errors["/short"] == "incomplete_response"
    assert errors["/upgrade"].startswith("unexpected_upgrade")


# ---------------------------------------------------------------------------------------------
# Time and connection failures


def test_deadline_raises_request_timeout_quickly():
    async def main():
        target = await MockTarget.start("127.0.0.1")
        client = local_client()
        started = time.monotonic()
        with pytest.raises(RequestTimeout) as info:
            await client.request("GET", target.url("/", delay=2000), [], None, 0.2)
        elapsed = time.monotonic() - started
        await client.close()
        await target.stop()
        return info.value, elapsed

    error, elapsed = run(main())
    assert isinstance(error, TimeoutError)
    assert error.reason == "timeout"
    assert 0.19 <= elapsed < 1.0


def test_connect_refused():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there

    async def main():
        client = local_client()
        with pytest.raises(ConnectError) as info:
            await client.request("GET", f"http://127.0.0.1:{port}/", [], None, 5)
        await client.close()
        return info.value

    error = run(main())
    assert error.reason == "econnrefused"
    assert error.errno == errno.ECONNREFUSED
    assert isinstance(error, OSError)
    assert error.url == f"http://127.0.0.1:{port}/"


def test_unknown_host_is_nxdomain():
    async def main():
        client = local_client()
        with pytest.raises(ConnectError) as info:
            await client.request("GET", "http://does-not-exist.invalid/", [], None, 5)
        await client.close()
        return info.value.reason

    assert run(main()) == "nxdomain"


def test_connect_timeout():
    async def resolver(host, port):
        await asyncio.sleep(10)  # a resolver that never answers in time
        return ["127.0.0.1"]

    async def main():
        client = local_client(connect_timeout=0.1, resolver=resolver)
        started = time.monotonic()
        with pytest.raises(RequestTimeout) as info:
            await client.request("GET", "http://slow.test/", [], None, 5)
        elapsed = time.monotonic() - started
        await client.close()
        return info.value.reason, elapsed

    reason, elapsed = run(main())
    assert reason == "connect_timeout"
    assert elapsed < 1.0


# ---------------------------------------------------------------------------------------------
# Redirects


def test_redirects():
    def handler(req, index):
        path = req.target
        if path == "/rel":
            return redirect(302, "target?from=rel")
        if path == "/abs-path":
            return redirect(301, "/dir/target")
        if path == "/see-other":
            return redirect(303, "/target")
        if path == "/temporary":
            return redirect(307, "/target")
        if path == "/permanent":
            return redirect(308, "/target")
        if path == "/found":
            return redirect(302, "/target")
        if path == "/no-location":
            return response(302, b"stay")
        if path == "/ftp":
            return redirect(301, "ftp://example.com/file")
        if path.startswith("/loop"):
            return redirect(302, "/loop")
        if path.startswith("/chain/"):
            n = int(path.rsplit("/", 1)[1])
            return redirect(302, f"/chain/{n - 1}") if n else response(200, b"end of chain")
        return response(200, f"{req.method} {path} {req.body.decode()}".encode())

    async def main():
        server = await RawServer(handler).start()
        client = local_client()
        body = b'{"a":1}'
        headers = [("content-type", "application/json"), ("x-keep", "1")]
        results = {}
        for path, method in (
            ("/rel", "GET"),
            ("/abs-path", "GET"),
            ("/see-other", "POST"),
            ("/temporary", "POST"),
            ("/permanent", "PUT"),
            ("/found", "POST"),
            ("/no-location", "GET"),
            ("/ftp", "GET"),
            ("/chain/5", "GET"),
        ):
            server.requests.clear()
            results[path] = (
                await client.request(method, server.url(path), headers, body, 5),
                list(server.requests),
            )
        with pytest.raises(TooManyRedirects) as loop_error:
            await client.request("GET", server.url("/loop"), [], None, 5)
        with pytest.raises(TooManyRedirects):
            await client.request("GET", server.url("/chain/6"), [], None, 5)
        await client.close()
        await server.stop()
        return results, loop_error.value

    results, loop_error = run(main())
    rel, _ = results["/rel"]
    assert rel.body == b"GET /target?from=rel " and rel.url.endswith("/target?from=rel")
    assert results["/abs-path"][0].body == b"GET /dir/target "
    see_other, hops = results["/see-other"]
    assert see_other.body == b"GET /target "
    assert hops[1].header("content-type") is None and hops[1].header("content-length") is None
    assert hops[1].header("x-keep") == "1"
    temporary, hops = results["/temporary"]
    assert temporary.body == b'POST /target {"a":1}'
    assert hops[1].header("content-type") == "application/json"
    assert results["/permanent"][0].body == b'PUT /target {"a":1}'
    assert results["/found"][0].body == b"GET /target "
    assert (results["/no-location"][0].status, results["/no-location"][0].body) == (302, b"stay")
    assert results["/ftp"][0].status == 301
    chain, hops = results["/chain/5"]
    assert chain.body == b"end of chain" and len(hops) == 6
    assert loop_error.reason == "too_many_redirects (more than 5)"


def test_credentials_are_dropped_when_a_redirect_leaves_the_origin():
    async def main():
        other = await RawServer(lambda req, index: response(200, b"other")).start()
        first = await RawServer(
            lambda req, index: redirect(302, other.url("/landing", host="127.0.0.1"))
        ).start()
        client = local_client()
        result = await client.request(
            "GET",
            first.url("/start"),
            [("Authorization", "Bearer secret"), ("Cookie", "a=b"), ("x-runlater-task-id", "t1")],
            None,
            5,
        )
        await client.close()
        await first.stop()
        await other.stop()
        return result, first.requests[0], other.requests[0]

    result, first_hop, second_hop = run(main())
    assert result.body == b"other"
    assert first_hop.header("authorization") == "Bearer secret"
    assert second_hop.header("authorization") is None and second_hop.header("cookie") is None
    assert second_hop.header("x-runlater-task-id") == "t1"


# ---------------------------------------------------------------------------------------------
# TLS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    cert = directory / "cert.pem"
    key = directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=runlater.test",
            "-addext",
            "subjectAltName=DNS:runlater.test",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def tls_server(certificate):
    cert, key = certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = RawServer(lambda req, index: response(200, b"secure"), context)
    server.sni = []
    context.sni_callback = lambda sslobj, name, ctx: server.sni.append(name)
    return server


async def to_loopback(host, port):
    return ["127.0.0.1"]


def test_tls_verification(certificate):
    async def main():
        server = await tls_server(certificate).start()
        trusting = ssl.create_default_context(cafile=str(certificate[0]))
        default_client = local_client(resolver=to_loopback)
        trusting_client = local_client(resolver=to_loopback, ssl_context=trusting)
        url = server.url("/", host="runlater.test")
        with pytest.raises(ConnectError) as untrusted:
            await default_client.request("GET", url, [], None, 5)
        ok = await trusting_client.request("GET", url, [], None, 5)
        with pytest.raises(ConnectError) as mismatch:
            await trusting_client.request("GET", server.url("/", host="other.test"), [], None, 5)
        await default_client.close()
        await trusting_client.close()
        await server.stop()
        return untrusted.value, ok, mismatch.value, server.sni

    untrusted, ok, mismatch, sni = run(main())
    assert untrusted.reason.startswith("tls_verify_failed")
    assert "self-signed" in untrusted.reason or "self signed" in untrusted.reason
    assert (ok.status, ok.body) == (200, b"secure")
    assert mismatch.reason.startswith("tls_verify_failed") and "mismatch" in mismatch.reason.lower()
    assert sni[:3] == ["runlater.test", "runlater.test", "other.test"]


# ---------------------------------------------------------------------------------------------
# Retry-After


NOW = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, None),
        ("", None),
        ("120", 120.0),
        ("1", 1.0),
        (" 30 ", 30.0),
        ("0", None),
        ("-5", None),
        ("1.5", None),
        ("abc", None),
        ("١٢", None),  # non-ASCII digits
        ("Tue, 14 Nov 2023 22:18:20 GMT", 300.0),
        ("Tuesday, 14-Nov-23 22:18:20 GMT", 300.0),
        ("Tue Nov 14 22:18:20 2023", 300.0),
        ("Tue Nov  4 22:18:20 2023", None),  # asctime's space-padded day, in the past
        ("Tue, 14 Nov 2023 22:13:20 GMT", None),  # now is not in the future
        ("Mon, 13 Nov 2023 22:13:20 GMT", None),
        ("Tue, 14 Foo 2023 22:18:20 GMT", None),
        ("Tue, 31 Feb 2024 22:18:20 GMT", None),
        ("Tue, 14 Nov 2023 25:18:20 GMT", None),
        ("Tue, 14 Nov 2023 22:18:20 UTC", None),
    ],
)
def test_parse_retry_after(value, expected):
    assert parse_retry_after(value, NOW) == expected


def test_retry_after_cap_and_every_month():
    assert parse_retry_after("7200", NOW, cap=3600) == 3600
    assert parse_retry_after("60", NOW, cap=3600) == 60
    for month in range(1, 13):
        stamp = NOW + 86400 * 31 * month
        text = formatdate(stamp, usegmt=True)
        assert parse_retry_after(text, NOW) == pytest.approx(86400 * 31 * month), text
    assert parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT") == 784111777.0
    assert parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT", NOW) == 784111777.0
    assert parse_http_date("Sun Nov  6 08:49:37 1994") == 784111777.0
