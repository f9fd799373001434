"""The task API's remaining mutations: update, batch create, cancel by queue, queues, sync.

``register(api)`` adds their routes to an ``Api``. Shapes, codes and messages are
upstream's (upstream-api §1.6, §1.8, §1.11–§1.13); where upstream is broken we follow
DECISIONS.md:

* update (PUT/PATCH) never causes a second run of a one-time task (DECISIONS 10): a
  one-time task is re-scheduled only when ``scheduled_at`` changes, by moving its
  pending first execution; one that already started is left alone;
* batch validates its shared attributes like a single create (DECISIONS 6), reporting
  them as upstream's batch reports its own errors (400 ``invalid_params``, the message
  naming the field), and checks the monthly limit on every path (DECISIONS 9);
* no input yields a 5xx (DECISIONS 5).

Where the spec left room:

* ``PUT /sync`` with a non-empty ``monitors`` or ``endpoints`` array is refused with
  the sync error shape (422, one ``base:`` error per item): this server has neither, and
  answering "No changes" would tell a deploy pipeline its monitors exist. Empty arrays
  are accepted and reported as empty results.
* A cron task's ``next_run_at`` is recomputed only when its schedule changes
  (expression, time zone, type, or enabled), not on every update as upstream does: a
  recompute right after the scheduler queued the next slot would queue it again.
* Changing a task's type: one-time → cron drops the not-yet-started one-time run;
  cron → one-time (enabled) queues a run at ``scheduled_at``.
* Pending executions follow the task's ``queue`` and ``callback_url`` (they are copies
  taken at creation), so cancelling the queue a task was moved to also cancels them.

Every write runs in one transaction; updates lock the task row (``FOR UPDATE``).
"""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson

from runlater.core import cron
from runlater.core.clock import iso_seconds
from runlater.core.ids import parse_uuid, uuid7
from runlater.db.queries import Q
from runlater.http import openapi, schemas, validation
from runlater.http.errors import (
    BadRequest,
    ControllerError,
    InvalidParams,
    NotFound,
    SyncValidationError,
    ValidationError,
)
from runlater.http.messages import Request, Response
from runlater.http.openapi import Answer, operation, path_param, query
from runlater.workers.ssrf import validate_target_url

if TYPE_CHECKING:
    from runlater.http.api import Api
    from runlater.http.auth import AuthContext

__all__ = ["register"]

# Messages (protocol values; upstream's where upstream has one).
QUEUE_REQUIRED = "queue parameter is required"
SYNC_BODY_REQUIRED = "Request body must include 'tasks', 'monitors', and/or 'endpoints' array"
NAME_REQUIRED = "name is required"

BATCH_MAX_ITEMS = 1000
BATCH_SHARED = ("url", "queue", "method", "headers", "timeout_ms", "retry_attempts", "callback_url")
_DELAY_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_ONE_SECOND = timedelta(seconds=1)

# Columns of update_task / insert_task after (id, organization_id), in their order.
_COLUMNS = (
    "name", "url", "method", "headers", "body", "schedule_type", "cron_expression", "timezone",
    "interval_minutes", "scheduled_at", "enabled", "retry_attempts", "timeout_ms", "next_run_at",
    "callback_url", "expected_status_codes", "expected_body_pattern", "queue", "notify_on_failure",
    "notify_on_recovery", "on_failure_url", "on_recovery_url",
)
# What decides a cron task's next run; when none of these changes, next_run_at stays.
_SCHEDULE_FIELDS = ("schedule_type", "cron_expression", "timezone", "enabled")


