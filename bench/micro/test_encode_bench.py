"""Per-response cost of building the answer bytes: the create's 202 and a list page.

Run:  .venv/bin/pytest bench/micro/test_encode_bench.py -p no:cacheprovider --benchmark-enable

* ``create_202_body``: what ``Api.create_task`` does to answer: two text UUIDv7s, the
  scheduled time, and ``orjson.dumps`` of the answer document.
* ``encode_202``: ``protocol.encode_response`` of that answer (status line, headers, body).
* ``encode_list_page``: the list answer assembled around PostgreSQL's JSON text (20 tasks),
  then encoded.
Each round times many calls (a single call is a few µs, too close to the timer's resolution).
"""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from runlater.core.ids import uuid7_str
from runlater.http.messages import Response
from runlater.http.protocol import encode_response

ITERATIONS = 2000
ROUNDS = 50
DATE = b"date: Fri, 27 Nov 2026 04:00:00 GMT\r\n"
KEEP_ALIVE = 2  # index into the protocol's connection-header table: "connection: keep-alive"
NOW = datetime.now(UTC)

TASK_DOC = {
    "id": "01930a5e-8c1f-7d4e-9a6b-3f2e1d0c9b8a", "name": "Task 01930a5e", "url": "https://example.com/hook",
    "method": "GET", "headers": {}, "body": None, "schedule_type": "once", "cron_expression": None,
    "scheduled_at": "2026-11-27T04:00:00Z", "enabled": True, "timeout_ms": 10000, "retry_attempts": 1,
    "expected_status_codes": None, "expected_body_pattern": None, "queue": None, "notify_on_failure": None,
    "notify_on_recovery": None, "on_failure_url": None, "on_recovery_url": None, "next_run_at": None,
    "inserted_at": "2026-11-27T04:00:00Z", "updated_at": "2026-11-27T04:00:00Z",
}
PAGE_TEXT = orjson.dumps([TASK_DOC] * 20).decode()  # PostgreSQL hands the page over as text


def measure(benchmark, fn, *args):
    return benchmark.pedantic(fn, args, iterations=ITERATIONS, rounds=ROUNDS, warmup_rounds=2)


def create_body() -> bytes:
    return orjson.dumps({
        "data": {
            "task_id": uuid7_str(),
            "execution_id": uuid7_str(),
            "status": "pending",
            "scheduled_for": NOW.strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        "message": "Task queued for execution",
    })


@pytest.mark.benchmark(group="encode")
def test_create_202_body(benchmark):
    assert b'"status":"pending"' in measure(benchmark, create_body)


@pytest.mark.benchmark(group="encode")
def test_encode_202(benchmark):
    resp = Response(202, create_body())
    wire = measure(benchmark, encode_response, resp, KEEP_ALIVE, False, DATE)
    assert wire.startswith(b"HTTP/1.1 202")


@pytest.mark.benchmark(group="encode")
def test_encode_list_page(benchmark):
    def run() -> bytes:
        body = b"".join((b'{"data":', PAGE_TEXT.encode(), b',"has_more":', b"true",
                         b',"limit":', b"20", b',"offset":', b"0", b"}"))
        return encode_response(Response(200, body), KEEP_ALIVE, False, DATE)

    assert measure(benchmark, run).startswith(b"HTTP/1.1 200")
