"""``POST /api/v1/tasks`` with a ``cron`` key (upstream-api §1.5.1): validate, insert, 201.

Cron creates are rare next to one-time creates and need the organisation's tier and
a JSON rendering of the stored row, so they skip the insert batcher and run one
statement (``create_cron_task``) on a pool connection.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from runlater.core.ids import uuid7
from runlater.db.errors import DatabaseUnavailable
from runlater.db.pool import Database
from runlater.db.queries import Q
from runlater.http import validation
from runlater.http.auth import AuthContext
from runlater.http.errors import ApiError
from runlater.http.messages import Response, error_response

CREATED_MESSAGE = b',"message":"Cron task created"}'


def wants_cron(params: dict[str, Any]) -> bool:
    """Whether a create is a cron create: ``cron`` is present, not null and not false
    (``""`` and ``0`` count as present, §1.5)."""
    value = params.get("cron")
    return value is not None and value is not False


async def create_cron_task(db: Database, ctx: AuthContext, params: dict[str, Any], now: datetime) -> Response:
    """Create the cron task ``params`` describes for ``ctx``'s organisation.

    ``201 {"data": Task, "message": "Cron task created"}``, or the validation error's
    422, or 503 when the database is unavailable. Never raises for either.
    """
    try:
        new = validation.parse_cron_create(params, now, ctx.tier)
        doc = await db.fetchval(
            Q.create_cron_task,
            uuid7(), ctx.organization_id, new.name, new.url, new.method, new.headers_json.decode(),
            new.body, new.cron_expression, new.timezone, new.interval_minutes, new.enabled,
            new.timeout_ms, new.retry_attempts, new.next_run_at, new.callback_url,
            new.expected_status_codes, new.expected_body_pattern, new.queue,
            new.notify_on_failure, new.notify_on_recovery, new.on_failure_url, new.on_recovery_url,
        )
    except DatabaseUnavailable as exc:
        return error_response(503, "service_unavailable", "Server is busy, please retry",
                              [(b"retry-after", str(exc.retry_after).encode())])
    except ApiError as exc:
        return exc.response()
    return Response(201, b'{"data":' + doc.encode() + CREATED_MESSAGE)