def register(api: Api) -> None:
    """Add the mutation routes to ``api``."""
    handlers = _Handlers(api)
    api.route("PUT", "/api/v1/tasks/{id}", handlers.update_task)
    api.route("PATCH", "/api/v1/tasks/{id}", handlers.update_task)
    api.route("POST", "/api/v1/tasks/batch", handlers.create_batch)
    api.route("DELETE", "/api/v1/tasks", handlers.cancel_queue)
    api.route("GET", "/api/v1/queues", handlers.list_queues)
    api.route("POST", "/api/v1/queues/{name}/pause", handlers.pause_queue)
    api.route("POST", "/api/v1/queues/{name}/resume", handlers.resume_queue)
    api.route("PUT", "/api/v1/sync", handlers.sync)
    # The router prefers a literal segment and does not backtrack, so once "batch"
    # exists every other /tasks/batch route would be an unknown route (404). Upstream
    # routes them to /tasks/{id}, where "batch" is not a UUID: 400.
    for method, pattern in (
        ("GET", "/api/v1/tasks/batch"),
        ("PUT", "/api/v1/tasks/batch"),
        ("PATCH", "/api/v1/tasks/batch"),
        ("DELETE", "/api/v1/tasks/batch"),
        ("POST", "/api/v1/tasks/batch/trigger"),
        ("GET", "/api/v1/tasks/batch/executions"),
    ):
        api.route(method, pattern, _not_a_task_id)


@operation(
    summary="Not a task id",
    tags=["Tasks"],
    description=(
        "`batch` is not a UUID: every method other than POST on `/api/v1/tasks/batch` (and its "
        "`trigger` and `executions` sub-paths) is answered as a malformed task id, as upstream does."
    ),
    responses={400: Answer("`batch` is not a task id (or, with `code`, an `Idempotency-Key` over 255 characters).",
                            schemas.BadRequestBody)},
)
def _not_a_task_id(req: Request, ctx: AuthContext) -> Response:
    raise BadRequest(value="batch", reason="path id is not a UUID")


def _allow_private_targets() -> bool:
    # Same switch the executors obey (CONTRACT: RUNLATER_ALLOW_PRIVATE_TARGETS=1).
    return os.environ.get("RUNLATER_ALLOW_PRIVATE_TARGETS", "") in ("1", "true", "yes")


_fmt = iso_seconds


def _params(req: Request) -> dict[str, Any]:
    return validation.merge_params(req.query, validation.decode_json_body(req.body, req.headers.get("content-type")))


# --------------------------------------------------------------------------------------
# Cron: the schedule-dependent columns of a task
# --------------------------------------------------------------------------------------


def _check_timezone(attrs: dict[str, Any], new: dict[str, Any], errors: dict[str, list[str]]) -> None:
    """``timezone`` (DECISIONS 19): an IANA name, or null/blank for UTC. Whether it
    exists is checked here too, so a one-time task cannot store a name a later switch
    to cron would trip over."""
    if "timezone" not in attrs:
        return
    value = attrs["timezone"]
    if value is None or (type(value) is str and (not value or value.isspace())):
        new["timezone"] = None
        return
    if type(value) is not str:
        errors["timezone"] = [validation.INVALID]
        return
    try:
        if len(value) > validation.MAX_SHORT_TEXT:
            raise cron.CronError(cron.INVALID_TIMEZONE, "timezone")
        cron.zone(value)
    except cron.CronError as exc:
        errors["timezone"] = [exc.message]
        return
    new["timezone"] = value


