"""HTTP/1.1 server protocol: httptools parses, handlers answer, responses go out in request order.

One ``HttpProtocol`` per TCP connection owns the parser, its one timer and the queue of requests
waiting for their answers. An ``_Exchange`` is created only for a request whose answer is not
ready when the handler returns (a future or a coroutine), or that has to wait behind an earlier
unanswered request; the common case -- a handler returning a ``Response`` on an otherwise idle
connection -- allocates no bookkeeping of its own: the ``Request``, its fields and the bytes
written are all there is.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from time import time
from typing import Union
from urllib.parse import unquote_to_bytes

import httptools
import orjson

from runlater.http.flow import FlowControl
from runlater.http.messages import JSON_TYPE, Request, Response

logger = logging.getLogger("runlater.http")

HandlerResult = Union[Response, "asyncio.Future[Response]", Awaitable[Response]]
Handler = Callable[[Request], HandlerResult]


@dataclass(frozen=True, slots=True)
class ProtocolConfig:
    max_header_bytes: int = 16384  # request target + header fields (each name + value + 4); else 431, close
    max_body_bytes: int = 1048576  # declared or received body; beyond it: 413 and close
    keepalive_timeout: float = 5.0  # idle keep-alive connection is closed silently
    header_timeout: float = 10.0  # first byte of a request to the end of its headers; then 408
    body_timeout: float = 30.0  # end of headers to the end of the body; then 408
    max_pipeline: int = 32  # requests parsed but unanswered before reading pauses
    write_high_water: int = 256 * 1024  # transport write buffer size that pauses reading

    def __post_init__(self) -> None:
        for name in ("max_header_bytes", "max_body_bytes", "max_pipeline", "write_high_water"):
            if getattr(self, name) < 1:
                raise ValueError(f"ProtocolConfig.{name} must be at least 1, got {getattr(self, name)!r}")
        for name in ("keepalive_timeout", "header_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ProtocolConfig.{name} must be positive, got {getattr(self, name)!r}")


# --- response encoding: tables built once at import --------------------------------------------

_STATUS_LINES: dict[int, bytes] = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
# Statuses whose responses never carry content (RFC 9110 §6.4.1), so no content-length either.
_NO_CONTENT = frozenset([*range(100, 200), 204, 304])
# Indexed by _Exchange.keep_alive: 0 close, 1 HTTP/1.1 default, 2 HTTP/1.0 asked for keep-alive.
_CONNECTION = (b"connection: close\r\n", b"", b"connection: keep-alive\r\n")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:  # a code HTTPStatus does not know: the reason phrase may be empty
        line = b"HTTP/1.1 %d \r\n" % status
    return line


class _HttpDate:
    """The ``date`` header line, formatted again only once a wall-clock second has passed.

    Keyed on the event loop's clock, which the protocol reads anyway: the common case is one
    comparison, and the wall clock is read once a second. Every loop in a process (uvloop or
    asyncio) counts from CLOCK_MONOTONIC, so one instance serves them all.
    """

    __slots__ = ("expires", "line")

    def __init__(self) -> None:
        self.line = b""
        self.expires = float("-inf")

    def refresh(self, now: float) -> bytes:
        wall = time()
        second = int(wall)
        self.line = b"date: " + formatdate(second, usegmt=True).encode() + b"\r\n"
        self.expires = now + (second + 1 - wall)
        return self.line


_date = _HttpDate()


def encode_response(response: Response, keep_alive: int, head: bool, date: bytes) -> bytes:
    """The wire form of ``response``: for HEAD the same head without the body.

    ``keep_alive`` indexes ``_CONNECTION``; ``date`` is the whole ``date: ...\r\n`` line.
    """
    status = response.status
    headers = response.headers
    extra = b"".join([name + b": " + value + b"\r\n" for name, value in headers]) if headers else b""
    if status in _NO_CONTENT:
        return b"%s%s%s%s\r\n" % (_status_line(status), date, extra, _CONNECTION[keep_alive])
    body = response.body
    content_type = response.content_type
    if not body:
        return b"%scontent-length: 0\r\n%s%s%s\r\n" % (_status_line(status), date, extra, _CONNECTION[keep_alive])
    if content_type is None:
        head_bytes = b"%scontent-length: %d\r\n%s%s%s\r\n" % (
            _status_line(status), len(body), date, extra, _CONNECTION[keep_alive],
        )
        return head_bytes if head else head_bytes + body
    if head:
        return b"%scontent-type: %s\r\ncontent-length: %d\r\n%s%s%s\r\n" % (
            _status_line(status), content_type, len(body), date, extra, _CONNECTION[keep_alive],
        )
    # The common case, built with one formatting operation and no intermediate head bytes.
    return b"%scontent-type: %s\r\ncontent-length: %d\r\n%s%s%s\r\n%s" % (
        _STATUS_LINES.get(status) or _status_line(status), content_type, len(body), date, extra,
        _CONNECTION[keep_alive], body,
    )


def _framework_error(status: int, headers: list[tuple[bytes, bytes]] | None = None) -> Response:
    phrase = HTTPStatus(status).phrase
    return Response(status, orjson.dumps({"errors": {"detail": phrase}}), headers, JSON_TYPE)


_ERRORS: dict[int, Response] = {s: _framework_error(s) for s in (400, 408, 413, 431, 500)}
_INTERNAL_ERROR = _ERRORS[500]
_UNAVAILABLE = _framework_error(503, [(b"retry-after", b"1")])

# Header names as common clients spell them (Go and k6 canonicalise, curl and Python use
# Title-Case, Node lower case), mapped to their lower-case str once; others are decoded per request.
_HEADER_NAMES: dict[bytes, str] = {
    spelling.encode(): name.lower()
    for name in (
        "Host", "User-Agent", "Accept", "Accept-Encoding", "Accept-Language", "Authorization",
        "Connection", "Content-Type", "Content-Length", "Transfer-Encoding", "Expect", "Upgrade",
        "Idempotency-Key", "Cache-Control", "Cookie", "Origin", "Referer", "X-Forwarded-For",
        "X-Forwarded-Proto", "X-Real-Ip", "X-Request-Id", "Traceparent",
    )
    for spelling in (name, name.lower())
}

# Method names are a small closed set in practice; skip decoding them per request.
_METHODS: dict[bytes, str] = {
    m.encode(): m for m in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "CONNECT")
}


class _Reject(Exception):
    """Raised from a parser callback to abandon the connection with an error status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


