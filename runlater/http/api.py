"""The task API handlers and their routing table.

Handlers return a ``Response`` (synchronous paths: errors, cached auth failures), a
future resolving to one (task creation: the request waits on the insert batcher with
no task of its own), or a coroutine (reads and other mutations).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import orjson

from runlater.core.clock import iso_seconds
from runlater.core.ids import parse_uuid, uuid7, uuid7_str
from runlater.db.batcher import InsertBatcher
from runlater.db.errors import DatabaseUnavailable, Overloaded
from runlater.db.pool import Database
from runlater.db.queries import Q
from runlater.http import cron_api, mutations, openapi, schemas, validation
from runlater.http.auth import AuthContext, Authenticator, Unauthorized
from runlater.http.errors import ApiError, BadRequest
from runlater.http.messages import Request, Response, error_response
from runlater.http.openapi import Answer, operation, query
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


@lru_cache(maxsize=4096)
def _fmt(ts: datetime) -> str:
    # Creates in the same second share their scheduled time: format each once.
    return iso_seconds(ts)


def _error_for(exc: BaseException) -> Response:
    if isinstance(exc, DatabaseUnavailable):
        return unavailable(exc.retry_after)
    if isinstance(exc, ApiError):
        return exc.response()
    log.error("request failed", exc_info=exc)
    return Response(500, b'{"errors":{"detail":"Internal Server Error"}}')


def once_columns(rows: list[tuple[Any, Any, uuid.UUID, Any]]) -> tuple[list[Any], ...]:
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


class Guard:
    """Admission checks run before a handler: rate limits and quotas.

    ``admit`` returns a response to send instead of running the handler (e.g. 429), or
    None. ``ctx`` is None on unauthenticated routes (limits then key on the client IP).
    This base class admits everything; ``runlater.http.limits`` provides the real one.
    """

    def admit(self, req: Request, ctx: AuthContext | None) -> Response | None:
        return None

    def admit_executions(self, ctx: AuthContext, count: int) -> None:
        """Raise an ApiError when ``count`` more executions would break a monthly limit."""


class Idempotency:
    """Replays and in-flight protection for ``Idempotency-Key``; this base does nothing."""

    def applies(self, req: Request) -> bool:
        return False

    async def run(self, req: Request, ctx: AuthContext, call: Callable[[], Any]) -> Response:
        return await resolve(call())


async def resolve(result: Any) -> Response:
    """Turn a handler result (Response, future or coroutine) into a Response."""
    if isinstance(result, Response):
        return result
    return await result


class Api:
    def __init__(self, db: Database, auth: Authenticator, batcher: InsertBatcher, *,
                 guard: Guard | None = None, idempotency: Idempotency | None = None) -> None:
        self.db = db
        self.auth = auth
        self.batcher = batcher
        self.guard = guard or Guard()
        self._health_check: asyncio.Future[Response] | None = None
        self.idempotency = idempotency or Idempotency()
        self.router = Router()
        # (method, pattern) → (handler, authenticated), as registered: the OpenAPI document's input.
        self.registered: dict[tuple[str, str], tuple[Callable[..., Any], bool]] = {}
        self.route("GET", "/health", self.health, authenticated=False)
        self.route("GET", "/api/v1/tasks", self.list_tasks)
        self.route("POST", "/api/v1/tasks", self.create_task)
        self.route("GET", "/api/v1/tasks/{id}", self.show_task)
        self.route("DELETE", "/api/v1/tasks/{id}", self.delete_task)
        self.route("POST", "/api/v1/tasks/{id}/trigger", self.trigger_task)
        self.route("GET", "/api/v1/tasks/{id}/executions", self.list_executions)
        mutations.register(self)
        # Last: the document describes every route registered before it is built.
        self.docs = openapi.Docs()
        self.route("GET", "/api/v1/openapi", self.docs.serve_document, authenticated=False)
        self.route("GET", "/api/v1/docs", self.docs.serve_page, authenticated=False)
        self.docs.build(self)

    def route(self, method: str, pattern: str, handler: Callable[..., Any], *, authenticated: bool = True) -> None:
        """Register a handler. Authenticated handlers take (request, ctx); others (request).

        Handlers return a Response, a future resolving to one, or a coroutine.
        """
        self.router.add(method, pattern, self._authenticated(handler) if authenticated else self._public(handler))
        self.registered[(method, pattern)] = (handler, authenticated)

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

    def _public(self, handler: Callable[..., Any]) -> Callable[[Request], Any]:
        def entry(req: Request) -> Any:
            refused = self.guard.admit(req, None)
            if refused is not None:
                return refused
            return handler(req)

        return entry

    def _authenticated(self, handler: Callable[..., Any]) -> Callable[[Request], Any]:
        """Authenticate (shared cache first, no coroutine on a hit), admit, then run.

        The common case — a cached key, no Idempotency-Key — calls the handler directly,
        so a synchronous handler (create) answers without any task of its own.
        """

        def run(req: Request, ctx: AuthContext) -> Any:
            refused = self.guard.admit(req, ctx)
            if refused is not None:
                return refused
            if self.idempotency.applies(req):
                return self._guarded(self.idempotency.run(req, ctx, lambda: handler(req, ctx)))
            return handler(req, ctx)

        async def after_lookup(req: Request) -> Response:
            try:
                ctx = await self.auth.authenticate(req.headers.get("authorization"))
                return await resolve(run(req, ctx))
            except Unauthorized as exc:
                return self._unauthorized(req, exc)
            except Exception as exc:  # noqa: BLE001
                return _error_for(exc)

        def entry(req: Request) -> Any:
            try:
                ctx = self.auth.cached(req.headers.get("authorization"))
            except Unauthorized as exc:
                return self._unauthorized(req, exc)
            if ctx is None:
                return after_lookup(req)
            result = run(req, ctx)
            if isinstance(result, (Response, asyncio.Future)):
                return result
            return self._guarded(result)

        return entry

    @staticmethod
    async def _guarded(coro: Any) -> Response:
        try:
            return await coro
        except Exception as exc:  # noqa: BLE001
            return _error_for(exc)

    def _unauthorized(self, req: Request, exc: Unauthorized) -> Response:
        log.warning("unauthorized: key=%s reason=%s client=%s path=%s",
                    exc.key_id or "none", exc.reason, req.client, req.path)
        return UNAUTHORIZED

    # -- handlers ---------------------------------------------------------------------

    @operation(
        summary="Health check",
        tags=["Service"],
        description="Whether this server process reaches its database. Needs no API key.",
        responses={
            200: Answer("The database answers.", schemas.Health),
            503: Answer("The database does not answer.", {"oneOf": [schemas.Health, schemas.FrameworkError]},
                        ("Retry-After",)),
        },
    )
    def health(self, req: Request) -> Any:
        """GET /health: does the database answer this process right now?

        Concurrent checks share one ``SELECT 1`` (a load balancer polling hard costs one
        query per round trip, not one per request), and no answer outlives its check: a
        cached "ok" would keep reporting a database that went away a moment ago. A busy
        pool means "connected, busy", which is healthy. A silent database is caught by the
        pool's query watchdog and reported as disconnected.
        """
        if self.db.down:
            return HEALTH_DOWN
        if self._health_check is None or self._health_check.done():
            self._health_check = asyncio.ensure_future(self._check_health())
        return asyncio.shield(self._health_check)

    async def _check_health(self) -> Response:
        try:
            await self.db.fetchval("SELECT 1")
            return HEALTH_OK
        except Overloaded:
            # Busy is healthy; busy because nothing comes back is not.
            return HEALTH_DOWN if self.db.stalled(1.0) else HEALTH_OK
        except Exception:  # noqa: BLE001
            return HEALTH_DOWN

    @operation(
        summary="Create a task",
        tags=["Tasks"],
        description=(
            "With `cron`: a recurring task (201). Otherwise a one-time task (202) that runs after "
            "`delay`, else at `run_at`, else at once; its first execution is committed with it. "
            "Fields may also be given in the query string."
        ),
        request=schemas.TaskCreate,
        responses={
            201: Answer("The cron task was created.", schemas.CronTaskCreated),
            202: Answer("The one-time task was created and its execution queued.", schemas.TaskQueued),
            400: Answer("Malformed JSON, or a `delay` / `run_at` that cannot be read "
                        "(`invalid_delay`, `invalid_run_at`).", schemas.BadRequestBody),
            422: Answer("Invalid fields (`validation_error`), the monthly execution limit "
                        "(`limit_exceeded`), or a reused `Idempotency-Key`.", schemas.TaskInvalidBody),
        },
    )
    def create_task(self, req: Request, ctx: AuthContext) -> Response | asyncio.Future[Response]:
        """POST /api/v1/tasks — the hot path: validated synchronously, answered by the batcher."""
        try:
            params = validation.merge_params(
                req.query, validation.decode_json_body(req.body, req.headers.get("content-type"))
            )
            if cron_api.wants_cron(params):
                return cron_api.create_cron_task(self.db, ctx, params, datetime.now(UTC))
            new = validation.parse_create(params, datetime.now(UTC))
            self.guard.admit_executions(ctx, 1)
            # Text ids: asyncpg encodes uuid parameters from text, and the response needs
            # the text anyway, so no uuid.UUID object is made per create.
            task_id = uuid7_str()
            execution_id = uuid7_str()
            body = orjson.dumps({
                "data": {
                    "task_id": task_id,
                    "execution_id": execution_id,
                    "status": "pending",
                    "scheduled_for": _fmt(new.scheduled_at),
                },
                "message": "Task queued for execution",
            })
            return self.batcher.submit((task_id, execution_id, ctx.organization_id, new), Response(202, body))
        except Exception as exc:  # noqa: BLE001
            return _error_for(exc)

    @operation(
        summary="List tasks",
        tags=["Tasks"],
        description="The organization's tasks, most recently run first, then newest first.",
        parameters=[
            query("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 50},
                  "Page size; values above 100 mean 100, others that are not positive mean 50."),
            query("offset", {"type": "integer", "minimum": 0, "default": 0}, "Tasks to skip."),
            query("queue", {"type": "string"}, "Only tasks of this queue; `none`: tasks without a queue."),
        ],
        responses={
            200: Answer("One page of tasks.", schemas.TaskPage),
            400: Answer("A `queue` filter with a NUL character.", schemas.BadRequestBody),
        },
    )
    async def list_tasks(self, req: Request, ctx: AuthContext) -> Response:
        limit, offset, queue, queue_given = validation.parse_list_params(req.query)
        if queue_given:
            row = await self.db.fetchrow(Q.list_tasks, ctx.organization_id, limit, queue or "", True, offset)
        else:
            row = await self.db.fetchrow(Q.list_all_tasks, ctx.organization_id, limit, offset)
        body = b"".join((
            b'{"data":', row["data"].encode(),
            b',"has_more":', b"true" if row["has_more"] else b"false",
            b',"limit":', str(limit).encode(), b',"offset":', str(offset).encode(), b"}",
        ))
        return Response(200, body)

    def _task_id(self, req: Request) -> uuid.UUID:
        task_id = parse_uuid(req.route_params[0])
        if task_id is None:
            raise BadRequest(value=req.route_params[0], reason="path id is not a UUID")  # upstream: 400, not 404
        return task_id

    @operation(
        summary="Get a task",
        tags=["Tasks"],
        parameters=[openapi.TASK_ID],
        responses={
            200: Answer("The task.", schemas.TaskEnvelope),
            400: openapi.BAD_REQUEST,
            404: openapi.NOT_FOUND,
        },
    )
    async def show_task(self, req: Request, ctx: AuthContext) -> Response:
        task_id = self._task_id(req)
        doc = await self.db.fetchval(Q.get_task, task_id, ctx.organization_id)
        if doc is None:
            return NOT_FOUND
        return Response(200, b'{"data":' + doc.encode() + b"}")

    @operation(
        summary="Delete a task",
        tags=["Tasks"],
        description="Its pending executions are dropped; finished ones stay in its history.",
        parameters=[openapi.TASK_ID],
        responses={204: Answer("Deleted."), 400: openapi.BAD_REQUEST, 404: openapi.NOT_FOUND},
    )
    async def delete_task(self, req: Request, ctx: AuthContext) -> Response:
        task_id = self._task_id(req)
        deleted = await self.db.fetchval(Q.delete_task, task_id, ctx.organization_id)
        return NOT_FOUND if deleted is None else Response(204)

    @operation(
        summary="Run a task now",
        tags=["Tasks"],
        description="Queues one execution due now, whatever the task's schedule or `enabled`.",
        parameters=[openapi.TASK_ID],
        responses={
            202: Answer("The execution was queued.", schemas.Triggered),
            400: openapi.BAD_REQUEST,
            404: openapi.NOT_FOUND,
            422: Answer("The monthly execution limit (`limit_exceeded`), or a reused `Idempotency-Key`.",
                        schemas.Error),
        },
    )
    async def trigger_task(self, req: Request, ctx: AuthContext) -> Response:
        task_id = self._task_id(req)
        self.guard.admit_executions(ctx, 1)  # a trigger creates an execution (DECISIONS 9)
        row = await self.db.fetchrow(Q.trigger_task, task_id, ctx.organization_id, uuid7())
        if row is None:
            return NOT_FOUND
        return Response(202, orjson.dumps({
            "data": {"execution_id": str(row["id"]), "status": "pending", "scheduled_for": row["scheduled_for"]},
            "message": "Task triggered successfully",
        }))

    @operation(
        summary="List a task's executions",
        tags=["Tasks"],
        description="Newest first, every status.",
        parameters=[
            openapi.TASK_ID,
            query("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 50},
                  "How many; values above 100 mean 100, others that are not positive mean 50."),
        ],
        responses={
            200: Answer("The executions.", schemas.ExecutionList),
            400: openapi.BAD_REQUEST,
            404: openapi.NOT_FOUND,
        },
    )
    async def list_executions(self, req: Request, ctx: AuthContext) -> Response:
        task_id = self._task_id(req)
        limit = validation.parse_executions_limit(req.query)
        doc = await self.db.fetchval(Q.list_executions, task_id, ctx.organization_id, limit)
        if doc is None:
            return NOT_FOUND
        return Response(200, b'{"data":' + doc.encode() + b"}")