def _schedule(old: dict[str, Any] | None, new: dict[str, Any], errors: dict[str, list[str]],
              tier: str, now: datetime) -> None:
    """Check the schedule fields of ``new`` together and derive ``interval_minutes`` and
    ``next_run_at``. ``old`` is the stored row (None on create)."""
    if new["schedule_type"] == "once":
        if new["scheduled_at"] is None and "scheduled_at" not in errors:
            errors["scheduled_at"] = [validation.BLANK]
        # One-time tasks get their execution directly; the scheduler never sees them.
        new["interval_minutes"] = None
        new["next_run_at"] = None
        return
    if new["schedule_type"] != "cron":
        return  # the field error is already there
    expression = new["cron_expression"]
    if expression is None:
        if "cron_expression" not in errors:
            errors["cron_expression"] = [validation.BLANK]
        return
    if "cron_expression" in errors or "timezone" in errors:
        return
    changed = old is None or any(old[k] != new[k] for k in _SCHEDULE_FIELDS) or (
        new["enabled"] and new["next_run_at"] is None)
    try:
        schedule = cron.parse(expression, new["timezone"])
        interval = cron.interval_minutes(expression)
    except cron.CronError as exc:
        errors[exc.field] = [exc.message]
        return
    too_often = cron.min_interval_error(expression, tier)
    if too_often is not None:
        errors["cron_expression"] = [too_often]
        return
    new["interval_minutes"] = interval
    if not changed:
        return
    if not new["enabled"]:
        new["next_run_at"] = None
        return
    after = now
    # Start after a slot the scheduler already queued for this task, so it runs once.
    pending = old.get("pending_until") if old is not None and old["schedule_type"] == "cron" else None
    if pending is not None and pending > now:
        after = pending
    next_run_at = schedule.next_after(after)
    if next_run_at is None:  # no fire time left within the parser's horizon
        errors["cron_expression"] = [cron.INVALID_EXPRESSION]
        return
    new["next_run_at"] = next_run_at


def _check_target(url: str, errors: dict[str, list[str]]) -> None:
    """The save-time SSRF check (§2.1), unless private targets are allowed."""
    if _allow_private_targets():
        return
    message = validate_target_url(url)
    if message is not None:
        errors.setdefault("url", []).append(message)


# --------------------------------------------------------------------------------------
# Planning writes: validation against the stored row, no I/O
# --------------------------------------------------------------------------------------


def _plan_update(row: dict[str, Any], attrs: dict[str, Any], tier: str,
                 now: datetime) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The row after applying ``attrs`` (model field names, partial) to the stored
    ``row``, and the field errors (empty when the update is valid)."""
    clean, errors = validation.validate_task_fields(attrs, partial=True)
    new = dict(row)
    for key, value in clean.items():
        new[key] = orjson.dumps(value).decode() if key == "headers" else value
    if "name" in clean and clean["name"] is None:
        new["name"] = validation.url_host(new["url"]) or ""
    scheduled_at = clean.get("scheduled_at")
    # The future check only applies when scheduled_at changes (§1.6).
    if (scheduled_at is not None and scheduled_at != row["scheduled_at"]
            and scheduled_at < now - validation.PAST_TOLERANCE):
        errors.setdefault("scheduled_at", []).append(validation.NOT_FUTURE)
    if "url" in clean and "url" not in errors and clean["url"] != row["url"]:
        _check_target(clean["url"], errors)
    _check_timezone(attrs, new, errors)
    _schedule(row, new, errors, tier, now)
    return new, errors


def _plan_create(attrs: dict[str, Any], tier: str, now: datetime) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """A new task from model field names (PUT /sync): ``schedule_type`` required, the
    SSRF and tier checks on, a given ``scheduled_at`` must not lie in the past."""
    clean, errors = validation.validate_task_fields(attrs, partial=False, now=now)
    new: dict[str, Any] = {column: None for column in _COLUMNS}
    new.update(clean)
    new["id"] = uuid7()
    new["headers"] = orjson.dumps(clean.get("headers") or {}).decode()
    if "url" in clean and "url" not in errors:
        _check_target(clean["url"], errors)
    _check_timezone(attrs, new, errors)
    _schedule(None, new, errors, tier, now)
    return new, errors


async def _load_pending_until(conn: Any, org_id: uuid.UUID, rows: list[dict[str, Any]]) -> None:
    """Set ``pending_until`` on the locked cron rows (see the query); one-time rows
    never need it."""
    for row in rows:
        row["pending_until"] = None
    ids = [row["id"] for row in rows if row["schedule_type"] == "cron"]
    if ids:
        found = {r["task_id"]: r["pending_until"] for r in await conn.fetch(Q.pending_until, org_id, ids)}
        for row in rows:
            row["pending_until"] = found.get(row["id"])


def _columns(org_id: uuid.UUID, row: dict[str, Any]) -> list[Any]:
    return [row["id"], org_id, *(row[c] for c in _COLUMNS)]


async def _write_update(conn: Any, org_id: uuid.UUID, old: dict[str, Any], new: dict[str, Any]) -> str:
    """Store a planned update and keep the task's executions in step; returns the task JSON."""
    doc = await conn.fetchval(Q.update_task, *_columns(org_id, new))
    task_id = new["id"]
    was_once = old["schedule_type"] == "once"
    is_once = new["schedule_type"] == "once"
    if was_once and not is_once:
        await conn.execute(Q.drop_once_execution, task_id, org_id, old["scheduled_at"])
    elif is_once and not was_once and new["enabled"]:
        await conn.fetchval(Q.add_once_execution, uuid7(), task_id, org_id, new["scheduled_at"],
                            new["callback_url"], new["queue"])
    move_to = new["scheduled_at"] if was_once and is_once and new["scheduled_at"] != old["scheduled_at"] else None
    if move_to is not None or new["queue"] != old["queue"] or new["callback_url"] != old["callback_url"]:
        await conn.fetchval(Q.reschedule_pending, task_id, org_id, move_to, old["scheduled_at"],
                            new["queue"], new["callback_url"])
    if not is_once and new["next_run_at"] is not None and new["next_run_at"] != old["next_run_at"]:
        await conn.fetchval(Q.notify_scheduler, new["next_run_at"])
    return doc


