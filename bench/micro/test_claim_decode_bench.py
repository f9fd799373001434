"""Cost of what an executor does with claimed rows before it sends anything.

Run:  .venv/bin/pytest bench/micro/test_claim_decode_bench.py -p no:cacheprovider --benchmark-enable

* ``fetch_500_claim_rows``: asyncpg fetching and decoding 500 rows with exactly the column
  types ``claim_due`` returns (uuids, timestamps, texts, ints, booleans), from a prepared
  statement over ``generate_series`` — the decode plus one round trip, without the claim's
  locking and updates. Needs PostgreSQL: ``DATABASE_URL``, else 127.0.0.1:5432; skipped when
  neither answers.
* ``delivery_headers``: ``executor.build_headers`` for one claimed row (task headers, ids,
  the upstream signature and the Standard Webhooks signature), done once per delivery.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from datetime import UTC, datetime

import pytest

from runlater.workers.executor import build_headers

CLAIM_SHAPED = """
SELECT gen_random_uuid() AS id, gen_random_uuid() AS task_id, gen_random_uuid() AS organization_id,
       1 AS attempt, now() AS scheduled_for, clock_timestamp() AS started_at, NULL::text AS callback_url,
       NULL::text AS queue, 'http://127.0.0.1:9999/hook?delay=100' AS url, 'GET' AS method,
       '{}'::text AS headers, NULL::text AS body, 10000 AS timeout_ms, 1 AS retry_attempts,
       'once' AS schedule_type, NULL::text AS expected_status_codes, NULL::text AS expected_body_pattern,
       'Task ' || i AS name, NULL::text AS task_callback_url, NULL::text AS last_execution_status,
       NULL::boolean AS notify_on_failure, NULL::boolean AS notify_on_recovery, NULL::text AS on_failure_url,
       NULL::text AS on_recovery_url, 'whsec_0123456789abcdef0123456789abcdef' AS webhook_secret,
       NULL::text AS webhook_secret_previous
FROM generate_series(1, $1) AS i
"""


@pytest.fixture(scope="module")
def pg():
    import asyncpg

    dsn = os.environ.get("DATABASE_URL") or "postgresql://postgres@127.0.0.1:5432/postgres"
    loop = asyncio.new_event_loop()
    try:
        conn = loop.run_until_complete(asyncpg.connect(dsn, timeout=3))
    except Exception as exc:  # noqa: BLE001
        loop.close()
        pytest.skip(f"no PostgreSQL at {dsn}: {exc}")
    stmt = loop.run_until_complete(conn.prepare(CLAIM_SHAPED))
    yield loop, stmt
    loop.run_until_complete(conn.close())
    loop.close()


@pytest.mark.benchmark(group="claim")
def test_fetch_500_claim_rows(benchmark, pg):
    loop, stmt = pg
    benchmark.extra_info["rows"] = 500
    rows = benchmark.pedantic(lambda: loop.run_until_complete(stmt.fetch(500)), iterations=5, rounds=30,
                              warmup_rounds=2)
    assert len(rows) == 500


@pytest.mark.benchmark(group="claim")
def test_delivery_headers(benchmark):
    row = {"id": uuid.uuid4(), "task_id": uuid.uuid4(), "headers": '{"x-trace": "abc", "n": 1}',
           "webhook_secret": "whsec_0123456789abcdef0123456789abcdef", "webhook_secret_previous": None,
           "started_at": datetime.now(UTC)}
    headers = benchmark.pedantic(build_headers, (row, b""), iterations=500, rounds=50, warmup_rounds=2)
    assert any(name == "x-runlater-signature" for name, _ in headers)
