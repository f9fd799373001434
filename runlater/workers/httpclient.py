"""The executors' outbound HTTP/1.1 client: pooled, deadline-bound, SSRF-checked.

One ``HttpClient`` per executor process keeps thousands of deliveries in flight on one event loop.
It is an ``asyncio.Protocol`` over httptools' response parser (no streams: a delivery costs one
future and one timer, not a task and a buffer chain).

Behaviour, and why:

* **Deadline.** ``timeout`` bounds the whole call — pool wait, DNS, connect, TLS, send, receive,
  every redirect hop — so a delivery never outlives its lease (DECISIONS 17). Expiry raises
  ``RequestTimeout``. ``connect_timeout`` additionally bounds each DNS+connect+TLS phase.
* **Request body.** Sent only for POST, PUT and PATCH (as upstream, spec §2.1); those always carry
  ``content-length`` — ``0`` when the task has no body, because RFC 9110 §8.6 asks for it on a
  body-defining method and some origins answer 411 without it. GET, HEAD, DELETE, OPTIONS send no
  body and no ``content-length`` (RFC 9110 says a user agent SHOULD NOT send one there, and some
  proxies reject a GET that has one).
* **Headers.** ``host`` first, then the caller's headers in order and spelling, then
  ``user-agent: runlater/<version>`` and ``accept-encoding: identity`` unless the caller set them.
  Response bodies are stored as text (DECISIONS 16), so we ask for no compression and never
  decode any. Framing headers from the caller (``content-length``, ``transfer-encoding``,
  ``connection``, …) are dropped: the client owns message framing, and letting a task set them
  would allow request smuggling on shared keep-alive connections. A caller's ``host`` is honoured
  on the first origin only. Names must be tokens and values must not contain CR, LF or NUL
  (``InvalidRequest``); values are sent as UTF-8.
* **Pools.** One per origin (scheme, host, port), at most ``max_per_origin`` connections; further
  requests queue FIFO until one is released or the deadline passes. Idle connections are reused
  newest first (the warmest socket is the least likely to have been closed by the server), are
  dropped the moment the server closes them, and expire after ``keepalive_expiry`` seconds.
* **Stale keep-alive.** A reused connection that closes before the first response byte is most
  likely the server's idle close crossing our request, so the request is sent once more on a
  fresh connection. Nothing else is retried — the executor owns retries.
* **Large bodies.** The first ``max_body`` bytes are kept and ``truncated`` is set. We keep
  reading and discarding up to ``_DRAIN_LIMIT`` more bytes so the connection can be reused —
  draining 1 MiB on a warm socket is cheaper than a new TCP+TLS handshake — and close the
  connection beyond that, or at once when a close-delimited body or a ``content-length`` already
  tells us the drain would be too long. The truncated response is then returned immediately;
  a deadline hit while draining also returns it rather than a timeout, since the part we store
  is complete.
* **Redirects.** Up to ``max_redirects`` (5) hops on 301/302/303/307/308 with a ``location``;
  303 turns any method but HEAD into GET and 301/302 turn POST into GET (the Fetch rules, which
  browsers and upstream follow), dropping the body and its ``content-*`` headers; 307/308 keep
  method and body. ``authorization``, ``proxy-authorization`` and ``cookie`` are dropped once a
  hop leaves the origin. A 3xx without a usable http(s) ``location`` is returned as the
  response. Every hop goes through the SSRF check.
* **SSRF.** Each new connection resolves the host, checks every address with the address policy
  (``ssrf.public_only`` unless ``allow_private``) and connects to the checked address itself, so
  a second DNS answer can never substitute an internal one. Addresses are tried in resolver
  order within the connect timeout (no Happy Eyeballs: deliveries are not interactive).
* **Errors.** Every failure is a ``ClientError`` whose ``reason`` is short enough for the stored
  message ``Transport error: <reason>`` (``econnrefused``, ``nxdomain``,
  ``blocked_address 127.0.0.1``, ``tls_verify_failed …``) and which also subclasses the matching
  builtin (``TimeoutError``, ``OSError``, ``ValueError``).
"""

from __future__ import annotations

import asyncio
import base64
import errno as errno_module
import re
import socket
import ssl
from collections import deque
from collections.abc import Iterable
from urllib.parse import quote, unquote, urljoin, urlsplit