async def _write_create(conn: Any, org_id: uuid.UUID, new: dict[str, Any]) -> None:
    await conn.execute(Q.insert_task, *_columns(org_id, new))
    if new["schedule_type"] == "once":
        if not new["enabled"]:
            return  # a disabled one-time task never runs (upstream gives it no next run)
        await conn.fetchval(Q.add_once_execution, uuid7(), new["id"], org_id, new["scheduled_at"],
                            new["callback_url"], new["queue"])
    elif new["next_run_at"] is not None:
        await conn.fetchval(Q.notify_scheduler, new["next_run_at"])


# --------------------------------------------------------------------------------------
# Batch create helpers
# --------------------------------------------------------------------------------------


def _batch_time(params: dict[str, Any], now: datetime) -> datetime:
    due = _batch_due(params, now)
    # Upstream accepts any past time; a time before 1970 is never meant, and the year-1
    # edge is stored by the driver as -infinity. Refuse it plainly.
    if due < _EARLIEST:
        raise InvalidParams("run_at must be after 1970-01-01T00:00:00Z", params.get("run_at", params.get("delay")))
    return due


_EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)


def _batch_due(params: dict[str, Any], now: datetime) -> datetime:
    """One due time for the whole batch (§1.11): ``run_at`` wins over ``delay`` (the
    reverse of a single create) and both fall back silently, as upstream's do: an
    unparsable ``run_at`` or ``delay`` means now + 1 s; a past ``run_at`` and an integer
    delay ≤ 0 are accepted. Only a time beyond what can be stored is refused."""
    start = now.replace(microsecond=0)
    run_at = params.get("run_at")
    if run_at is not None and run_at is not False:
        # The single create's run_at parser (offset required), so both accept the same text.
        parsed = validation._parse_datetime(run_at, True) if type(run_at) is str else None
        return parsed if parsed is not None else start + _ONE_SECOND
    delay = params.get("delay")
    if delay is None or delay is False:
        return start + _ONE_SECOND
    seconds = 1
    if type(delay) is int:
        seconds = delay
    elif type(delay) is str:
        unit = _DELAY_UNITS.get(delay[-1:])
        digits = delay[:-1]
        if unit is not None and digits and digits.isascii() and digits.isdigit():
            if len(digits) > 18:
                raise InvalidParams("delay is too large", delay)
            seconds = int(digits) * unit
    try:
        return start + timedelta(seconds=seconds)
    except OverflowError:
        raise InvalidParams("delay is too large", delay) from None