# Parser phases, which also select the timeout that applies.
# How long a connection closed after an error answer keeps discarding the client's input.
_LINGER = 2.0
# How long shutdown() waits for the first request of a connection accepted just before.
_FRESH_GRACE = 1.0
_IDLE = 0  # between requests (keep-alive) or waiting for answers
_HEADERS = 1  # request line and headers being received
_BODY = 2  # body being received

# uvloop rounds timers to milliseconds and may fire up to that much early.
_TIMER_SLACK = 0.002
_NO_TIMER = float("inf")
_CLOSED_TIMER = float("-inf")


class _Exchange:
    """A request whose answer is awaited, kept in arrival order in ``HttpProtocol._pipeline``."""

    __slots__ = ("head", "keep_alive", "protocol", "request", "response")

    def __init__(self, protocol: HttpProtocol, request: Request | None, keep_alive: int, head: bool) -> None:
        self.protocol = protocol
        self.request = request  # kept only to name the request if its handler fails
        self.keep_alive = keep_alive
        self.head = head
        self.response: Response | None = None

    def on_done(self, future: asyncio.Future) -> None:
        # Always collect the outcome, even if the client has gone: that retrieves the exception
        # (no "never retrieved" noise) and logs handler failures.
        self.response = _outcome(future, self.request)
        self.request = None
        protocol = self.protocol
        if not protocol._closing:
            protocol._flush()


def _outcome(future: asyncio.Future, request: Request | None) -> Response:
    try:
        result = future.result()  # also marks a failure as retrieved
    except asyncio.CancelledError:
        return _UNAVAILABLE
    except Exception as exc:
        logger.error("handler for %s failed", _describe(request), exc_info=exc)
        return _INTERNAL_ERROR
    if isinstance(result, Response):
        return result
    logger.error("handler for %s resolved to %r, not a Response", _describe(request), type(result).__name__)
    return _INTERNAL_ERROR


def _describe(request: Request | None) -> str:
    return f"{request.method} {request.path}" if request is not None else "a request"