import httptools

from runlater import __version__
from runlater.workers.ssrf import (
    AddressBlocked,
    AddressPolicy,
    Resolver,
    public_only,
    resolve_checked,
    system_resolver,
)

__all__ = [
    "BlockedAddress",
    "ClientError",
    "ClientResponse",
    "ConnectError",
    "HttpClient",
    "InvalidRequest",
    "ProtocolError",
    "RequestTimeout",
    "TooManyRedirects",
]

DEFAULT_USER_AGENT = f"runlater/{__version__}"

# Bytes read and discarded past max_body before giving the connection up (see module docstring).
_DRAIN_LIMIT = 1024 * 1024

# Idle pools are swept at most this often, piggybacking on requests, so the client needs no
# background task and origins visited once do not accumulate.
_SWEEP_INTERVAL = 10.0

# Parsed URLs are kept because recurring tasks call the same URL over and over; urlsplit and
# the checks cost about as much as the rest of a request's Python work. Cleared when full.
_TARGET_CACHE_SIZE = 4096

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}

# Framing and connection-management headers are ours to set (request smuggling otherwise).
_DROPPED_HEADERS = frozenset(
    {
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    }
)
_CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
_BODY_HEADERS = frozenset(
    {"content-type", "content-encoding", "content-language", "content-location"}
)

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\r\n\x00]")
# Request targets made only of these need no quoting (the common case, checked with one regex).
_PLAIN_TARGET = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/?%\[\]]*")


# ---------------------------------------------------------------------------------------------
# Errors