def _batch_message(errors: dict[str, list[str]]) -> str:
    # "<field> <message>", as upstream's batch errors read ("url is required"); the
    # shared attributes in a fixed order so the same request gets the same message.
    return "; ".join(f"{field} {message}" for field in BATCH_SHARED for message in errors.get(field, ()))


def _item_body(index: int, item: Any) -> str:
    body = item if type(item) is str else orjson.dumps(item).decode()
    if "\x00" in body:
        raise InvalidParams(f"items[{index}] {validation.HAS_NUL}", item)
    if len(body) * 4 > validation.MAX_BODY_BYTES and len(body.encode("utf-8", "surrogatepass")) > validation.MAX_BODY_BYTES:
        raise InvalidParams(f"items[{index}] {validation.BODY_TOO_BIG}")
    return body


# --------------------------------------------------------------------------------------
# Sync helpers
# --------------------------------------------------------------------------------------


def _sync_error(errors: dict[str, list[str]]) -> str:
    # "<field>: <msg>, <msg>; <field>: <msg>" with fields sorted, as upstream's
    # changeset errors are rendered from a (sorted) map.
    return "; ".join(f"{field}: {', '.join(messages)}" for field, messages in sorted(errors.items()))


def _sync_result(created: list[Any] | None = None, updated: list[Any] | None = None,
                 deleted: list[Any] | None = None) -> dict[str, Any]:
    created, updated, deleted = created or [], updated or [], deleted or []
    return {
        "created": created, "updated": updated, "deleted": deleted,
        "created_count": len(created), "updated_count": len(updated), "deleted_count": len(deleted),
    }


def _sync_message(results: list[dict[str, Any]]) -> str:
    parts = []
    for verb in ("created", "updated", "deleted"):
        count = sum(r[f"{verb}_count"] for r in results)
        if count:
            parts.append(f"{count} {verb}")
    return "Sync complete: " + ", ".join(parts) if parts else "No changes"


def _unsupported(kind: str, items: list[Any]) -> list[dict[str, Any]]:
    message = f"base: {kind} are not supported by this server"
    return [{"name": item.get("name") if type(item) is dict else None, "error": message} for item in items]


# --------------------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------------------


