"""The task API handlers and their routing table.

Handlers return a ``Response`` (synchronous paths: errors, cached auth failures), a
future resolving to one (task creation: the request waits on the insert batcher with
no task of its own), or a coroutine (reads and other mutations).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import datetime, timezone
from typing import Any

import orjson

from runlater.core.ids import parse_uuid, uuid7
from runlater.db.batcher import InsertBatcher
from runlater.db.errors import DatabaseUnavailable
from runlater.db.pool import Database
from runlater.db.queries import Q
from runlater.http import validation
from runlater.http.auth import AuthContext, Authenticator, Unauthorized
from runlater.http.errors import ApiError
from runlater.http.messages import Request, Response, error_response
from runlater.http.router import Router

log = logging.getLogger("runlater.api")

UNAUTHORIZED = error_response(401, "unauthorized", "Invalid or missing API key")
NOT_FOUND = error_response(404, "not_found", "Resource not found")
ROUTE_NOT_FOUND = Response(404, b'{"errors":{"detail":"Not Found"}}')
BAD_REQUEST = Response(400, b'{"errors":{"detail":"Bad Request"}}')
HEALTH_OK = Response(200, b'{"status":"ok","database":"connected"}')
HEALTH_DOWN = Response(503, b'{"status":"error","database":"disconnected"}', [(b"retry-after", b"1")])


def unavailable(retry_after: int = 1) -> Response:
    return error_response(
        503, "service_unavailable", "Server is busy, please retry",
        [(b"retry-after", str(retry_after).encode())],
    )


def _fmt(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ")


def _error_for(exc: BaseException) -> Response:
    if isinstance(exc, DatabaseUnavailable):
        return unavailable(exc.retry_after)
    if isinstance(exc, ApiError):
        return exc.response()
    log.error("request failed", exc_info=exc)
    return Response(500, b'{"errors":{"detail":"Internal Server Error"}}')


def once_columns(rows: list[tuple[uuid.UUID, uuid.UUID, uuid.UUID, Any]]) -> tuple[list[Any], ...]:
    """One list per parameter of ``create_once_batch``, in its order."""
    tasks = [r[3] for r in rows]
    return (
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        [t.name for t in tasks],
        [t.url for t in tasks],
        [t.method for t in tasks],
        [t.headers_json.decode() for t in tasks],
        [t.body for t in tasks],
        [t.scheduled_at for t in tasks],
        [t.timeout_ms for t in tasks],
        [t.retry_attempts for t in tasks],
        [t.callback_url for t in tasks],
        [t.expected_status_codes for t in tasks],
        [t.expected_body_pattern for t in tasks],
        [t.queue for t in tasks],
        [t.notify_on_failure for t in tasks],
        [t.notify_on_recovery for t in tasks],
        [t.on_failure_url for t in tasks],
        [t.on_recovery_url for t in tasks],
    )


class Api:
    def __init__(self, db: Database, auth: Authenticator, batcher: InsertBatcher) -> None:
        self.db = db
        self.auth = auth
        self.batcher = batcher
        self.router = Router()
        r = self.router
        r.add("GET", "/health", self.health)
        r.add("GET", "/api/v1/tasks", self.authenticated(self.list_tasks))
        r.add("POST", "/api/v1/tasks", self.create_task)
        r.add("GET", "/api/v1/tasks/{id}", self.authenticated(self.show_task))
        r.add("DELETE", "/api/v1/tasks/{id}", self.authenticated(self.delete_task))
        r.add("POST", "/api/v1/tasks/{id}/trigger", self.authenticated(self.trigger_task))
        r.add("GET", "/api/v1/tasks/{id}/executions", self.authenticated(self.list_executions))

    # -- dispatch ---------------------------------------------------------------------

    def handle(self, req: Request) -> Any:
        found = self.router.match(req.method, req.path)
        if found is None:
            return ROUTE_NOT_FOUND
        handler, req.route_params = found
        try:
            return handler(req)
        except Exception as exc:  # noqa: BLE001 - mapped to a response
            return _error_for(exc)

    def authenticated(self, handler: Any) -> Any:
        """Wrap an async handler: authenticate (cache first), then run it."""

        async def run(req: Request, ctx: AuthContext | None) -> Response:
            try:
                if ctx is None:
                    ctx = await self.auth.authenticate(req.headers.get("authorization"))
                return await handler(req, ctx)
            except Unauthorized as exc:
                return self._unauthorized(req, exc)
            except Exception as exc:  # noqa: BLE001
                return _error_for(exc)

        def entry(req: Request) -> Any:
            try:
                ctx = self.auth.cached(req.headers.get("authorization"))
            except Unauthorized as exc:
                return self._unauthorized(req, exc)
            return run(req, ctx)

        return entry

    def _unauthorized(self, req: Request, exc: Unauthorized) -> Response:
        log.warning("unauthorized: key=%s reason=%s client=%s path=%s",
                    exc.key_id or "none", exc.reason, req.client, req.path)
        return UNAUTHORIZED

    # -- handlers ---------------------------------------------------------------------

    def health(self, req: Request) -> Any:
        if self.db.down:
            return HEALTH_DOWN
        return self._health()

    async def _health(self) -> Response:
        try:
            await self.db.fetchval("SELECT 1")
        except Exception:  # noqa: BLE001
            return HEALTH_DOWN
        return HEALTH_OK

    def create_task(self, req: Request) -> Any:
        """POST /api/v1/tasks. The hot path: no coroutine when the key is cached."""
        try:
            ctx = self.auth.cached(req.headers.get("authorization"))
        except Unauthorized as exc:
            return self._unauthorized(req, exc)
        if ctx is None:
            return self._create_after_auth(req)
        return self._create(req, ctx)

    async def _create_after_auth(self, req: Request) -> Response:
        try:
            ctx = await self.auth.authenticate(req.headers.get("authorization"))
        except Unauthorized as exc:
            return self._unauthorized(req, exc)
        except Exception as exc:  # noqa: BLE001
            return _error_for(exc)
        result = self._create(req, ctx)
        if isinstance(result, Response):
            return result
        return await result

    def _create(self, req: Request, ctx: AuthContext) -> Response | asyncio.Future[Response]:
        try:
            params = validation.merge_params(
                req.query, validation.decode_json_body(req.body, req.headers.get("content-type"))
            )
            new = validation.parse_create(params, datetime.now(timezone.utc))
            task_id = uuid7()
            execution_id = uuid7()
            body = orjson.dumps({
                "data": {
                    "task_id": str(task_id),
                    "execution_id": str(execution_id),
                    "status": "pending",
                    "scheduled_for": _fmt(new.scheduled_at),
                },
                "message": "Task queued for execution",
            })
            return self.batcher.submit((task_id, execution_id, ctx.organization_id, new), Response(202, body))
        except Exception as exc:  # noqa: BLE001
            return _error_for(exc)

    async def list_tasks(self, req: Request, ctx: AuthContext) -> Response:
        limit, offset, queue, queue_given = validation.parse_list_params(req.query)
        row = await self.db.fetchrow(Q.list_tasks, ctx.organization_id, limit, queue or "", queue_given, offset)
        body = b"".join((
            b'{"data":', row["data"].encode(),
            b',"has_more":', b"true" if row["has_more"] else b"false",
            b',"limit":', str(limit).encode(), b',"offset":', str(offset).encode(), b"}",
        ))
        return Response(200, body)

    def _task_id(self, req: Request) -> uuid.UUID:
        task_id = parse_uuid(req.route_params[0])
        if task_id is None:
            raise _BadId()
        return task_id

    async def show_task(self, req: Request, ctx: AuthContext) -> Response:
        task_id = self._task_id(req)
        doc = await self.db.fetchval(Q.get_task, task_id, ctx.organization_id)
        if doc is None:
            return NOT_FOUND
        return Response(200, b'{"data":' + doc.encode() + b"}")

    async def delete_task(self, req: Request, ctx: AuthContext) -> Response:
        task_id = self._task_id(req)
        deleted = await self.db.fetchval(Q.delete_task, task_id, ctx.organization_id)
        return NOT_FOUND if deleted is None else Response(204)

    async def trigger_task(self, req: Request, ctx: AuthContext) -> Response:
        task_id = self._task_id(req)
        row = await self.db.fetchrow(Q.trigger_task, task_id, ctx.organization_id, uuid7())
        if row is None:
            return NOT_FOUND
        return Response(202, orjson.dumps({
            "data": {"execution_id": str(row["id"]), "status": "pending", "scheduled_for": row["scheduled_for"]},
            "message": "Task triggered successfully",
        }))

    async def list_executions(self, req: Request, ctx: AuthContext) -> Response:
        task_id = self._task_id(req)
        limit = validation.parse_executions_limit(req.query)
        doc = await self.db.fetchval(Q.list_executions, task_id, ctx.organization_id, limit)
        if doc is None:
            return NOT_FOUND
        return Response(200, b'{"data":' + doc.encode() + b"}")


class _BadId(ApiError):
    """A path id that is not a UUID: upstream answers 400, not 404."""

    def __init__(self) -> None:
        Exception.__init__(self, "bad id")
        self.status = 400

    def response(self) -> Response:
        return BAD_REQUEST