class ClientError(Exception):
    """Base of every error ``HttpClient.request`` raises. ``reason`` is the short stored text."""

    def __init__(self, reason: str, url: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.url = url

    def __str__(self) -> str:
        return self.reason


class RequestTimeout(ClientError, TimeoutError):
    """The deadline (or the connect timeout) expired."""


class ConnectError(ClientError, OSError):
    """DNS failure, refused or reset connection, TLS failure, or a close without a response."""

    def __init__(self, reason: str, url: str | None = None, errno: int | None = None) -> None:
        super().__init__(reason, url)
        self.errno = errno


class BlockedAddress(ClientError):
    """The target resolves to an address the SSRF policy forbids."""

    def __init__(self, reason: str, url: str | None = None, address: str | None = None) -> None:
        super().__init__(reason, url)
        self.address = address


class ProtocolError(ClientError):
    """The server's bytes are not a valid HTTP/1.1 response."""


class TooManyRedirects(ClientError):
    """More redirect hops than ``max_redirects``."""


class InvalidRequest(ClientError, ValueError):
    """The caller's URL, method or headers cannot be sent (bad scheme, CR/LF in a header, …)."""


class _StaleConnection(Exception):
    """Internal: the connection closed before any response byte; maybe retryable."""

    def __init__(self, reason: str, errno: int | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.errno = errno


def _os_reason(exc: BaseException | None) -> tuple[str, int | None]:
    """A short lower-case reason for an OS-level error, named like the errno (``econnreset``)."""
    if exc is None:
        return "connection_closed", None
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code in errno_module.errorcode:
        return errno_module.errorcode[code].lower(), code
    return type(exc).__name__.lower(), None


# ---------------------------------------------------------------------------------------------
# Response and request target


class ClientResponse:
    """The final response. ``headers`` are (lower-case name, value) pairs decoded as Latin-1,
    ``body`` is at most ``max_body`` bytes, ``url`` is the URL that produced it (after redirects)."""

    __slots__ = ("status", "headers", "body", "truncated", "url")

    def __init__(
        self,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
        truncated: bool,
        url: str = "",
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.truncated = truncated
        self.url = url

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def __repr__(self) -> str:
        return (
            f"<ClientResponse {self.status} {self.url!r} {len(self.body)} bytes"
            f"{' truncated' if self.truncated else ''}>"
        )


class _Target:
    """A parsed absolute URL, in the pieces a request needs."""

    __slots__ = ("url", "scheme", "host", "port", "origin", "host_header", "request_target", "auth")

    def __init__(self, url: str) -> None:
        try:
            parts = urlsplit(url)
            host = parts.hostname
            port = parts.port
        except ValueError as exc:
            raise InvalidRequest(f"invalid_url {url!r}: {exc}", url) from None
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise InvalidRequest(f"unsupported_scheme {scheme!r}", url)
        if not host:
            raise InvalidRequest(f"invalid_url {url!r}: no host", url)
        if not host.isascii():
            try:
                host = host.encode("idna").decode("ascii")
            except UnicodeError:
                raise InvalidRequest(f"invalid_url {url!r}: bad host", url) from None
        default_port = _DEFAULT_PORTS[scheme]
        if port is None:
            port = default_port
        bracketed = f"[{host}]" if ":" in host else host
        target = parts.path or "/"
        if parts.query:
            target = f"{target}?{parts.query}"
        if not _PLAIN_TARGET.fullmatch(target):
            # Spaces, controls and non-ASCII are percent-encoded; existing %XX escapes stay.
            target = quote(target, safe="/?:@!$&'()*+,;=-._~%[]")
        self.url = url
        self.scheme = scheme
        self.host = host
        self.port = port
        self.origin = (scheme, host, port)
        self.host_header = bracketed if port == default_port else f"{bracketed}:{port}"
        self.request_target = target
        self.auth: str | None = None
        if parts.username is not None:
            credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self.auth = "Basic " + base64.b64encode(credentials.encode()).decode("ascii")


def _check_headers(headers: Iterable[tuple[str, str]], url: str) -> list[tuple[str, str, str]]:
    """Validated (name, lower-case name, value) triples, without the headers the client owns."""
    checked = []
    for name, value in headers:
        name = str(name)
        value = str(value)
        if not _TOKEN.fullmatch(name):
            raise InvalidRequest(f"invalid_header_name {name!r}", url)
        if _BAD_VALUE.search(value):
            raise InvalidRequest(f"invalid_header_value {name}: {value!r}", url)
        lname = name.lower()
        if lname not in _DROPPED_HEADERS:
            checked.append((name, lname, value))
    return checked


# ---------------------------------------------------------------------------------------------
# One connection


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection carrying one exchange at a time (no pipelining).

    Call order: the event loop calls ``connection_made`` once, then ``data_received`` any number
    of times, ``eof_received`` at most once, and ``connection_lost`` exactly once. Between those,
    the client calls ``start`` to begin an exchange; the future it returns resolves with a
    ``ClientResponse`` from inside a parser callback (or fails from ``connection_lost`` or the
    deadline timer). After it resolves, ``keep_alive`` tells the client whether to pool the
    connection. ``abort`` ends everything at once and is safe at any time.
    """

    __slots__ = (
        # connection lifetime
        "_loop",
        "_max_body",
        "_transport",
        "_parser",
        "closed",
        "lost",
        "pool",
        "in_idle",
        "idle_since",
        "keep_alive",
        # exchange lifetime
        "_waiter",
        "_timer",
        "_is_head",
        "_got_bytes",
        "_informational",
        "_status",
        "_headers",
        "_chunks",
        "_size",
        "_truncated",
        "_drained",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, max_body: int) -> None:
        self._loop = loop
        self._max_body = max_body
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.lost: asyncio.Future[None] = loop.create_future()
        self.pool: _Pool | None = None
        self.in_idle = False
        self.idle_since = 0.0
        self.keep_alive = False

        self._waiter: asyncio.Future[ClientResponse] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._is_head = False
        self._got_bytes = False
        self._informational = False
        self._status = 0
        self._headers: list[tuple[str, str]] = []
        self._chunks: list[bytes] = []
        self._size = 0
        self._truncated = False
        self._drained = 0

    # -- asyncio.Protocol, in the order the transport calls them

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:
            # Bytes nobody asked for (a 408 before an idle close, or junk after a response):
            # the connection's framing can no longer be trusted.
            self.keep_alive = False
            self._close_transport()
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolError(f"unexpected_upgrade status {self._parser.get_status_code()}"))
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"bad_response {exc}"))

    def eof_received(self) -> bool:
        return False  # let the transport close; connection_lost settles the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.keep_alive = False
        if not self.lost.done():
            self.lost.set_result(None)
        if self._waiter is not None:
            self._settle_on_close(exc)
        elif self.in_idle and self.pool is not None:
            self.pool.drop_idle(self)

    # -- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        if self._waiter is None:
            return
        status = self._parser.get_status_code()
        if status < 200:
            # 1xx: an interim response (103 Early Hints, an unsolicited 100). llhttp ends it
            # without a body; the final response follows on the same connection.
            self._informational = True
            return
        self._status = status
        self.keep_alive = self._parser.should_keep_alive()
        if self._is_head:
            # llhttp cannot be told the request was HEAD and would wait for content-length
            # bytes that never come; the rest of this parser's input is ignored (no waiter),
            # and the next exchange gets a fresh parser.
            self._parser = httptools.HttpResponseParser(self)
            self._finish()

    def on_body(self, chunk: bytes) -> None:
        if self._waiter is None:
            return
        n = len(chunk)
        if not self._truncated:
            room = self._max_body - self._size
            if n <= room:
                self._chunks.append(chunk)
                self._size += n
                return
            if room:
                self._chunks.append(chunk[:room])
                self._size += room
            self._truncated = True
            n -= room
            if not self._drain_worthwhile():
                self._finish_early()
                return
        self._drained += n
        if self._drained > _DRAIN_LIMIT:
            self._finish_early()

    def on_message_complete(self) -> None:
        if self._waiter is None:
            return
        if self._informational:
            self._informational = False
            self._headers = []
            return
        self._finish()

    # -- driven by the client

    def start(
        self, head: bytes, body: bytes | None, is_head: bool, deadline: float
    ) -> asyncio.Future[ClientResponse]:
        """Send one request and return the future of its response (see the class docstring)."""
        self._is_head = is_head
        self._got_bytes = False
        self._informational = False
        self._status = 0
        self._headers = []
        self._chunks = []
        self._size = 0
        self._truncated = False
        self._drained = 0
        self.keep_alive = False
        waiter = self._waiter = self._loop.create_future()
        self._timer = self._loop.call_at(deadline, self._on_deadline)
        transport = self._transport
        assert transport is not None
        if body is None:
            transport.write(head)
        elif len(body) <= 16384:
            transport.write(head + body)  # one segment for the common small body
        else:
            transport.write(head)
            transport.write(body)
        return waiter

    def abort(self, exc: BaseException | None = None) -> None:
        """Drop the connection now; a pending exchange fails with ``exc`` (default: aborted)."""
        waiter = self._waiter
        self._clear_exchange()
        self.keep_alive = False
        if self._transport is not None and not self.closed:
            self.closed = True
            self._transport.abort()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc or ClientError("connection_aborted"))

    def close(self) -> None:
        """Close after the exchange (graceful: pending writes and TLS close_notify go out)."""
        self._clear_exchange()
        self.keep_alive = False
        self._close_transport()

    @property
    def usable(self) -> bool:
        return not self.closed and self._transport is not None and not self._transport.is_closing()

    # -- internals

    def _drain_worthwhile(self) -> bool:
        """Whether the rest of an oversized body is short enough to read and discard."""
        if not self.keep_alive:
            return False  # close-delimited or "connection: close": the socket dies anyway
        for name, value in self._headers:
            if name == "content-length":
                try:
                    return int(value) - self._max_body <= _DRAIN_LIMIT
                except ValueError:
                    return False
        return True  # chunked: unknown length, drain up to the limit

    def _on_deadline(self) -> None:
        self._timer = None
        if self._waiter is None:
            return
        if self._truncated:
            self._finish_early()
        else:
            self._fail(RequestTimeout("timeout"))

    def _settle_on_close(self, exc: Exception | None) -> None:
        if not self._got_bytes:
            reason, code = _os_reason(exc)
            self._fail(_StaleConnection(reason, code))
        elif self._status and self._truncated:
            self._finish()  # we hold everything we would store
        elif self._status and exc is None and self._close_delimited():
            self._finish()
        elif exc is not None:
            reason, code = _os_reason(exc)
            self._fail(ConnectError(reason, errno=code))
        else:
            self._fail(ProtocolError("incomplete_response"))

    def _close_delimited(self) -> bool:
        for name, value in self._headers:
            if name == "content-length" or (
                name == "transfer-encoding" and "chunked" in value.lower()
            ):
                return False
        return True

    def _finish_early(self) -> None:
        # Abort rather than close: the server is still sending, and a graceful TLS shutdown
        # would keep the socket open until it stops.
        self.keep_alive = False
        self._finish()
        self._close_transport(abort=True)

    def _finish(self) -> None:
        waiter = self._waiter
        self._clear_exchange()
        if waiter is not None and not waiter.done():
            body = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
            self._chunks = []
            waiter.set_result(ClientResponse(self._status, self._headers, body, self._truncated))

    def _fail(self, exc: BaseException) -> None:
        waiter = self._waiter
        self._clear_exchange()
        self.keep_alive = False
        self._close_transport(abort=True)
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _clear_exchange(self) -> None:
        self._waiter = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _close_transport(self, abort: bool = False) -> None:
        if self._transport is not None and not self._transport.is_closing():
            if abort:
                self._transport.abort()
            else:
                self._transport.close()


# ---------------------------------------------------------------------------------------------
# Per-origin pool


class _Pool:
    """Connections to one origin.

    Invariants: ``size`` counts connections that are open or being opened, idle or busy, and
    never exceeds ``cap``; ``idle`` holds only connections nobody is using, oldest first;
    waiters exist only while ``size == cap`` and ``idle`` is empty. A waiter's future receives
    either a connection or None, meaning "a slot is yours, open a connection"; a slot handed to a
    waiter is never returned to the count in between, so the cap holds under any interleaving.
    """

    __slots__ = ("cap", "size", "idle", "waiters")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.size = 0
        self.idle: list[_Connection] = []
        self.waiters: deque[asyncio.Future[_Connection | None]] = deque()

    def release(self, conn: _Connection, now: float) -> None:
        """Return a healthy connection after a complete exchange."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.in_idle = True
        conn.idle_since = now
        self.idle.append(conn)

    def release_slot(self) -> None:
        """A connection (or a connect attempt) of this pool is gone."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.size -= 1

    def give_back(self, granted: _Connection | None, now: float) -> None:
        if granted is None:
            self.release_slot()
        else:
            self.release(granted, now)

    def drop_idle(self, conn: _Connection) -> None:
        """An idle connection was closed by the server."""
        conn.in_idle = False
        try:
            self.idle.remove(conn)
        except ValueError:
            return
        self.release_slot()

    def expire_idle(self, older_than: float) -> None:
        while self.idle and self.idle[0].idle_since < older_than:
            conn = self.idle.pop(0)
            conn.in_idle = False
            conn.abort()
            self.release_slot()


def _expire_waiter(waiter: asyncio.Future[_Connection | None]) -> None:
    if not waiter.done():
        waiter.set_exception(RequestTimeout("pool_timeout"))


# ---------------------------------------------------------------------------------------------
# The client


class HttpClient:
    """Pooled HTTP/1.1 client for deliveries; see the module docstring for its behaviour.

    ``address_policy`` decides which resolved addresses may be connected to; it defaults to
    ``ssrf.public_only``, or to allowing everything when ``allow_private`` is true. Tests pass
    their own (e.g. "127.0.0.1 counts as public") to exercise the checks on loopback.
    ``resolver(host, port) -> list[str]`` replaces the OS resolver. Use one client per event loop.
    """

    def __init__(
        self,
        *,
        max_per_origin: int = 64,
        connect_timeout: float = 10.0,
        max_body: int = 256 * 1024,
        allow_private: bool = False,
        user_agent: str = DEFAULT_USER_AGENT,
        resolver: Resolver | None = None,
        address_policy: AddressPolicy | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_redirects: int = 5,
        keepalive_expiry: float = 15.0,
    ) -> None:
        if max_per_origin < 1:
            raise ValueError(f"max_per_origin must be at least 1, got {max_per_origin}")
        if max_body < 0:
            raise ValueError(f"max_body must not be negative, got {max_body}")
        self._max_per_origin = max_per_origin
        self._connect_timeout = connect_timeout
        self._max_body = max_body
        self._user_agent = user_agent
        self._resolver: Resolver = resolver or system_resolver
        if address_policy is None and not allow_private:
            address_policy = public_only
        self._policy = address_policy
        # Building the default context loads the CA store (milliseconds); do it once.
        self._ssl = ssl_context
        self._max_redirects = max_redirects
        self._keepalive_expiry = keepalive_expiry
        self._pools: dict[tuple[str, str, int], _Pool] = {}
        self._targets: dict[str, _Target] = {}
        self._connections: set[_Connection] = set()
        self._next_sweep = 0.0
        self._closed = False
        # Bound on first use: one client serves one event loop.
        self._loop: asyncio.AbstractEventLoop | None = None

    async def request(
        self,
        method: str,
        url: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | None = None,
        timeout: float = 30.0,
    ) -> ClientResponse:
        """Send one request, following redirects, within ``timeout`` seconds overall."""
        if self._closed:
            raise ClientError("client_closed", url)
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + timeout
        if now >= self._next_sweep:
            self._sweep(now)
        method = method.upper()
        if not _TOKEN.fullmatch(method):
            raise InvalidRequest(f"invalid_method {method!r}", url)
        target = self._targets.get(url)
        if target is None:
            target = _Target(url)
            if len(self._targets) >= _TARGET_CACHE_SIZE:
                self._targets.clear()
            self._targets[url] = target
        first_origin = target.origin
        checked = _check_headers(headers, url)
        if target.auth is not None and not any(lname == "authorization" for _, lname, _ in checked):
            checked.append(("Authorization", "authorization", target.auth))
        send_body = (body if body is not None else b"") if method in _BODY_METHODS else None

        hops = 0
        while True:
            head = self._head(method, target, checked, send_body, target.origin == first_origin)
            try:
                response = await self._exchange(target, head, send_body, method == "HEAD", deadline)
            except ClientError as exc:
                exc.url = target.url
                raise
            if response.status not in _REDIRECT_STATUSES:
                break
            location = response.header("location")
            if location is None:
                break
            try:
                # Servers put raw UTF-8 in Location; undo our Latin-1 decoding before joining.
                text = location.encode("latin-1").decode("utf-8", "replace")
                next_target = _Target(urljoin(target.url, text.strip()))
            except InvalidRequest:
                break  # e.g. a redirect to ftp:// — judge the 3xx itself
            if hops == self._max_redirects:
                raise TooManyRedirects(
                    f"too_many_redirects (more than {self._max_redirects})", target.url
                )
            hops += 1
            status = response.status
            if (status == 303 and method != "HEAD") or (status in (301, 302) and method == "POST"):
                method = "GET"
                send_body = None
                checked = [h for h in checked if h[1] not in _BODY_HEADERS]
            if next_target.origin != target.origin:
                checked = [h for h in checked if h[1] not in _CREDENTIAL_HEADERS]
            target = next_target
        response.url = target.url
        return response

    async def close(self) -> None:
        """Drop every connection and fail queued requests. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for pool in self._pools.values():
            while pool.waiters:
                waiter = pool.waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(ClientError("client_closed"))
            pool.idle.clear()
        self._pools.clear()
        connections = list(self._connections)
        for conn in connections:
            conn.abort(ClientError("client_closed"))
        # Wait for connection_lost so no transport outlives the client (and the loop).
        if connections:
            await asyncio.gather(*(conn.lost for conn in connections))

    # -- internals

    def _head(
        self,
        method: str,
        target: _Target,
        headers: list[tuple[str, str, str]],
        body: bytes | None,
        first_origin: bool,
    ) -> bytes:
        host = target.host_header
        lines = []
        has_agent = has_encoding = False
        for name, lname, value in headers:
            if lname == "host":
                if first_origin:
                    host = value
                continue
            if lname == "user-agent":
                has_agent = True
            elif lname == "accept-encoding":
                has_encoding = True
            lines.append(f"{name}: {value}\r\n")
        if not has_agent:
            lines.append(f"user-agent: {self._user_agent}\r\n")
        if not has_encoding:
            lines.append("accept-encoding: identity\r\n")
        if body is not None:
            lines.append(f"content-length: {len(body)}\r\n")
        return (
            f"{method} {target.request_target} HTTP/1.1\r\nhost: {host}\r\n{''.join(lines)}\r\n"
        ).encode()

    async def _exchange(
        self, target: _Target, head: bytes, body: bytes | None, is_head: bool, deadline: float
    ) -> ClientResponse:
        pool = self._pools.get(target.origin)
        if pool is None:
            pool = self._pools[target.origin] = _Pool(self._max_per_origin)
        conn = await self._acquire(pool, deadline)
        reused = conn is not None
        while True:
            if conn is None:
                try:
                    if self._closed:
                        raise ClientError("client_closed")
                    conn = await self._connect(target, deadline)
                except BaseException:
                    pool.release_slot()
                    raise
                conn.pool = pool
            try:
                response = await conn.start(head, body, is_head, deadline)
            except _StaleConnection as exc:
                if reused:
                    # Keep the slot and go again on a fresh connection (module docstring).
                    reused = False
                    conn = None
                    continue
                pool.release_slot()
                raise ConnectError(exc.reason, errno=exc.errno) from None
            except BaseException:
                conn.abort()
                pool.release_slot()
                raise
            if conn.keep_alive and conn.usable and not self._closed:
                pool.release(conn, self._loop.time())  # type: ignore[union-attr]
            else:
                conn.close()
                pool.release_slot()
            return response

    async def _acquire(self, pool: _Pool, deadline: float) -> _Connection | None:
        loop = self._loop
        assert loop is not None
        idle = pool.idle
        if idle:
            fresh_after = loop.time() - self._keepalive_expiry
            while idle:
                conn = idle.pop()
                conn.in_idle = False
                if conn.usable and conn.idle_since >= fresh_after:
                    return conn
                conn.abort()
                pool.size -= 1
        if pool.size < pool.cap:
            pool.size += 1
            return None
        waiter: asyncio.Future[_Connection | None] = loop.create_future()
        pool.waiters.append(waiter)
        timer = loop.call_at(deadline, _expire_waiter, waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            # Cancelled after being handed a connection or slot: pass it on, or it leaks.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                pool.give_back(waiter.result(), loop.time())
            raise
        finally:
            timer.cancel()

    async def _connect(self, target: _Target, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        connect_deadline = min(deadline, loop.time() + self._connect_timeout)
        ssl_context: ssl.SSLContext | None = None
        if target.scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            ssl_context = self._ssl
        try:
            async with asyncio.timeout_at(connect_deadline):
                addresses = await resolve_checked(
                    target.host, target.port, self._resolver, self._policy
                )
                if not addresses:
                    raise ConnectError("nxdomain")
                last_error: OSError | None = None
                for address in addresses:
                    try:
                        _, conn = await loop.create_connection(
                            lambda: _Connection(loop, self._max_body),
                            address,
                            target.port,
                            ssl=ssl_context,
                            server_hostname=target.host if ssl_context else None,
                        )
                    except OSError as exc:
                        last_error = exc
                        continue
                    if self._closed:  # closed while we were connecting: close() missed it
                        conn.abort()
                        raise ClientError("client_closed")
                    self._connections.add(conn)
                    conn.lost.add_done_callback(lambda _, c=conn: self._connections.discard(c))
                    return conn
                assert last_error is not None
                raise last_error
        except ClientError:
            raise
        except AddressBlocked as exc:
            raise BlockedAddress(f"blocked_address {exc.address}", address=exc.address) from None
        except TimeoutError:
            reason = "timeout" if connect_deadline >= deadline else "connect_timeout"
            raise RequestTimeout(reason) from None
        except socket.gaierror as exc:
            if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                raise ConnectError("nxdomain", errno=exc.errno) from None
            raise ConnectError(f"dns_error {exc.strerror}", errno=exc.errno) from None
        except ssl.SSLCertVerificationError as exc:
            raise ConnectError(f"tls_verify_failed {exc.verify_message}") from None
        except ssl.SSLError as exc:
            raise ConnectError(f"tls_error {exc.reason or exc}") from None
        except OSError as exc:
            reason, code = _os_reason(exc)
            raise ConnectError(reason, errno=code) from None

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + _SWEEP_INTERVAL
        older_than = now - self._keepalive_expiry
        for origin, pool in list(self._pools.items()):
            pool.expire_idle(older_than)
            if pool.size == 0 and not pool.waiters:
                del self._pools[origin]
