"""Microbenchmarks of create-request validation, the per-request CPU cost of the hot path.

Run:
    .venv/bin/pytest bench/micro/test_validation_bench.py -p no:cacheprovider --benchmark-enable

The bodies are what the seed's load test sends: an immediate create (70% of its mix) and
a delayed create (15%). ``now`` is fixed within a run, as it is for every request landing
in the same second, so the per-second clock cache in ``validation`` is warm, as in
steady traffic.
"""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from runlater.http import validation

IMMEDIATE_BODY = orjson.dumps({
    "url": "https://example.com/webhooks/runlater",
    "method": "POST",
    "headers": {"Content-Type": "application/json"},
    "body": orjson.dumps({"event": "order.created", "order_id": 12345}).decode(),
})
DELAYED_BODY = orjson.dumps({**orjson.loads(IMMEDIATE_BODY), "delay": "5m"})
NOW = datetime.now(UTC)

# Each round times many calls: a single call (a few µs) is too close to the timer's own
# cost and resolution to be measured alone.
ITERATIONS = 2000
ROUNDS = 50


def measure(benchmark, fn, *args):
    return benchmark.pedantic(fn, args, iterations=ITERATIONS, rounds=ROUNDS, warmup_rounds=2)


def _params(raw: bytes) -> dict:
    return validation.merge_params("", validation.decode_json_body(raw, "application/json"))


@pytest.mark.benchmark(group="parse_create")
def test_parse_create_immediate(benchmark):
    params = _params(IMMEDIATE_BODY)
    task = measure(benchmark, validation.parse_create, params, NOW)
    assert task.url == "https://example.com/webhooks/runlater"


@pytest.mark.benchmark(group="parse_create")
def test_parse_create_delayed(benchmark):
    params = _params(DELAYED_BODY)
    task = measure(benchmark, validation.parse_create, params, NOW)
    assert task.scheduled_at > NOW


@pytest.mark.benchmark(group="parse_create")
def test_parse_create_url_only(benchmark):
    params = {"url": "https://example.com/webhooks/runlater"}
    task = measure(benchmark, validation.parse_create, params, NOW)
    assert task.method == "POST"


@pytest.mark.benchmark(group="request")
def test_decode_merge_parse_immediate(benchmark):
    """Everything the create handler does with the input: body bytes → NewTask."""

    def run() -> validation.NewTask:
        params = validation.merge_params("", validation.decode_json_body(IMMEDIATE_BODY, "application/json"))
        return validation.parse_create(params, datetime.now(UTC))

    assert measure(benchmark, run).body is not None


@pytest.mark.benchmark(group="request")
def test_parse_list_params(benchmark):
    assert measure(benchmark, validation.parse_list_params, "limit=20&offset=40") == (20, 40, None, False)