class _Handlers:
    def __init__(self, api: Api) -> None:
        self.api = api
        self.db = api.db

    # -- PUT|PATCH /api/v1/tasks/{id} ------------------------------------------------

    @operation(
        summary="Update a task",
        tags=["Tasks"],
        description=(
            "Changes only the fields given (PUT and PATCH alike). A one-time task is re-scheduled "
            "only when `scheduled_at` changes and it has not started; a cron task's next run is "
            "recomputed only when its schedule changes."
        ),
        parameters=[openapi.TASK_ID],
        request=schemas.TaskUpdate,
        responses={
            200: Answer("The task after the update.", schemas.TaskEnvelope),
            400: openapi.BAD_REQUEST,
            404: openapi.NOT_FOUND,
            422: Answer("Invalid fields (`validation_error`), or a reused `Idempotency-Key`.",
                        schemas.TaskInvalidBody),
        },
    )
    async def update_task(self, req: Request, ctx: AuthContext) -> Response:
        task_id = parse_uuid(req.route_params[0])
        if task_id is None:
            raise BadRequest(value=req.route_params[0], reason="path id is not a UUID")
        attrs = _params(req)
        now = datetime.now(UTC)
        async with self.db.connection() as conn, conn.transaction():
            record = await conn.fetchrow(Q.lock_task, task_id, ctx.organization_id)
            if record is None:
                raise NotFound(task_id)
            row = dict(record)
            await _load_pending_until(conn, ctx.organization_id, [row])
            new, errors = _plan_update(row, attrs, ctx.tier, now)
            if errors:
                raise ValidationError(errors, value=attrs)
            doc = await _write_update(conn, ctx.organization_id, row, new)
        return Response(200, b'{"data":' + doc.encode() + b"}")

    # -- POST /api/v1/tasks/batch ----------------------------------------------------

    @operation(
        summary="Create one-time tasks in a batch",
        tags=["Tasks"],
        description="Up to 1000 tasks in one transaction, sharing target, queue and due time.",
        request=schemas.BatchCreate,
        responses={
            201: Answer("The tasks were created.", schemas.BatchCreated),
            400: Answer("Malformed JSON, or `invalid_params`: a missing, empty or invalid field.",
                        schemas.BadRequestBody),
            422: Answer("The monthly execution limit (`limit_exceeded`), or a reused `Idempotency-Key`.",
                        schemas.Error),
        },
    )
    async def create_batch(self, req: Request, ctx: AuthContext) -> Response:
        params = _params(req)
        items = params.get("items")
        if type(items) is not list:
            raise InvalidParams("items must be a list", items)
        if not items:
            raise InvalidParams("items must not be empty")
        if len(items) > BATCH_MAX_ITEMS:
            raise InvalidParams(f"items must not exceed {BATCH_MAX_ITEMS} elements", len(items))
        self.api.guard.admit_executions(ctx, len(items))
        url = params.get("url")
        if url is None or url == "":
            raise InvalidParams("url is required")
        queue = params.get("queue")
        if queue is None or (type(queue) is str and (not queue or queue.isspace())):
            raise InvalidParams("queue is required")
        if type(url) is not str or validation.url_host(url.strip()) is None:
            raise InvalidParams(f"url {validation.BAD_URL}", url)
        # DECISIONS 6: the shared attributes pass the model rules of a single create.
        # Null means "not given" (the default applies), as in upstream's batch.
        shared = {key: params[key] for key in BATCH_SHARED if params.get(key) is not None}
        clean, errors = validation.validate_task_fields(shared, partial=True)
        if errors:
            raise InvalidParams(_batch_message(errors), shared)
        scheduled_at = _batch_time(params, datetime.now(UTC))
        bodies = [_item_body(i, item) for i, item in enumerate(items)]

        url = clean["url"]
        headers = clean.get("headers")
        template = validation.NewTask(
            name=validation.default_name(url, scheduled_at),
            url=url,
            method=clean.get("method") or "POST",
            headers_json=orjson.dumps(headers) if headers else b"{}",
            body=None,
            scheduled_at=scheduled_at,
            timeout_ms=clean.get("timeout_ms", validation.DEFAULT_TIMEOUT_MS),
            retry_attempts=clean.get("retry_attempts", validation.DEFAULT_RETRY_ATTEMPTS),
            callback_url=clean.get("callback_url"),
            expected_status_codes=None,
            expected_body_pattern=None,
            queue=clean["queue"],
            notify_on_failure=None,
            notify_on_recovery=None,
            on_failure_url=None,
            on_recovery_url=None,
        )
        org_id = ctx.organization_id
        rows = [(uuid7(), uuid7(), org_id, template._replace(body=body)) for body in bodies]
        from runlater.http.api import once_columns  # api imports this module

        # One statement: every task and execution, one commit, one NOTIFY.
        await self.db.execute(Q.create_once_batch, *once_columns(rows))
        n = len(rows)
        return Response(201, orjson.dumps({
            "data": {"queue": template.queue, "created": n, "scheduled_for": _fmt(scheduled_at)},
            "message": f"{n} tasks created",
        }))

    # -- DELETE /api/v1/tasks?queue= -------------------------------------------------

    @operation(
        summary="Cancel a queue",
        tags=["Queues"],
        description="Deletes every task of the queue (cron tasks too) and drops its pending executions.",
        parameters=[query("queue", {"type": "string", "minLength": 1}, "The queue to cancel.", required=True)],
        responses={
            200: Answer("The tasks were deleted.", schemas.QueueCancelled),
            400: Answer("`invalid_params`: no `queue`.", schemas.BadRequestBody),
        },
    )
    async def cancel_queue(self, req: Request, ctx: AuthContext) -> Response:
        queue = _params(req).get("queue")
        if type(queue) is not str or not queue:
            raise InvalidParams(QUEUE_REQUIRED, queue)
        if "\x00" in queue:
            raise InvalidParams(f"queue {validation.HAS_NUL}", queue)
        n = await self.db.fetchval(Q.cancel_queue, ctx.organization_id, queue)
        return Response(200, orjson.dumps({"data": {"cancelled": n}, "message": f"{n} tasks cancelled"}))

    # -- queues ----------------------------------------------------------------------

    @operation(
        summary="List queues",
        tags=["Queues"],
        responses={200: Answer("The queues.", schemas.QueueList)},
    )
    async def list_queues(self, req: Request, ctx: AuthContext) -> Response:
        doc = await self.db.fetchval(Q.list_queues, ctx.organization_id)
        return Response(200, b'{"data":' + doc.encode() + b"}")

    @staticmethod
    def _queue_name(req: Request) -> str:
        name = req.route_params[0]
        if "\x00" in name:  # cannot be stored in a text column
            raise InvalidParams(f"queue {validation.HAS_NUL}", name)
        return name

    @operation(
        summary="Pause a queue",
        tags=["Queues"],
        description="Its pending executions are not started until it is resumed; running ones finish.",
        parameters=[path_param("name", {"type": "string", "minLength": 1}, "The queue's name.")],
        responses={
            200: Answer("The queue is paused.", schemas.QueueState),
            400: Answer("`invalid_params`: a name with a NUL character.", schemas.BadRequestBody),
        },
    )
    async def pause_queue(self, req: Request, ctx: AuthContext) -> Response:
        name = self._queue_name(req)
        await self.db.execute(Q.pause_queue, ctx.organization_id, name)
        return Response(200, orjson.dumps({"data": {"name": name, "paused": True},
                                           "message": f'Queue "{name}" paused'}))

    @operation(
        summary="Resume a queue",
        tags=["Queues"],
        description="Resuming a queue that is not paused changes nothing.",
        parameters=[path_param("name", {"type": "string", "minLength": 1}, "The queue's name.")],
        responses={
            200: Answer("The queue is running.", schemas.QueueState),
            400: Answer("`invalid_params`: a name with a NUL character.", schemas.BadRequestBody),
        },
    )
    async def resume_queue(self, req: Request, ctx: AuthContext) -> Response:
        name = self._queue_name(req)
        await self.db.fetchval(Q.resume_queue, ctx.organization_id, name)
        return Response(200, orjson.dumps({"data": {"name": name, "paused": False},
                                           "message": f'Queue "{name}" resumed'}))

    # -- PUT /api/v1/sync ------------------------------------------------------------

    @operation(
        summary="Declare the set of cron tasks",
        tags=["Sync"],
        description=(
            "Creates the declared tasks that do not exist (by name), updates those that do and, with "
            "`delete_removed`, deletes the cron tasks not declared, all in one transaction: when any "
            "item is invalid nothing changes."
        ),
        request=schemas.SyncRequest,
        responses={
            200: Answer("What changed.", schemas.SyncResponse),
            400: Answer("Malformed JSON, or `bad_request`: none of `tasks`, `monitors`, `endpoints` is a list.",
                        schemas.BadRequestBody),
            422: Answer("Invalid items (`validation_error`, one entry per item), the monthly execution "
                        "limit (`limit_exceeded`), or a reused `Idempotency-Key`.", schemas.SyncInvalidBody),
        },
    )
    async def sync(self, req: Request, ctx: AuthContext) -> Response:
        body = validation.decode_json_body(req.body, req.headers.get("content-type"))
        params = dict(validation.merge_params(req.query, {})) if req.query else {}
        params.update(body)
        tasks, monitors, endpoints = (params.get(k) for k in ("tasks", "monitors", "endpoints"))
        if not any(type(v) is list for v in (tasks, monitors, endpoints)):
            raise ControllerError(400, "bad_request", SYNC_BODY_REQUIRED)
        delete_removed = params.get("delete_removed") is True
        now = datetime.now(UTC)
        task_result = _sync_result()
        async with self.db.connection() as conn, conn.transaction():
            if type(tasks) is list:
                task_result = await self._sync_tasks(conn, ctx, tasks, delete_removed, now)
            # Upstream processes monitors, then endpoints, after tasks and stops at the
            # first type with errors; this server has neither resource.
            for kind, items in (("monitors", monitors), ("endpoints", endpoints)):
                if type(items) is list and items:
                    raise SyncValidationError(_unsupported(kind, items))
        empty = _sync_result()
        data = {
            "created": task_result["created"], "updated": task_result["updated"],
            "deleted": task_result["deleted"], "created_count": task_result["created_count"],
            "updated_count": task_result["updated_count"], "deleted_count": task_result["deleted_count"],
            "tasks": task_result, "monitors": empty, "endpoints": dict(empty),
        }
        return Response(200, orjson.dumps({"data": data, "message": _sync_message([task_result])}))

    async def _sync_tasks(self, conn: Any, ctx: AuthContext, items: list[Any], delete_removed: bool,
                          now: datetime) -> dict[str, Any]:
        org_id = ctx.organization_id
        existing_rows = [dict(r) for r in await conn.fetch(Q.lock_cron_tasks, org_id)]
        await _load_pending_until(conn, org_id, existing_rows)
        by_name: dict[str, dict[str, Any]] = {}
        for row in existing_rows:  # newest first: the oldest of duplicate names wins
            by_name[row["name"]] = row
        current = {row["id"]: row for row in existing_rows}  # latest planned state per task

        # Plan every item first, so nothing is written when any item is invalid.
        errors: list[dict[str, Any]] = []
        updates: list[tuple[dict[str, Any], dict[str, Any]]] = []
        creates: list[dict[str, Any]] = []
        created: list[Any] = []
        updated: list[Any] = []
        declared: set[str] = set()
        for item in items:
            if type(item) is not dict:
                errors.append({"name": None, "error": f"base: {validation.INVALID}"})
                continue
            name = item.get("name")
            if name is None or name == "":
                errors.append({"name": name, "error": NAME_REQUIRED})
                continue
            if type(name) is str:
                declared.add(name)
            match = by_name.get(name) if type(name) is str else None
            if match is not None:
                old = current[match["id"]]
                new, item_errors = _plan_update(old, item, ctx.tier, now)
                if item_errors:
                    errors.append({"name": name, "error": _sync_error(item_errors)})
                    continue
                updates.append((old, new))
                current[new["id"]] = new
                updated.append(name)
            else:
                new, item_errors = _plan_create(item, ctx.tier, now)
                if item_errors:
                    errors.append({"name": name, "error": _sync_error(item_errors)})
                    continue
                creates.append(new)
                created.append(name)
        if errors:
            raise SyncValidationError(errors)

        # DECISIONS 9: every path that creates executions checks the monthly limit.
        runs = sum(1 for new in creates if new["schedule_type"] == "once" and new["enabled"])
        runs += sum(1 for old, new in updates
                    if new["schedule_type"] == "once" and old["schedule_type"] != "once" and new["enabled"])
        if runs:
            self.api.guard.admit_executions(ctx, runs)
        for old, new in updates:
            await _write_update(conn, org_id, old, new)
        for new in creates:
            await _write_create(conn, org_id, new)
        deleted: list[Any] = []
        if delete_removed:
            doomed = [row["id"] for row in existing_rows if row["name"] not in declared]
            if doomed:
                deleted = [r["name"] for r in await conn.fetch(Q.soft_delete_tasks, org_id, doomed)]
        return _sync_result(created, updated, deleted)
