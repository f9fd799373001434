"""Fault injection against a real server: its database goes away, and clients send garbage.

The server under test reaches PostgreSQL through ``PgProxy`` (tests/pgproxy.py), so a
test can cut the database off mid-run and give it back. What is checked is the external
contract: while the database is unreachable every request that needs it gets a fast 503
with ``Retry-After`` (never a hang, never a 500), requests that need no database keep
working, the service recovers by itself, and nothing is ever acknowledged (202) that is
not committed. The test database itself is always read directly, never through the proxy.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import ServerProcess, make_org, missing_acks, wait_until
from pgproxy import PgProxy

pytestmark = pytest.mark.slow

FAST = 1.5  # seconds: the most any single answer may take while the database is away
HEALTH_DOWN = {"status": "error", "database": "disconnected"}
HEALTH_UP = {"status": "ok", "database": "connected"}


@dataclass
class Answer:
    status: int | None  # None: no HTTP answer at all (timeout, reset, refused)
    headers: dict[str, str]
    doc: Any
    elapsed: float
    error: str | None = None

    def __repr__(self) -> str:
        what = self.error if self.status is None else f"{self.status} {self.doc!r}"[:300]
        return f"<{what} in {self.elapsed:.3f}s>"


def call(port: int, method: str, path: str, *, key: str | None = None, body: Any = None,
         raw: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 10.0) -> Answer:
    """One request on a fresh connection (so the kernel picks any worker), timed."""
    h = {} if raw is not None else {"content-type": "application/json"}
    if key is not None:
        h["authorization"] = f"Bearer {key}"
    h.update(headers or {})
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    start = time.monotonic()
    try:
        conn.request(method, path, body=data, headers=h)
        resp = conn.getresponse()
        payload = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        return Answer(None, {}, None, time.monotonic() - start, f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()
    elapsed = time.monotonic() - start
    try:
        doc = json.loads(payload) if payload else None
    except ValueError:
        doc = payload
    return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, doc, elapsed)


TASK = {"url": "https://example.com/fault", "method": "POST", "body": "{}"}


@pytest.fixture
def proxy(pg_dsn):
    p = PgProxy(pg_dsn)
    yield p
    p.close()


@pytest.fixture
def proxied(proxy):
    """A server whose only way to the database is the proxy."""
    srv = ServerProcess(proxy.dsn, http_workers=2, executors=0)
    srv.wait_ready()
    yield srv
    srv.stop()


# -- database outage ---------------------------------------------------------------------


def test_outage_answers_503_fast_and_recovers_by_itself(proxy, proxied, pg_dsn, sql):
    org = make_org(pg_dsn)
    port = proxied.port
    first = call(port, "POST", "/api/v1/tasks", key=org.key, body=TASK)
    assert first.status == 202, first
    task_id = first.doc["data"]["task_id"]
    assert call(port, "GET", "/health").doc == HEALTH_UP
    assert proxy.accepted > 0 and proxy.connections > 0  # the server really talks through the proxy

    proxy.cut()
    needs_db = {
        "create": lambda: call(port, "POST", "/api/v1/tasks", key=org.key, body=TASK),
        "list": lambda: call(port, "GET", "/api/v1/tasks", key=org.key),
        "show": lambda: call(port, "GET", f"/api/v1/tasks/{task_id}", key=org.key),
        "health": lambda: call(port, "GET", "/health"),
    }
    # Fresh connections spread the requests over both workers; every one of them, from the
    # first after the cut on, must be a prompt 503 that says when to come back.
    for _ in range(10):
        for what, request in needs_db.items():
            answer = request()
            assert answer.status == 503, (what, answer)
            assert answer.elapsed < FAST, (what, answer)
            assert answer.headers.get("retry-after", "").isdigit(), (what, answer.headers)
            if what == "health":
                assert answer.doc == HEALTH_DOWN
            else:
                assert answer.doc["error"]["code"] == "service_unavailable", (what, answer)

    # What needs no database is unaffected.
    bad_key = call(port, "GET", "/api/v1/tasks", headers={"authorization": "Bearer nonsense"})
    assert bad_key.status == 401 and bad_key.elapsed < FAST, bad_key
    unknown = call(port, "GET", "/api/v1/no-such-route", key=org.key)
    assert unknown.status == 404 and unknown.elapsed < FAST, unknown
    assert proxied.proc.poll() is None

    proxy.restore()
    seen: list[Answer] = []

    def created() -> Answer | None:
        answer = needs_db["create"]()
        seen.append(answer)
        assert answer.status in (202, 503) and answer.elapsed < FAST, answer
        return answer if answer.status == 202 else None

    again = wait_until(created, 20, what="create answering 202 after the database came back")
    # Every worker has recovered once a run of fresh connections all succeed.
    streak = [0]

    def all_healthy() -> bool:
        answer = needs_db["health"]()
        assert answer.status in (200, 503) and answer.elapsed < FAST, answer
        streak[0] = streak[0] + 1 if answer.status == 200 else 0
        return streak[0] >= 20

    wait_until(all_healthy, 20, what="every worker healthy again")
    for what in ("create", "list", "show"):
        answer = needs_db[what]()
        assert answer.status in (200, 202), (what, answer)
    data = again.doc["data"]
    assert missing_acks(sql, [(data["task_id"], data["execution_id"])]) == []


@dataclass
class Burst:
    """Threads creating tasks as fast as they are answered, each on its own keep-alive connection."""

    port: int
    key: str
    threads: int = 8
    max_requests: int = 20_000  # per thread: a hard bound whatever happens
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    acks: list[tuple[str, str]] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    slowest: float = 0.0

    def __post_init__(self) -> None:
        self._answered = 0
        self._watch: list[tuple[int, int | None, threading.Event]] = []
        self._workers = [threading.Thread(target=self._run, daemon=True) for _ in range(self.threads)]

    def start(self) -> None:
        for t in self._workers:
            t.start()

    def after(self, count: int, status: int | None = None) -> threading.Event:
        """An event set once ``count`` more answers (of ``status``, if given) have arrived."""
        event = threading.Event()
        with self.lock:
            base = self._answered if status is None else self.statuses.get(status, 0)
            self._watch.append((base + count, status, event))
        return event

    def finish(self) -> None:
        self.stop.set()
        for t in self._workers:
            t.join(30)
        assert not any(t.is_alive() for t in self._workers), "burst threads did not stop"

    def _run(self) -> None:
        body = json.dumps(TASK).encode()
        headers = {"content-type": "application/json", "authorization": f"Bearer {self.key}"}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            for _ in range(self.max_requests):
                if self.stop.is_set():
                    return
                start = time.monotonic()
                try:
                    conn.request("POST", "/api/v1/tasks", body=body, headers=headers)
                    resp = conn.getresponse()
                    payload = resp.read()
                except (OSError, http.client.HTTPException) as exc:
                    with self.lock:
                        self.failures.append(f"{type(exc).__name__}: {exc}")
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                    continue
                self._record(resp.status, payload, time.monotonic() - start)
        finally:
            conn.close()

    def _record(self, status: int, payload: bytes, elapsed: float) -> None:
        ack = None
        if status == 202:
            data = json.loads(payload)["data"]
            ack = (data["task_id"], data["execution_id"])
        with self.lock:
            self._answered += 1
            self.statuses[status] = self.statuses.get(status, 0) + 1
            self.slowest = max(self.slowest, elapsed)
            if ack is not None:
                self.acks.append(ack)
            for goal, wanted, event in self._watch:
                have = self._answered if wanted is None else self.statuses.get(wanted, 0)
                if have >= goal:
                    event.set()


def test_no_acknowledgement_is_lost_when_the_database_is_cut_mid_batch(proxy, proxied, pg_dsn, sql):
    org = make_org(pg_dsn)
    burst = Burst(proxied.port, org.key)
    burst.start()
    try:
        for cycle in range(3):
            # Cut while batches are in flight, let the outage be seen, then bring it back
            # and wait until acknowledgements flow again before the next cut.
            assert burst.after(300, 202).wait(30), f"cycle {cycle}: creates not flowing: {burst.statuses}"
            proxy.cut()
            assert burst.after(200, 503).wait(30), f"cycle {cycle}: no 503s after the cut: {burst.statuses}"
            proxy.restore()
        assert burst.after(100, 202).wait(30), f"no recovery after the last cut: {burst.statuses}"
    finally:
        burst.finish()

    assert burst.failures == [], burst.failures[:5]  # the HTTP side never broke
    assert set(burst.statuses) <= {202, 503}, burst.statuses
    assert burst.slowest < 5.0, burst.slowest
    missing = missing_acks(sql, burst.acks)
    assert missing == [], f"{len(missing)} of {len(burst.acks)} acknowledged tasks are not in the database"
    count = sql("SELECT count(*) AS n FROM tasks WHERE organization_id = $1", org.id)[0]["n"]
    assert count >= len(burst.acks)


# -- hostile input -----------------------------------------------------------------------

URL = "https://example.com/hook"
NEST = 5000


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


# (name, raw body, content type or None for no header, query string)
HOSTILE: list[tuple[str, bytes, str | None, str]] = [
    ("array", _json([{"url": URL}]), "application/json", ""),
    ("string", _json(URL), "application/json", ""),
    ("number", b"42", "application/json", ""),
    ("null", b"null", "application/json", ""),
    ("true", b"true", "application/json", ""),
    ("trailing garbage", b'{"url": "%s"} {}' % URL.encode(), "application/json", ""),
    ("truncated", b'{"url": "%s"' % URL.encode(), "application/json", ""),
    ("NaN", b'{"url": "%s", "timeout_ms": NaN}' % URL.encode(), "application/json", ""),
    ("huge integer", b'{"url": "%s", "retry_attempts": %s}' % (URL.encode(), b"9" * 400), "application/json", ""),
    ("infinite float", b'{"url": "%s", "timeout_ms": 1e999}' % URL.encode(), "application/json", ""),
    ("u64 max timeout", b'{"url": "%s", "timeout_ms": 18446744073709551615}' % URL.encode(), "application/json", ""),
    ("i64 min retries", _json({"url": URL, "retry_attempts": -(2**63)}), "application/json", ""),
    ("huge delay seconds", _json({"url": URL, "delay": 2**63 - 1}), "application/json", ""),
    ("huge delay string", _json({"url": URL, "delay": "9" * 30 + "d"}), "application/json", ""),
    ("delay just past year 9999", _json({"url": URL, "delay": "3000000d"}), "application/json", ""),
    ("float delay", _json({"url": URL, "delay": 1e308}), "application/json", ""),
    ("negative delay", _json({"url": URL, "delay": -5}), "application/json", ""),
    ("run_at year 0", _json({"url": URL, "run_at": "0000-01-01T00:00:00Z"}), "application/json", ""),
    ("run_at month 13", _json({"url": URL, "run_at": "2030-13-01T00:00:00Z"}), "application/json", ""),
    ("run_at number", _json({"url": URL, "run_at": 1e300}), "application/json", ""),
    ("deep array", b"[" * NEST + b"]" * NEST, "application/json", ""),
    ("deep object", b'{"a":' * NEST + b"1" + b"}" * NEST, "application/json", ""),
    ("deep task wrapper", b'{"task":' * 900 + b"{}" + b"}" * 900, "application/json", ""),
    ("nested headers", _json({"url": URL, "headers": {"X-A": {"b": {"c": {"d": [1, [2, [3]]]}}}}}), "application/json", ""),
    ("nested body", _json({"url": URL, "body": {"a": [[[[[[[[[[]]]]]]]]]]}}), "application/json", ""),
    ("invalid UTF-8 in url", b'{"url": "https://example.com/\xff\xfe"}', "application/json", ""),
    ("invalid UTF-8 in key", b'{"\xc3\x28": 1, "url": "%s"}' % URL.encode(), "application/json", ""),
    ("lone surrogate", b'{"url": "%s", "name": "\\ud800"}' % URL.encode(), "application/json", ""),
    ("overlong UTF-8 NUL", b'{"url": "%s", "body": "a\xc0\x80b"}' % URL.encode(), "application/json", ""),
    ("NUL in url", _json({"url": URL + "\u0000"}), "application/json", ""),
    ("NUL in name", _json({"url": URL, "name": "a\u0000b"}), "application/json", ""),
    ("NUL in body", _json({"url": URL, "body": "\u0000"}), "application/json", ""),
    ("NUL in header value", _json({"url": URL, "headers": {"X-A": "a\u0000"}}), "application/json", ""),
    ("NUL in header name", _json({"url": URL, "headers": {"X-\u0000": "a"}}), "application/json", ""),
    ("NUL in queue", _json({"url": URL, "queue": "q\u0000"}), "application/json", ""),
    ("NUL in pattern", _json({"url": URL, "expected_body_pattern": "\u0000"}), "application/json", ""),
    ("CRLF in header value", _json({"url": URL, "headers": {"X-A": "a\r\nX-Evil: 1"}}), "application/json", ""),
    ("url of 10k chars", _json({"url": "https://example.com/" + "a" * 10_000}), "application/json", ""),
    ("url not http", _json({"url": "javascript:alert(1)"}), "application/json", ""),
    ("url no host", _json({"url": "https://"}), "application/json", ""),
    ("url a number", _json({"url": 12345}), "application/json", ""),
    ("url a list", _json({"url": [URL]}), "application/json", ""),
    ("name of 10k chars", _json({"url": URL, "name": "n" * 10_000}), "application/json", ""),
    ("body over the field limit", _json({"url": URL, "body": "b" * 300_000}), "application/json", ""),
    ("header value an object", _json({"url": URL, "headers": {"X-A": {"v": 1}}}), "application/json", ""),
    ("header value a list", _json({"url": URL, "headers": {"X-A": ["1", "2"]}}), "application/json", ""),
    ("headers a list", _json({"url": URL, "headers": [["X-A", "1"]]}), "application/json", ""),
    ("headers a string", _json({"url": URL, "headers": "X-A: 1"}), "application/json", ""),
    ("header name not a token", _json({"url": URL, "headers": {"X A(": "1"}}), "application/json", ""),
    ("method unknown", _json({"url": URL, "method": "BREW"}), "application/json", ""),
    ("method a number", _json({"url": URL, "method": 1}), "application/json", ""),
    ("timeout a string", _json({"url": URL, "timeout_ms": "fast"}), "application/json", ""),
    ("retries a float", _json({"url": URL, "retry_attempts": 1.5}), "application/json", ""),
    ("bad cron", _json({"url": URL, "cron": "* * * * * * * *"}), "application/json", ""),
    ("cron a number", _json({"url": URL, "cron": 5}), "application/json", ""),
    ("status codes junk", _json({"url": URL, "expected_status_codes": "2xx,abc,-1"}), "application/json", ""),
    ("callback not a url", _json({"url": URL, "callback_url": "ftp://x"}), "application/json", ""),
    ("query: invalid UTF-8 url", b"{}", "application/json", "url=%FF%FE"),
    ("query: url not http", b"{}", "application/json", "url=gopher%3A%2F%2Fx"),
    ("query: url list", b"{}", "application/json", "url[]=https%3A%2F%2Fa.io&url[]=https%3A%2F%2Fb.io"),
    ("query: deep brackets", b"{}", "application/json", "task" + "[a]" * 500 + "=1"),
    ("query: bad retries", b"{}", "application/json", "url=https%3A%2F%2Fa.io&retry_attempts=" + "9" * 100),
    ("query: NUL", b"{}", "application/json", "url=https%3A%2F%2Fa.io%00"),
    ("query: huge delay", b"{}", "application/json", "url=https%3A%2F%2Fa.io&delay=" + "9" * 50 + "s"),
    ("text/plain JSON", _json({"url": URL}), "text/plain", ""),
    ("xml", b"<task><url>https://example.com</url></task>", "application/xml", ""),
    ("multipart", b"--x\r\nContent-Disposition: form-data; name=\"url\"\r\n\r\n%s\r\n--x--\r\n" % URL.encode(),
     "multipart/form-data; boundary=x", ""),
    ("form with invalid UTF-8", b"url=https%3A%2F%2Fa.io%2F\xff", "application/x-www-form-urlencoded", ""),
    ("form with bad url", b"url=notaurl", "application/x-www-form-urlencoded", ""),
    ("JSON in UTF-16", json.dumps({"url": URL}).encode("utf-16"), "application/json; charset=utf-16", ""),
    ("JSON with BOM", b"\xef\xbb\xbf" + _json({"url": URL, "method": "NOPE"}), "application/json", ""),
    ("vendor JSON array", _json([URL]), "application/vnd.api+json", ""),
    ("empty body", b"", "application/json", ""),
    ("empty body, no type", b"", None, ""),
    ("whitespace body", b"   \r\n\t ", "application/json", ""),
    ("empty object", b"{}", "application/json", ""),
    ("binary junk", bytes(range(256)) * 4, "application/octet-stream", ""),
    ("binary junk as JSON", bytes(range(256)) * 4, "application/json", ""),
]


def test_hostile_create_input_gets_4xx_and_creates_nothing(server, pg_dsn, sql):
    org = make_org(pg_dsn)
    problems = []
    for name, raw, content_type, query in HOSTILE:
        headers = {"authorization": f"Bearer {org.key}"}
        if content_type is not None:
            headers["content-type"] = content_type
        path = "/api/v1/tasks" + ("?" + query if query else "")
        answer = call(server.port, "POST", path, raw=raw, headers=headers)
        ok = (
            answer.status is not None and 400 <= answer.status < 500
            and isinstance(answer.doc, dict) and ("error" in answer.doc or "errors" in answer.doc)
        )
        if not ok:
            problems.append((name, answer))
    assert problems == []
    assert sql("SELECT count(*) AS n FROM tasks WHERE organization_id = $1", org.id)[0]["n"] == 0
    # The server is still fine, and the same key still creates.
    good = call(server.port, "POST", "/api/v1/tasks", key=org.key, body={"url": URL})
    assert good.status == 202, good


# -- a database that stops answering (no reset, no refusal: just silence) ----------------


class NotPrompt(AssertionError):
    """A request that needed the silent database was not answered by a prompt 503."""


def test_silent_database_answers_503_instead_of_hanging(proxy, proxied, pg_dsn):
    org = make_org(pg_dsn)
    port = proxied.port
    first = call(port, "POST", "/api/v1/tasks", key=org.key, body=TASK)
    assert first.status == 202, first
    assert call(port, "GET", "/api/v1/tasks", key=org.key).status == 200
    proxy.stall()
    try:
        requests = {
            "create": {"method": "POST", "path": "/api/v1/tasks", "key": org.key, "body": TASK},
            "list": {"method": "GET", "path": "/api/v1/tasks", "key": org.key},
            "health": {"method": "GET", "path": "/health"},
        }
        answers: dict[str, Answer] = {}

        def send(what: str) -> None:
            answers[what] = call(port, timeout=8, **requests[what])

        threads = [threading.Thread(target=send, args=(what,)) for what in requests]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert set(answers) == set(requests)
        slow = {what: a for what, a in answers.items()
                if a.status != 503 or a.elapsed > 5.0 or not a.headers.get("retry-after", "").isdigit()}
        if slow:
            raise NotPrompt(f"not a prompt 503 while the database is silent: {slow}")
    finally:
        proxy.restore()
