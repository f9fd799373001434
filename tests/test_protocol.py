"""HttpProtocol driven through data_received with a fake transport on a real uvloop loop.

The corpus in tests/http_requests/ is fed in every chunking (whole, byte by byte, seeded random
splits) alone and pipelined; the tests below it cover ordering, failures, limits, timeouts,
backpressure and shutdown. Nothing sleeps: waits are on the transport's events, bounded by a
generous timeout.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
import uvloop

from runlater.http.messages import Response
from runlater.http.protocol import (
    HttpProtocol,
    ProtocolConfig,
    _HttpDate,
    encode_response,
)

CORPUS = Path(__file__).parent / "http_requests"
WAIT = 5.0  # upper bound on any wait; the happy path never gets near it
OK_BODY = b'{"ok":true}'
DATE = b"date: Thu, 01 Jan 2026 00:00:00 GMT\r\n"


# --- harness ---------------------------------------------------------------------------------


class FakeTransport(asyncio.Transport):
    """Records what the protocol does to it; close() reports connection_lost on the next turn."""

    def __init__(self, loop: asyncio.AbstractEventLoop, peer: tuple = ("203.0.113.7", 51000)) -> None:
        super().__init__()
        self.loop = loop
        self.peer = peer
        self.protocol: HttpProtocol | None = None
        self.writes: list[bytes] = []
        self.reading = True
        self.read_pauses = 0
        self.high_water: int | None = None
        self.aborted = False
        self.closed = asyncio.Event()  # close() was called
        self.lost = asyncio.Event()  # and connection_lost has been delivered
        self.written = asyncio.Event()

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)

    def write(self, data: bytes) -> None:
        assert not self.closed.is_set(), "write after close"
        self.writes.append(bytes(data))
        self.written.set()

    def close(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            self.loop.call_soon(self._lose)

    def _lose(self) -> None:
        self.protocol.connection_lost(None)
        self.lost.set()

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def is_closing(self) -> bool:
        return self.closed.is_set()

    def pause_reading(self) -> None:
        assert self.reading, "paused twice"
        self.reading = False
        self.read_pauses += 1

    def resume_reading(self) -> None:
        assert not self.reading, "resumed while reading"
        self.reading = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high_water = high

    def get_extra_info(self, name: str, default=None):
        return self.peer if name == "peername" else default


class Conn:
    def __init__(self, loop, handler, config: ProtocolConfig | None = None, connections: set | None = None):
        self.loop = loop
        self.transport = FakeTransport(loop)
        self.protocol = HttpProtocol(handler, config or ProtocolConfig(), loop, connections)
        self.transport.protocol = self.protocol
        self.protocol.connection_made(self.transport)

    def feed(self, pieces) -> int:
        """Deliver pieces until the transport closes, as a real one would; returns bytes delivered."""
        delivered = 0
        for piece in pieces:
            if self.transport.is_closing():
                break
            self.protocol.data_received(piece)
            delivered += len(piece)
        return delivered

    def answers(self, head: bool = False) -> list[Answer]:
        return parse_responses(self.transport.data, head)

    def wait_closed(self) -> None:
        self.loop.run_until_complete(asyncio.wait_for(self.transport.closed.wait(), WAIT))

    def wait_answers(self, count: int, head: bool = False) -> list[Answer]:
        async def until() -> list[Answer]:
            while len(answers := self.answers(head)) < count:
                self.transport.written.clear()
                await self.transport.written.wait()
            return answers

        return self.loop.run_until_complete(asyncio.wait_for(until(), WAIT))


@dataclass
class Answer:
    status: int
    reason: str
    header_list: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes


def parse_responses(data: bytes, head: bool = False) -> list[Answer]:
    """Split written bytes into responses; independent of the encoder under test."""
    answers = []
    while data:
        end = data.index(b"\r\n\r\n")
        lines = data[:end].decode("latin-1").split("\r\n")
        data = data[end + 4:]
        version, status, reason = lines[0].split(" ", 2)
        assert version == "HTTP/1.1"
        header_list = [tuple(line.split(": ", 1)) for line in lines[1:]]
        headers = dict(header_list)
        assert len(headers) == len(header_list), f"repeated response header in {header_list}"
        code = int(status)
        if code < 200 or code in (204, 304) or head:
            body = b""
        else:
            length = int(headers["content-length"])
            body, data = data[:length], data[length:]
            assert len(body) == length, "truncated body"
        answers.append(Answer(code, reason, header_list, headers, body))
    return answers


def settle(loop, future: asyncio.Future) -> None:
    """Run the loop until ``future``'s done-callbacks registered so far have run."""
    loop.run_until_complete(asyncio.wait_for(asyncio.shield(future), WAIT))