class HttpProtocol(asyncio.Protocol):
    """One HTTP/1.1 server connection.

    Call order (from the transport): ``connection_made`` → ``data_received``* →
    ``eof_received``? → ``connection_lost``; ``pause_writing``/``resume_writing`` may come at any
    point in between. The parser's ``on_*`` callbacks run only inside ``data_received``.
    ``shutdown()`` and ``abort()`` are for the server and may be called at any time after
    ``connection_made``.

    Responses are written strictly in request order: a ready answer waits in ``_pipeline`` behind
    any earlier unanswered request. Output produced inside one ``data_received`` (several
    pipelined answers, a ``100 Continue``) is coalesced into one ``transport.write``.
    """

    __slots__ = (  # noqa: RUF023 -- grouped by lifetime, not sorted
        # server-wide, fixed at construction
        "_handler", "_config", "_loop", "_connections",
        "_max_header", "_max_body", "_max_message", "_max_pipeline",
        "_keepalive_timeout", "_header_timeout", "_body_timeout",
        # connection
        "_transport", "_flow", "_parser", "_client", "_pipeline", "_out",
        "_accepting", "_closing", "_close_when_done", "_fresh", "_linger", "_lingering",
        "_phase", "_deadline", "_timer", "_timer_at", "_now", "_chunk_len", "_message_bytes", "_begin_len",
        # request being parsed
        "_url", "_headers", "_trailer_bytes", "_body", "_body_bytes", "_continue_pending",
    )

    def __init__(
        self,
        handler: Handler,
        config: ProtocolConfig,
        loop: asyncio.AbstractEventLoop,
        connections: set | None = None,
    ) -> None:
        self._handler = handler
        self._config = config
        self._loop = loop
        self._connections = connections
        self._max_header = config.max_header_bytes
        self._max_body = config.max_body_bytes
        # Bytes on the wire for one request, counted only to bound what httptools buffers out of
        # our sight (a header or trailer line sent a byte at a time). Chunk-size lines and
        # trailers are framing the body limit does not see; twice the body plus 4 KiB leaves
        # room for any sane chunking.
        self._max_message = config.max_header_bytes + 2 * config.max_body_bytes + 4096
        self._max_pipeline = config.max_pipeline
        self._keepalive_timeout = config.keepalive_timeout
        self._header_timeout = config.header_timeout
        self._body_timeout = config.body_timeout

        self._transport: asyncio.Transport | None = None
        self._flow: FlowControl | None = None
        self._parser: httptools.HttpRequestParser | None = None
        self._client = ""
        self._pipeline: deque[_Exchange] = deque()
        self._out: list[bytes] = []  # answers due, written together at the end of data_received or _flush
        self._accepting = False  # parse further requests
        self._closing = False  # transport.close() is due (or done); nothing more will be written
        self._close_when_done = False  # shutdown() or eof: close once the last answer is out
        self._fresh = True  # accepted, no request begun yet
        self._linger = False  # close after an error answer: drain the client's bytes first
        self._lingering = False
        self._phase = _IDLE
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = _NO_TIMER  # when _timer fires; -inf once closing, so nothing re-arms
        self._now = 0.0  # loop.time() at the start of the current data_received
        # Size accounting for the request being received, in whole chunks: _message_bytes is
        # every chunk it has touched so far (an upper bound on its size), _begin_len the first
        # of them, which may also hold the end of the previous request.
        self._chunk_len = 0
        self._message_bytes = 0
        self._begin_len = 0

        self._url = b""
        self._headers: dict[str, str] = {}
        self._trailer_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._continue_pending = False

    # --- transport callbacks, in the order the transport calls them ---------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._flow = FlowControl(transport)
        transport.set_write_buffer_limits(high=self._config.write_high_water)
        peer = transport.get_extra_info("peername")
        self._client = peer[0] if isinstance(peer, tuple) and peer else ""
        self._parser = httptools.HttpRequestParser(self)
        self._accepting = True
        if self._connections is not None:
            self._connections.add(self)
        # A connection that never sends a byte is as idle as one between requests.
        self._arm(self._loop.time() + self._keepalive_timeout)

    def data_received(self, data: bytes) -> None:
        if not self._accepting:
            return
        self._now = self._loop.time()
        parser = self._parser
        while True:
            self._chunk_len = size = len(data)
            if self._phase != _IDLE:
                self._message_bytes += size
            try:
                parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                # An upgrade we do not support was answered as plain HTTP/1.1 (bodies on upgrade
                # requests are refused in on_headers_complete); whatever follows it is parsed as
                # the next HTTP/1.1 request, as a client falling back from h2c expects.
                data = data[exc.args[0]:]
                if data and self._accepting:
                    continue
            except httptools.HttpParserCallbackError as exc:
                cause = exc.__context__
                if isinstance(cause, _Reject):
                    self._reject(cause.status)
                elif not isinstance(cause, Exception):
                    raise cause from None  # KeyboardInterrupt, SystemExit: not ours to swallow
                else:
                    logger.error("HTTP protocol failure", exc_info=cause)
                    self._reject(500)
            except httptools.HttpParserError as exc:
                # After a non-keep-alive request the parser rejects any further bytes; those are
                # simply dropped, the answer to that request is still due.
                if self._accepting:
                    logger.debug("malformed request from %s: %s", self._client, exc)
                    self._reject(400)
            break
        phase = self._phase
        if phase != _IDLE and self._accepting:
            # httptools buffers a header (or trailer) line until it ends, out of sight of
            # on_header, so a line trickled in small chunks is bounded here, by the bytes that
            # arrived for this request after the chunk it began in (those are all its own).
            beyond = self._message_bytes - self._begin_len
            if phase == _HEADERS:
                if beyond > self._max_header:
                    self._reject(431)
            elif beyond > self._max_message:
                self._reject(413)
        out = self._out
        if out:
            self._transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        if self._closing:
            self._close_transport()

    def eof_received(self) -> bool | None:
        if self._lingering:
            return None  # the client finished sending: close now
        self._accepting = False
        self._phase = _IDLE  # a half-received request can never complete now
        self._continue_pending = False
        if self._pipeline and not self._closing:
            self._close_when_done = True
            return True  # keep the write side open for the answers still due
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._accepting = False
        self._closing = True
        self._cancel_timer()
        # Handlers still running are not cancelled: a create may be committing, and its outcome
        # must not depend on the client staying. Their answers are dropped in _Exchange.on_done.
        self._pipeline.clear()
        self._parser = None  # breaks the parser <-> protocol reference cycle
        if self._connections is not None:
            self._connections.discard(self)

    def pause_writing(self) -> None:
        self._flow.pause_writing()

    def resume_writing(self) -> None:
        self._flow.resume_writing()

    # --- for the server ---------------------------------------------------------------------

    def shutdown(self) -> None:
        """Close once the requests already received are answered (at once if there are none)."""
        if self._closing or self._transport is None:
            return
        self._close_when_done = True
        if not self._pipeline and self._phase == _IDLE:
            if self._fresh:
                # Accepted but nothing received yet: the client cannot know we are stopping
                # and may be sending its first request right now. Closing would lose it
                # (a graceful reload must not refuse a connection), so wait a moment; that
                # request's answer then carries `connection: close`.
                self._arm(self._loop.time() + min(self._header_timeout, _FRESH_GRACE))
                return
            self._begin_close()
            self._push()

    def abort(self) -> None:
        if self._transport is not None:
            self._closing = True
            self._transport.abort()

    # --- parser callbacks (inside data_received) ---------------------------------------------

    # The deadline stores below are _arm() inlined: they run several times per request, and
    # only a deadline earlier than the pending timer needs the call.

    def on_message_begin(self) -> None:
        self._fresh = False
        self._phase = _HEADERS
        self._deadline = deadline = self._now + self._header_timeout
        if deadline < self._timer_at:
            self._arm(deadline)
        self._url = b""
        self._headers = {}
        self._message_bytes = self._begin_len = self._chunk_len

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # The header block's size is checked once, in on_headers_complete.
        if self._phase != _HEADERS:
            # A trailer of a chunked body: held to the header limit, otherwise ignored.
            self._trailer_bytes += len(name) + len(value) + 4
            if self._trailer_bytes > self._max_header:
                raise _Reject(431)
            return
        key = _HEADER_NAMES.get(name)
        if key is None:
            key = name.decode("latin-1").lower()
        # llhttp strips leading whitespace but keeps trailing OWS, which is not part of the value.
        text = value.decode("latin-1").rstrip(" \t")
        headers = self._headers
        if key in headers:
            headers[key] = headers[key] + ", " + text
        else:
            headers[key] = text

    def on_headers_complete(self) -> None:
        self._phase = _BODY
        self._deadline = deadline = self._now + self._body_timeout
        if deadline < self._timer_at:
            self._arm(deadline)
        headers = self._headers
        if self._message_bytes > self._max_header:
            # The chunks the headers came in exceed the limit, so the block itself might: measure
            # it. Only large reads pay for this; a request in one small read never does.
            size = len(self._url) + sum([len(name) + len(value) + 4 for name, value in headers.items()])
            if size > self._max_header:
                raise _Reject(431)
        self._body_bytes = 0
        self._trailer_bytes = 0

        length = headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)  # llhttp has checked the digits; this is belt and braces
            except ValueError:
                raise _Reject(400) from None
            if declared > self._max_body:
                raise _Reject(413)
        # llhttp hands the body of an upgrade request over as the new protocol's bytes, so such a
        # body could never reach the handler.
        if (
            "upgrade" in headers
            and ((length is not None and length != "0") or "transfer-encoding" in headers)
            and self._parser.should_upgrade()
        ):
            raise _Reject(400)
        expect = headers.get("expect")
        if expect is not None and expect.lower() == "100-continue" and self._parser.get_http_version() == "1.1":
            if self._pipeline:
                self._continue_pending = True  # an interim answer must not overtake earlier finals
            else:
                self._out.append(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._continue_pending = False
        self._body_bytes += len(body)
        if self._body_bytes > self._max_body:
            raise _Reject(413)
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._phase = _IDLE
        self._continue_pending = False
        parser = self._parser
        try:
            url = httptools.parse_url(self._url)
        except httptools.HttpParserInvalidURLError:
            raise _Reject(400) from None
        raw_path = url.path
        try:
            if raw_path is None:
                path = "/"
            else:
                # Test for "%" on the str: `bytes in bytes` first tries the operand as an int
                # and pays for a TypeError, which measured as a third of this callback.
                path = raw_path.decode()
                if "%" in path:
                    path = unquote_to_bytes(raw_path).decode()
        except UnicodeDecodeError:
            raise _Reject(400) from None
        query = url.query
        parts = self._body
        if not parts:
            body = b""
        else:
            body = parts[0] if len(parts) == 1 else b"".join(parts)
            parts.clear()
        method = parser.get_method()
        method = _METHODS.get(method) or method.decode("ascii")
        headers = self._headers
        request = Request(method, path, query.decode("latin-1") if query else "", headers, body, self._client)

        if self._close_when_done or not parser.should_keep_alive():
            keep_alive = 0
            self._accepting = False  # the parser itself refuses anything after this request
            self._flow.stop()
        elif "connection" in headers and parser.get_http_version() == "1.0":
            keep_alive = 2
        else:
            keep_alive = 1
        self._dispatch(request, keep_alive, method == "HEAD")

    # --- answering -----------------------------------------------------------------------------

    def _dispatch(self, request: Request, keep_alive: int, head: bool) -> None:
        try:
            result = self._handler(request)
        except Exception:
            logger.exception("handler for %s %s failed", request.method, request.path)
            result = _INTERNAL_ERROR
        if not isinstance(result, Response):
            if asyncio.isfuture(result):
                if not result.done():
                    # The batched create path resolves thousands of these per second: a
                    # done-callback costs far less than a task per request.
                    self._wait_for(result, request, keep_alive, head)
                    return
                result = _outcome(result, request)
            elif asyncio.iscoroutine(result):
                task = self._loop.create_task(result, name="runlater.http.request")
                self._wait_for(task, request, keep_alive, head)
                return
            else:
                logger.error("handler for %s %s returned %r, not a Response",
                             request.method, request.path, type(result).__name__)
                result = _INTERNAL_ERROR
        if self._pipeline:
            exchange = _Exchange(self, None, keep_alive, head)
            exchange.response = result
            self._enqueue(exchange)
        else:
            self._send(result, keep_alive, head)
            self._deadline = deadline = self._now + self._keepalive_timeout
            if deadline < self._timer_at:
                self._arm(deadline)

    def _wait_for(self, future: asyncio.Future, request: Request, keep_alive: int, head: bool) -> None:
        exchange = _Exchange(self, request, keep_alive, head)
        future.add_done_callback(exchange.on_done)
        self._enqueue(exchange)

    def _enqueue(self, exchange: _Exchange) -> None:
        pipeline = self._pipeline
        pipeline.append(exchange)
        if len(pipeline) >= self._max_pipeline:
            self._flow.set_pipeline_full(True)

    def _flush(self) -> None:
        """Send every answer at the head of the pipeline that is ready (called from on_done)."""
        self._now = now = self._loop.time()
        pipeline = self._pipeline
        while pipeline and not self._closing:
            first = pipeline[0]
            if first.response is None:
                break
            pipeline.popleft()
            self._send(first.response, first.keep_alive, first.head)
        if self._closing:
            pipeline.clear()
        else:
            if self._flow.pipeline_full and len(pipeline) < self._max_pipeline:
                self._flow.set_pipeline_full(False)
            if not pipeline:
                if self._continue_pending:
                    self._continue_pending = False
                    self._out.append(_CONTINUE)
                    # The client has been waiting on us, not the other way round.
                    self._arm(now + self._body_timeout)
                elif self._phase == _IDLE:
                    self._arm(now + self._keepalive_timeout)
        self._push()

    def _send(self, response: Response, keep_alive: int, head: bool) -> None:
        if keep_alive and self._close_when_done and not self._pipeline and self._phase == _IDLE:
            keep_alive = 0
        now = self._now
        date = _date.line if now < _date.expires else _date.refresh(now)
        try:
            wire = encode_response(response, keep_alive, head, date)
        except Exception:
            # A malformed Response (str where bytes belong, say) must not leave the request
            # unanswered and everything behind it stuck.
            logger.exception("cannot encode response with status %r", getattr(response, "status", None))
            wire = encode_response(_INTERNAL_ERROR, keep_alive, head, date)
        self._out.append(wire)
        if not keep_alive:
            self._begin_close()

    def _push(self) -> None:
        out = self._out
        transport = self._transport
        if out:
            transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        if self._closing:
            self._close_transport()

    def _close_transport(self) -> None:
        if not self._linger:
            self._transport.close()
        elif not self._lingering:
            self._start_linger()

    def _start_linger(self) -> None:
        """Half-close after an error answer and discard what the client still sends.

        Closing a socket with unread input makes the kernel send a reset, which can
        destroy our 413/431/400 before the client reads it — typically a client still
        uploading a body we refused. So: shut our sending side (the client sees the
        answer and EOF), keep reading into the void for at most ``_LINGER`` seconds
        (or until the client closes), then close.
        """
        self._lingering = True
        transport = self._transport
        try:
            if transport.can_write_eof():
                transport.write_eof()
            transport.resume_reading()
        except (OSError, RuntimeError):
            transport.close()
            return
        self._loop.call_later(_LINGER, transport.close)

    def _reject(self, status: int) -> None:
        """Answer ``status`` after any earlier answers, then close; read nothing more."""
        self._accepting = False
        self._linger = True
        self._phase = _IDLE
        self._continue_pending = False
        self._flow.stop()
        response = _ERRORS[status]
        if self._pipeline:
            exchange = _Exchange(self, None, 0, False)
            exchange.response = response
            self._pipeline.append(exchange)
        else:
            self._send(response, 0, False)

    def _begin_close(self) -> None:
        # The transport is closed in _push, after the bytes already queued are written.
        self._closing = True
        self._accepting = False
        self._flow.stop()
        self._cancel_timer()

    # --- timeouts ------------------------------------------------------------------------------
    # One timer per connection. A deadline that moves later is an attribute store: the timer
    # fires early and re-arms itself for the current deadline. Only a deadline earlier than the
    # pending timer replaces it. With the default timeouts a busy keep-alive connection therefore
    # creates about one TimerHandle per keepalive_timeout, not several per request.

    def _arm(self, deadline: float) -> None:
        self._deadline = deadline
        if deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = _CLOSED_TIMER

    def _on_timer(self) -> None:
        self._timer = None
        if self._closing:
            self._timer_at = _CLOSED_TIMER
            return
        self._timer_at = _NO_TIMER
        phase = self._phase
        if phase == _IDLE and self._pipeline:
            return  # waiting on our handlers, not on the client; _flush re-arms when they finish
        now = self._loop.time()
        if not self._flow.reading:
            # We stopped reading (backpressure), so the client cannot be late.
            timeout = (self._keepalive_timeout, self._header_timeout, self._body_timeout)[phase]
            self._deadline = now + timeout
        if now + _TIMER_SLACK < self._deadline:
            self._arm(self._deadline)
            return
        if phase == _IDLE:
            self._begin_close()
        else:
            self._now = now
            logger.debug("request from %s timed out while receiving its %s", self._client,
                         "headers" if phase == _HEADERS else "body")
            self._reject(408)
        self._push()
