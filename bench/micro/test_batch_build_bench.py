"""Cost of turning a batch of validated creates into the insert's column arrays.

Run:  .venv/bin/pytest bench/micro/test_batch_build_bench.py -p no:cacheprovider --benchmark-enable

``runlater.http.api.once_columns`` runs once per group-commit statement, over every row of the
batch; 500 rows is the batcher's largest batch (``RUNLATER_BATCH_MAX_ROWS``). The per-row cost
is the figure to compare with the rest of the create path (divide by ``rows`` in extra_info).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import orjson
import pytest

from runlater.core.ids import uuid7_str
from runlater.http import validation
from runlater.http.api import once_columns

ROWS = 500
ORG = uuid.UUID("01930a5e-0000-7000-8000-000000000001")
BODIES = [
    {"url": "http://127.0.0.1:9999/hook", "method": "GET", "retry_attempts": 1, "timeout_ms": 10000},
    {"url": "http://127.0.0.1:9999/hook", "method": "POST", "body": "{}", "delay": "5s"},
]


def _batch(n: int) -> list[tuple]:
    now = datetime.now(UTC)
    rows = []
    for i in range(n):
        params = validation.merge_params("", validation.decode_json_body(orjson.dumps(BODIES[i % 7 == 3]),
                                                                         "application/json"))
        rows.append((uuid7_str(), uuid7_str(), ORG, validation.parse_create(params, now)))
    return rows


@pytest.mark.benchmark(group="batch")
def test_once_columns_500(benchmark):
    rows = _batch(ROWS)
    benchmark.extra_info["rows"] = ROWS
    columns = benchmark.pedantic(once_columns, (rows,), iterations=20, rounds=50, warmup_rounds=2)
    assert all(len(c) == ROWS for c in columns)