def ok_handler(request):
    return Response(200, OK_BODY)


@pytest.fixture
def loop():
    loop = uvloop.new_event_loop()
    yield loop
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


# --- the corpus ------------------------------------------------------------------------------


def read_http(path: Path) -> bytes:
    text = "".join(path.read_text(encoding="ascii").splitlines())
    return text.encode("latin-1").decode("unicode_escape").encode("latin-1")


def corpus(kind: str) -> list:
    cases = []
    for path in sorted((CORPUS / kind).glob("*.http")):
        expected = json.loads(path.with_suffix(".json").read_text())
        cases.append(pytest.param(read_http(path), expected, id=path.stem))
    return cases


CHUNKINGS = ["whole", "bytes", "random1", "random2", "random3"]


def split(data: bytes, how: str) -> list[bytes]:
    if how == "whole":
        return [data]
    if how == "bytes":
        return [data[i:i + 1] for i in range(len(data))]
    rng = random.Random(f"{how}:{len(data)}")
    pieces, at = [], 0
    while at < len(data):
        step = rng.randint(1, max(1, len(data) // 3))
        pieces.append(data[at:at + step])
        at += step
    return pieces


def check_request(request, expected: dict) -> None:
    assert request.method == expected["method"]
    assert request.path == expected["path"]
    assert request.query == expected["query"]
    for name, value in expected.get("headers", {}).items():
        assert request.headers.get(name) == value, name
    for name in expected.get("absent_headers", []):
        assert name not in request.headers
    if "body_hex" in expected:
        assert request.body == bytes.fromhex(expected["body_hex"])
    else:
        assert request.body == expected["body"].encode()
    assert request.client == "203.0.113.7"
    assert all(name == name.lower() for name in request.headers)


def test_corpus_is_not_empty():
    assert len(corpus("valid")) >= 20 and len(corpus("invalid")) >= 25


@pytest.mark.parametrize("copies", [1, 3], ids=["alone", "pipelined"])
@pytest.mark.parametrize("how", CHUNKINGS)
@pytest.mark.parametrize(("raw", "expected"), corpus("valid"))
def test_valid_request(loop, raw, expected, how, copies):
    seen = []

    def handler(request):
        seen.append(request)
        return Response(200, OK_BODY)

    conn = Conn(loop, handler)
    conn.feed(split(raw * copies, how))

    keep_alive = expected.get("keep_alive", True)
    count = copies if keep_alive else 1
    assert len(seen) == count
    for request in seen:
        check_request(request, expected)

    head = expected["method"] == "HEAD"
    answers = conn.answers(head)
    final = [200]
    if expected.get("continue"):
        final = [100, 200]
    assert [a.status for a in answers] == final * count
    for answer in answers:
        if answer.status == 100:
            assert answer.header_list == []
            continue
        assert answer.headers["content-length"] == str(len(OK_BODY))
        assert answer.headers["content-type"] == "application/json; charset=utf-8"
        assert answer.body == (b"" if head else OK_BODY)
        assert answer.headers.get("connection") == expected.get("connection_header")
    assert conn.transport.is_closing() is not keep_alive


@pytest.mark.parametrize("after_valid", [False, True], ids=["alone", "after-valid"])
@pytest.mark.parametrize("how", CHUNKINGS)
@pytest.mark.parametrize(("raw", "expected"), corpus("invalid"))
def test_invalid_request(loop, raw, expected, how, after_valid):
    seen = []

    def handler(request):
        seen.append(request.path)
        return Response(200, OK_BODY)

    conn = Conn(loop, handler, ProtocolConfig(**expected.get("config", {})))
    prefix = b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n" if after_valid else b""
    suffix = b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n"  # must never be read
    conn.feed(split(prefix + raw + suffix, how))

    status = expected["status"]
    assert seen == (["/first"] if after_valid else [])
    answers = conn.answers()
    assert [a.status for a in answers] == ([200] if after_valid else []) + [status]
    error = answers[-1]
    assert error.headers["connection"] == "close"
    assert error.headers["content-type"] == "application/json; charset=utf-8"
    assert orjson.loads(error.body) == {"errors": {"detail": error.reason}}
    assert conn.transport.is_closing()
    assert not conn.transport.reading


# --- response bytes ------------------------------------------------------------------------


def test_response_head_has_status_type_length_date_and_extra_headers(loop):
    conn = Conn(loop, lambda r: Response(201, b'{"id":1}', [(b"location", b"/api/v1/tasks/1"), (b"x-a", b"b")]))
    conn.feed([b"POST /api/v1/tasks HTTP/1.1\r\nContent-Length: 0\r\n\r\n"])
    head, _, body = conn.transport.data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 201 Created"
    assert lines[1:3] == [b"content-type: application/json; charset=utf-8", b"content-length: 8"]
    assert lines[3].startswith(b"date: ")
    assert lines[4:] == [b"location: /api/v1/tasks/1", b"x-a: b"]
    assert body == b'{"id":1}'


def test_date_header_is_current_http_date(loop):
    conn = Conn(loop, ok_handler)
    conn.feed([b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n"])
    first, second = conn.answers()
    sent = email.utils.parsedate_to_datetime(first.headers["date"])
    assert abs(sent.timestamp() - time.time()) < 5
    assert first.headers["date"].endswith(" GMT")
    # Cached per second: two answers in one call can only differ across a second boundary.
    assert abs(email.utils.parsedate_to_datetime(second.headers["date"]).timestamp() - sent.timestamp()) <= 1


def test_date_line_is_reformatted_when_its_second_is_over():
    date = _HttpDate()
    before = time.time()
    line = date.refresh(100.0)
    assert line.startswith(b"date: ") and line.endswith(b" GMT\r\n")
    sent = email.utils.parsedate_to_datetime(line[6:-2].decode()).timestamp()
    assert int(before) <= sent <= time.time()
    # Valid until the next wall-clock second, measured on the loop clock passed in.
    assert 100.0 < date.expires <= 101.0
    assert date.line is line


@pytest.mark.parametrize("status", [204, 304])
def test_no_content_statuses_carry_no_length_type_or_body(status):
    wire = encode_response(Response(status, b""), 1, False, DATE)
    assert wire.startswith(b"HTTP/1.1 %d " % status)
    assert b"content-length" not in wire and b"content-type" not in wire
    assert wire.endswith(b"\r\n\r\n")


def test_empty_body_has_length_zero_and_no_content_type():
    wire = encode_response(Response(200, b""), 1, False, DATE)
    assert b"content-length: 0\r\n" in wire and b"content-type" not in wire


def test_unknown_status_code_keeps_an_empty_reason():
    assert encode_response(Response(599, b"x", content_type=b"text/plain"), 0, False, DATE).startswith(
        b"HTTP/1.1 599 \r\ncontent-type: text/plain\r\ncontent-length: 1\r\n"
    )


def test_head_answer_has_the_get_headers_without_body(loop):
    conn = Conn(loop, lambda r: Response(200, b'{"status":"ok"}'))
    conn.feed([b"GET /health HTTP/1.1\r\n\r\n"])
    conn.feed([b"HEAD /health HTTP/1.1\r\n\r\n"])
    get_bytes = conn.transport.writes[0]
    head_bytes = conn.transport.writes[1]
    assert head_bytes == get_bytes[: -len(b'{"status":"ok"}')] or (
        # the date may have ticked between the two
        head_bytes.split(b"date:")[0] == get_bytes.split(b"date:")[0]
    )
    assert head_bytes.endswith(b"\r\n\r\n")
    assert b"content-length: 15\r\n" in head_bytes


# --- answers and their order ----------------------------------------------------------------


def test_pipelined_answers_keep_request_order_when_the_first_is_slow(loop):
    slow = loop.create_future()

    def handler(request):
        return slow if request.path == "/slow" else Response(200, b'"fast"')

    conn = Conn(loop, handler)
    conn.feed([b"GET /slow HTTP/1.1\r\n\r\nGET /fast HTTP/1.1\r\n\r\n"])
    assert conn.transport.writes == []  # the fast answer waits behind the slow one
    slow.set_result(Response(201, b'"slow"'))
    answers = conn.wait_answers(2)
    assert [(a.status, a.body) for a in answers] == [(201, b'"slow"'), (200, b'"fast"')]
    assert len(conn.transport.writes) == 1  # both went out in one write once the head was ready


def test_pipelined_mix_of_future_coroutine_and_response_answers_in_order(loop):
    futures = {"/a": loop.create_future(), "/c": loop.create_future()}
    gate = loop.create_future()

    async def coroutine_answer():
        await gate
        return Response(200, b'"b"')

    def handler(request):
        if request.path == "/b":
            return coroutine_answer()
        if request.path == "/d":
            return Response(200, b'"d"')
        return futures[request.path]

    conn = Conn(loop, handler)
    conn.feed([b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\nGET /c HTTP/1.1\r\n\r\nGET /d HTTP/1.1\r\n\r\n"])
    futures["/c"].set_result(Response(200, b'"c"'))
    gate.set_result(None)
    futures["/a"].set_result(Response(200, b'"a"'))
    answers = conn.wait_answers(4)
    assert [a.body for a in answers] == [b'"a"', b'"b"', b'"c"', b'"d"']


def test_pipelined_synchronous_answers_share_one_write(loop):
    conn = Conn(loop, ok_handler)
    conn.feed([b"GET /1 HTTP/1.1\r\n\r\n" * 3])
    assert len(conn.transport.writes) == 1
    assert [a.status for a in conn.answers()] == [200, 200, 200]


def test_already_resolved_future_is_answered_at_once(loop):
    def handler(request):
        future = loop.create_future()
        future.set_result(Response(202, b'{"queued":true}'))
        return future

    conn = Conn(loop, handler)
    conn.feed([b"POST /api/v1/tasks HTTP/1.1\r\nContent-Length: 0\r\n\r\n"])
    assert [a.status for a in conn.answers()] == [202]


def test_handler_exception_is_500_logged_and_keeps_the_connection(loop, caplog):
    def handler(request):
        if request.path == "/boom":
            raise RuntimeError("kaboom")
        return Response(200, OK_BODY)

    conn = Conn(loop, handler)
    with caplog.at_level(logging.ERROR, logger="runlater.http"):
        conn.feed([b"GET /boom HTTP/1.1\r\n\r\nGET /fine HTTP/1.1\r\n\r\n"])
    first, second = conn.answers()
    assert first.status == 500
    assert first.body == b'{"errors":{"detail":"Internal Server Error"}}'
    assert "connection" not in first.headers
    assert second.status == 200
    assert not conn.transport.is_closing()
    record = next(r for r in caplog.records if r.name == "runlater.http")
    assert "GET /boom" in record.getMessage() and record.exc_info[1].args == ("kaboom",)


def test_failed_future_is_500(loop, caplog):
    future = loop.create_future()
    conn = Conn(loop, lambda r: future)
    conn.feed([b"GET /x HTTP/1.1\r\n\r\n"])
    with caplog.at_level(logging.ERROR, logger="runlater.http"):
        future.set_exception(ValueError("db down"))
        (answer,) = conn.wait_answers(1)
    assert answer.status == 500 and answer.body == b'{"errors":{"detail":"Internal Server Error"}}'
    assert any(r.exc_info and isinstance(r.exc_info[1], ValueError) for r in caplog.records)


def test_failing_coroutine_is_500(loop, caplog):
    async def handler(request):
        raise KeyError("missing")

    conn = Conn(loop, handler)
    with caplog.at_level(logging.ERROR, logger="runlater.http"):
        conn.feed([b"GET /x HTTP/1.1\r\n\r\n"])
        (answer,) = conn.wait_answers(1)
    assert answer.status == 500
    assert any(r.exc_info and isinstance(r.exc_info[1], KeyError) for r in caplog.records)


def test_cancelled_future_is_503_with_retry_after(loop):
    future = loop.create_future()
    conn = Conn(loop, lambda r: future)
    conn.feed([b"POST /api/v1/tasks HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"])
    future.cancel()
    (answer,) = conn.wait_answers(1)
    assert answer.status == 503
    assert answer.headers["retry-after"] == "1"
    assert answer.body == b'{"errors":{"detail":"Service Unavailable"}}'


def test_handler_returning_something_else_is_500(loop, caplog):
    conn = Conn(loop, lambda r: {"not": "a response"})
    with caplog.at_level(logging.ERROR, logger="runlater.http"):
        conn.feed([b"GET /x HTTP/1.1\r\n\r\n"])
    assert [a.status for a in conn.answers()] == [500]
    assert any("not a Response" in r.getMessage() for r in caplog.records)


def test_malformed_response_from_a_future_is_500_and_does_not_stall_the_pipeline(loop, caplog):
    future = loop.create_future()
    conn = Conn(loop, lambda r: future if r.path == "/bad" else Response(200, OK_BODY))
    conn.feed([b"GET /bad HTTP/1.1\r\n\r\nGET /next HTTP/1.1\r\n\r\n"])
    with caplog.at_level(logging.ERROR, logger="runlater.http"):
        future.set_result(Response(200, "not bytes"))
        answers = conn.wait_answers(2)
    assert [a.status for a in answers] == [500, 200]
    assert any("cannot encode" in r.getMessage() for r in caplog.records)


# --- limits, continue, upgrade ----------------------------------------------------------------


def test_declared_body_over_limit_is_413_before_any_body_is_read(loop):
    seen = []
    conn = Conn(loop, lambda r: seen.append(r), ProtocolConfig(max_body_bytes=100))
    conn.feed([b"POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n"])
    assert [a.status for a in conn.answers()] == [413]
    assert conn.transport.is_closing() and seen == []


def test_body_exactly_at_limit_is_accepted(loop):
    seen = []

    def handler(request):
        seen.append(request.body)
        return Response(200, OK_BODY)

    conn = Conn(loop, handler, ProtocolConfig(max_body_bytes=10))
    conn.feed([b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n01234\r\n5\r\n56789\r\n0\r\n\r\n"])
    assert seen == [b"0123456789"]


def test_chunked_body_growing_over_limit_is_413_mid_body(loop):
    conn = Conn(loop, ok_handler, ProtocolConfig(max_body_bytes=10))
    fed = conn.feed(split(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"4\r\nabcd\r\n" * 100, "bytes"))
    assert [a.status for a in conn.answers()] == [413]
    assert fed < 120  # answered as soon as the 11th body byte arrived, not at the end


def test_header_trickled_byte_by_byte_is_431_before_it_ends(loop):
    conn = Conn(loop, ok_handler, ProtocolConfig(max_header_bytes=128))
    fed = conn.feed(split(b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 5000 + b"\r\n\r\n", "bytes"))
    assert [a.status for a in conn.answers()] == [431]
    assert fed <= 128 + 2  # the limit plus the chunk the request began in, plus the byte over


def test_many_small_requests_in_one_large_read_are_not_mistaken_for_large_headers(loop):
    # The read is far over the header limit, but each request's own header block is small.
    conn = Conn(loop, ok_handler, ProtocolConfig(max_header_bytes=64))
    conn.feed([b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n" * 30])
    assert [a.status for a in conn.answers()] == [200] * 30


def test_large_header_block_behind_small_requests_in_one_read_is_431(loop):
    conn = Conn(loop, ok_handler, ProtocolConfig(max_header_bytes=64))
    conn.feed([b"GET /a HTTP/1.1\r\n\r\n" * 3 + b"GET /b HTTP/1.1\r\nX-Big: " + b"b" * 64 + b"\r\n\r\n"])
    assert [a.status for a in conn.answers()] == [200, 200, 200, 431]


def test_header_block_exactly_at_the_limit_is_accepted(loop):
    # url 2 + "X: " + value + CRLF (4 counted per header) = the limit
    value = b"v" * (64 - 2 - 1 - 4)
    conn = Conn(loop, ok_handler, ProtocolConfig(max_header_bytes=64))
    conn.feed([b"GET /a HTTP/1.1\r\nX: " + value + b"\r\n\r\n" + b"GET /a HTTP/1.1\r\nX: " + value + b"v\r\n\r\n"])
    assert [a.status for a in conn.answers()] == [200, 431]


def test_trailer_trickled_byte_by_byte_is_bounded(loop):
    config = ProtocolConfig(max_header_bytes=128, max_body_bytes=16)
    conn = Conn(loop, ok_handler, config)
    raw = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: " + b"t" * 20000 + b"\r\n\r\n"
    fed = conn.feed(split(raw, "bytes"))
    assert [a.status for a in conn.answers()] == [413]
    assert fed < 128 + 2 * 16 + 4096 + 100


def test_expect_continue_within_limit_gets_100_before_the_body(loop):
    conn = Conn(loop, ok_handler)
    conn.feed([b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"])
    assert conn.transport.data == b"HTTP/1.1 100 Continue\r\n\r\n"
    conn.feed([b"body"])
    assert [a.status for a in conn.answers()] == [100, 200]


def test_expect_continue_over_limit_gets_413_and_no_100(loop):
    conn = Conn(loop, ok_handler, ProtocolConfig(max_body_bytes=3))
    conn.feed([b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"])
    assert [a.status for a in conn.answers()] == [413]
    assert b"100 Continue" not in conn.transport.data


def test_expect_continue_waits_behind_an_unanswered_request(loop):
    slow = loop.create_future()
    conn = Conn(loop, lambda r: slow if r.path == "/slow" else Response(200, OK_BODY))
    conn.feed([b"GET /slow HTTP/1.1\r\n\r\nPOST /up HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"])
    assert conn.transport.writes == []
    slow.set_result(Response(200, b'"slow"'))
    assert [a.status for a in conn.wait_answers(2)] == [200, 100]
    conn.feed([b"body"])
    assert [a.status for a in conn.answers()] == [200, 100, 200]


def test_expect_continue_is_not_sent_to_http10(loop):
    conn = Conn(loop, ok_handler)
    conn.feed([b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"])
    assert conn.transport.writes == []
    conn.feed([b"{}"])
    assert [a.status for a in conn.answers()] == [200]


def test_websocket_upgrade_is_answered_as_plain_http_and_frames_are_refused(loop):
    conn = Conn(loop, ok_handler)
    conn.feed([
        (
            b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n\x81\x85abcd"
        )
    ])
    assert [a.status for a in conn.answers()] == [200, 400]
    assert conn.transport.is_closing()


def test_h2c_upgrade_then_more_requests_in_the_same_chunk(loop):
    paths = []

    def handler(request):
        paths.append(request.path)
        return Response(200, OK_BODY)

    conn = Conn(loop, handler)
    conn.feed([
        (
            b"GET /a HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQ\r\n\r\n"
            b"GET /b HTTP/1.1\r\n\r\nGET /c HTTP/1.1\r\n\r\n"
        )
    ])
    assert paths == ["/a", "/b", "/c"]
    assert not conn.transport.is_closing()


# --- timeouts ---------------------------------------------------------------------------------


def test_slow_headers_get_408_and_close(loop):
    conn = Conn(loop, ok_handler, ProtocolConfig(header_timeout=0.05, keepalive_timeout=60))
    conn.feed([b"GET / HTTP/1.1\r\nHost: exa"])
    conn.wait_closed()
    (answer,) = conn.answers()
    assert answer.status == 408 and answer.headers["connection"] == "close"
    assert answer.body == b'{"errors":{"detail":"Request Timeout"}}'


def test_slow_body_gets_408_and_close(loop):
    conn = Conn(loop, ok_handler, ProtocolConfig(body_timeout=0.05, keepalive_timeout=60))
    conn.feed([b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n012"])
    conn.wait_closed()
    assert [a.status for a in conn.answers()] == [408]


def test_idle_keep_alive_connection_is_closed_silently(loop):
    conn = Conn(loop, ok_handler, ProtocolConfig(keepalive_timeout=0.05))
    conn.feed([b"GET / HTTP/1.1\r\n\r\n"])
    conn.wait_closed()
    assert [a.status for a in conn.answers()] == [200]


def test_connection_that_never_speaks_is_closed_silently(loop):
    conn = Conn(loop, ok_handler, ProtocolConfig(keepalive_timeout=0.05))
    conn.wait_closed()
    assert conn.transport.writes == []


def test_keep_alive_timer_waits_while_the_handler_works(loop):
    future = loop.create_future()
    conn = Conn(loop, lambda r: future, ProtocolConfig(keepalive_timeout=0.05))
    conn.feed([b"GET / HTTP/1.1\r\n\r\n"])
    with pytest.raises(TimeoutError):
        # Several keep-alive periods pass with the answer outstanding; the connection must stay.
        loop.run_until_complete(asyncio.wait_for(conn.transport.closed.wait(), 0.3))
    future.set_result(Response(200, OK_BODY))
    conn.wait_closed()  # and once answered, idleness counts again
    assert [a.status for a in conn.answers()] == [200]


def test_slow_headers_behind_a_pending_answer_get_408_after_it(loop):
    future = loop.create_future()
    conn = Conn(loop, lambda r: future, ProtocolConfig(header_timeout=0.05, keepalive_timeout=60))
    conn.feed([b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\nHo"])
    with pytest.raises(TimeoutError):
        loop.run_until_complete(asyncio.wait_for(conn.transport.written.wait(), 0.2))
    future.set_result(Response(200, OK_BODY))
    conn.wait_closed()
    assert [a.status for a in conn.answers()] == [200, 408]


def test_header_timeout_does_not_fire_while_we_stopped_reading(loop):
    conn = Conn(loop, ok_handler, ProtocolConfig(header_timeout=0.05, keepalive_timeout=60))
    conn.feed([b"GET / HTTP/1.1\r\nHo"])
    conn.protocol.pause_writing()  # our fault now: the client cannot send
    with pytest.raises(TimeoutError):
        loop.run_until_complete(asyncio.wait_for(conn.transport.closed.wait(), 0.3))
    conn.protocol.resume_writing()
    conn.wait_closed()
    assert [a.status for a in conn.answers()] == [408]


class CountingLoop:
    """Delegates to a real loop, counting the timers asked of it."""

    def __init__(self, loop) -> None:
        self._loop = loop
        self.timers = 0

    def call_at(self, when, callback, *args):
        self.timers += 1
        return self._loop.call_at(when, callback, *args)

    def __getattr__(self, name):
        return getattr(self._loop, name)


def test_keep_alive_requests_do_not_create_a_timer_each(loop):
    counting = CountingLoop(loop)
    conn = Conn(counting, ok_handler)  # default timeouts: keep-alive 5 s is the shortest
    for _ in range(200):
        conn.feed([b"POST /api/v1/tasks HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"])
    assert len(conn.answers()) == 200
    assert counting.timers == 1


def test_deadline_earlier_than_the_pending_timer_replaces_it(loop):
    counting = CountingLoop(loop)
    conn = Conn(counting, ok_handler, ProtocolConfig(keepalive_timeout=60, header_timeout=0.05))
    conn.feed([b"GET / HTTP/1.1\r\n"])
    conn.wait_closed()  # long before the 60 s idle timer would have looked
    assert counting.timers == 2
    assert [a.status for a in conn.answers()] == [408]


# --- backpressure ----------------------------------------------------------------------------


def test_write_backpressure_pauses_and_resumes_reading(loop):
    conn = Conn(loop, ok_handler, ProtocolConfig(write_high_water=4096))
    assert conn.transport.high_water == 4096
    conn.protocol.pause_writing()
    assert not conn.transport.reading
    conn.protocol.resume_writing()
    assert conn.transport.reading and conn.transport.read_pauses == 1


def test_full_pipeline_pauses_reading_until_answers_go_out(loop):
    futures = []

    def handler(request):
        futures.append(loop.create_future())
        return futures[-1]

    conn = Conn(loop, handler, ProtocolConfig(max_pipeline=2))
    conn.feed([b"GET /1 HTTP/1.1\r\n\r\n"])
    assert conn.transport.reading
    conn.feed([b"GET /2 HTTP/1.1\r\n\r\n"])
    assert not conn.transport.reading
    futures[0].set_result(Response(200, OK_BODY))
    conn.wait_answers(1)
    assert conn.transport.reading


def test_pipeline_draining_does_not_resume_reading_while_writes_are_paused(loop):
    futures = []

    def handler(request):
        futures.append(loop.create_future())
        return futures[-1]

    conn = Conn(loop, handler, ProtocolConfig(max_pipeline=1))
    conn.feed([b"GET /1 HTTP/1.1\r\n\r\n"])
    conn.protocol.pause_writing()
    futures[0].set_result(Response(200, OK_BODY))
    conn.wait_answers(1)
    assert not conn.transport.reading
    conn.protocol.resume_writing()
    assert conn.transport.reading


# --- lifecycle ---------------------------------------------------------------------------------


def test_connections_set_tracks_the_connection(loop):
    connections: set = set()
    conn = Conn(loop, ok_handler, connections=connections)
    assert connections == {conn.protocol}
    conn.feed([b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"])
    loop.run_until_complete(asyncio.wait_for(conn.transport.lost.wait(), WAIT))
    assert connections == set()


def test_shutdown_when_idle_closes_at_once_without_writing(loop):
    conn = Conn(loop, ok_handler)
    conn.feed([b"GET / HTTP/1.1\r\n\r\n"])
    conn.protocol.shutdown()
    assert conn.transport.is_closing()
    assert [a.status for a in conn.answers()] == [200]


def test_shutdown_finishes_the_request_in_flight_and_says_close(loop):
    future = loop.create_future()
    conn = Conn(loop, lambda r: future)
    conn.feed([b"GET / HTTP/1.1\r\n\r\n"])
    conn.protocol.shutdown()
    assert not conn.transport.is_closing()
    future.set_result(Response(200, OK_BODY))
    conn.wait_closed()
    (answer,) = conn.answers()
    assert answer.status == 200 and answer.headers["connection"] == "close"


def test_shutdown_waits_for_a_half_received_request(loop):
    conn = Conn(loop, ok_handler)
    conn.feed([b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nab"])
    conn.protocol.shutdown()
    assert not conn.transport.is_closing()
    conn.feed([b"cd"])
    (answer,) = conn.answers()
    assert answer.status == 200 and answer.headers["connection"] == "close"
    assert conn.transport.is_closing()


def test_eof_with_answers_due_keeps_writing_then_closes(loop):
    future = loop.create_future()
    conn = Conn(loop, lambda r: future)
    conn.feed([b"GET / HTTP/1.1\r\n\r\n"])
    assert conn.protocol.eof_received() is True
    future.set_result(Response(200, OK_BODY))
    conn.wait_closed()
    (answer,) = conn.answers()
    assert answer.headers["connection"] == "close"


def test_eof_when_idle_lets_the_transport_close(loop):
    conn = Conn(loop, ok_handler)
    assert not conn.protocol.eof_received()


def test_answer_after_connection_lost_is_dropped(loop):
    future = loop.create_future()
    conn = Conn(loop, lambda r: future)
    conn.feed([b"GET / HTTP/1.1\r\n\r\n"])
    conn.protocol.connection_lost(ConnectionResetError())
    future.set_result(Response(200, OK_BODY))
    settle(loop, future)
    assert conn.transport.writes == []


def test_failure_after_connection_lost_is_still_retrieved_and_logged(loop, caplog):
    future = loop.create_future()
    conn = Conn(loop, lambda r: future)
    conn.feed([b"GET / HTTP/1.1\r\n\r\n"])
    conn.protocol.connection_lost(None)
    with caplog.at_level(logging.ERROR, logger="runlater.http"):
        future.set_exception(RuntimeError("late"))
        settle_exception(loop, future)
    assert any(r.exc_info and isinstance(r.exc_info[1], RuntimeError) for r in caplog.records)


def settle_exception(loop, future: asyncio.Future) -> None:
    async def wait() -> None:
        await asyncio.wait([future], timeout=WAIT)

    loop.run_until_complete(wait())


@pytest.mark.parametrize(
    "field, value",
    [("max_header_bytes", 0), ("max_body_bytes", -1), ("max_pipeline", 0), ("keepalive_timeout", 0.0),
     ("header_timeout", -1.0), ("body_timeout", 0)],
)
def test_config_rejects_nonsense_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ProtocolConfig(**{field: value})
