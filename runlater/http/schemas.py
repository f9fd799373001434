"""JSON Schemas (2020-12, as OpenAPI 3.1 embeds them) of the API's bodies, as Python data.

Each public name is a ``{"$ref": ...}`` to a schema registered in ``COMPONENTS`` under the
same name; ``runlater.http.openapi`` emits that table as ``components.schemas`` and the
handlers' ``@operation`` metadata and the schemas themselves point at the references.

The schemas describe what the handlers really accept and send, not what upstream documents
(upstream-api §7.3 lists where its document is wrong):

* Responses are closed (``additionalProperties: false``) and every key is required, so a key
  added to an answer without its schema fails ``tests/test_openapi.py``.
* Timestamps in answers are always ``YYYY-MM-DDTHH:MM:SSZ`` (UTC, whole seconds); the
  ``pattern`` says so on top of ``format: date-time``.
* Request schemas describe well-formed input. The server is more lenient (numbers and booleans
  given as strings are cast, ``{"task": {...}}`` wrappers are unwrapped, query-string
  parameters are merged into the body) and answers anything else with a 4xx, never a 5xx.

Nothing here is mutated after import.
"""

from __future__ import annotations

from typing import Any

JsonSchema = dict[str, Any]

COMPONENTS: dict[str, JsonSchema] = {}


def _component(name: str, schema: JsonSchema) -> JsonSchema:
    """Register ``schema`` as ``#/components/schemas/<name>`` and return a reference to it."""
    if name in COMPONENTS:
        raise ValueError(f"duplicate schema component {name}")
    COMPONENTS[name] = schema
    return {"$ref": f"#/components/schemas/{name}"}


def _closed(properties: dict[str, JsonSchema], *, description: str, required: list[str] | None = None,
            title: str | None = None) -> JsonSchema:
    """An object answer: exactly ``properties``, all required unless ``required`` says otherwise."""
    schema: JsonSchema = {
        "type": "object",
        "description": description,
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }
    if title:
        schema["title"] = title
    return schema


def _nullable(schema: JsonSchema) -> JsonSchema:
    """``schema`` with ``null`` added to its type (format, pattern and bounds apply to non-null values)."""
    kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    return {**schema, "type": [*kinds, "null"]}


# --------------------------------------------------------------------------------------
# Scalars
# --------------------------------------------------------------------------------------

# What every timestamp in an answer looks like (the database renders them with rl_ts()).
TIMESTAMP: JsonSchema = {
    "type": "string",
    "format": "date-time",
    "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$",
    "examples": ["2026-03-01T09:00:00Z"],
}
UUID: JsonSchema = {"type": "string", "format": "uuid", "examples": ["01963f2e-8a4b-7c3d-9e5f-0a1b2c3d4e5f"]}

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
EXECUTION_STATUSES = ["pending", "running", "success", "failed", "timeout", "missed"]

_SHORT = 255  # the longest name, url, queue or cron expression the API stores
_HEADER_NAME = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"  # an RFC 9110 token
_HEADER_VALUE: JsonSchema = {"type": ["string", "number", "boolean", "null"]}
_STATUS_CODES = r"^\s*(?:[1-5][0-9]{2})?\s*(?:,\s*(?:[1-5][0-9]{2})?\s*)*$"

# --------------------------------------------------------------------------------------
# Resources in answers
# --------------------------------------------------------------------------------------

Task = _component("Task", _closed({
    "id": {**UUID, "description": "The task's id (UUIDv7)."},
    "name": {"type": "string", "maxLength": _SHORT,
             "description": "Given by the client, or derived from the URL (and, for one-time tasks, the time)."},
    "url": {"type": "string", "maxLength": _SHORT, "description": "The http or https URL the task requests."},
    "method": {"type": "string", "enum": METHODS},
    "headers": {"type": "object", "propertyNames": {"pattern": _HEADER_NAME}, "additionalProperties": _HEADER_VALUE,
                "description": "Extra request headers, values as given (sent as text)."},
    "body": {"type": ["string", "null"], "description": "Request body; sent for POST, PUT and PATCH only."},
    "schedule_type": {"type": "string", "enum": ["cron", "once"]},
    "cron_expression": {"type": ["string", "null"], "maxLength": _SHORT, "description": "Set for cron tasks."},
    "scheduled_at": {**_nullable(TIMESTAMP), "description": "When a one-time task runs."},
    "enabled": {"type": "boolean"},
    "timeout_ms": {"type": "integer", "minimum": 1000, "maximum": 300000},
    "retry_attempts": {"type": "integer", "minimum": 0, "maximum": 10,
                       "description": "Retries after a failed attempt (one-time tasks only)."},
    "expected_status_codes": {"type": ["string", "null"],
                              "description": "Comma-separated status codes that count as success; null: any 2xx."},
    "expected_body_pattern": {"type": ["string", "null"],
                              "description": "Text the response body must contain to count as success."},
    "queue": {"type": ["string", "null"], "maxLength": _SHORT,
              "description": "Named queue: its executions run one at a time."},
    "notify_on_failure": {"type": ["boolean", "null"], "description": "null: the organization's setting."},
    "notify_on_recovery": {"type": ["boolean", "null"], "description": "null: the organization's setting."},
    "on_failure_url": {"type": ["string", "null"]},
    "on_recovery_url": {"type": ["string", "null"]},
    "next_run_at": {**_nullable(TIMESTAMP), "description": "Next fire time of an enabled cron task."},
    "inserted_at": TIMESTAMP,
    "updated_at": TIMESTAMP,
}, description="A task as the API returns it."))

Execution = _component("Execution", _closed({
    "id": UUID,
    "status": {"type": "string", "enum": EXECUTION_STATUSES,
               "description": "`missed`: the scheduler skipped this cron slot."},
    "scheduled_for": TIMESTAMP,
    "started_at": _nullable(TIMESTAMP),
    "finished_at": _nullable(TIMESTAMP),
    "status_code": {"type": ["integer", "null"], "description": "The target's HTTP status."},
    "duration_ms": {"type": ["integer", "null"], "minimum": 0},
    "error_message": {"type": ["string", "null"]},
    "attempt": {"type": "integer", "minimum": 1},
}, description="One attempt to run a task."))

Queue = _component("Queue", _closed({
    "name": {"type": "string"},
    "paused": {"type": "boolean"},
}, description="A named queue and whether its executions are held back."))

SyncResult = _component("SyncResult", _closed({
    "created": {"type": "array", "items": {"type": "string"}},
    "updated": {"type": "array", "items": {"type": "string"}},
    "deleted": {"type": "array", "items": {"type": "string"}},
    "created_count": {"type": "integer", "minimum": 0},
    "updated_count": {"type": "integer", "minimum": 0},
    "deleted_count": {"type": "integer", "minimum": 0},
}, description="Names of the resources of one kind a sync created, updated and deleted."))

# --------------------------------------------------------------------------------------
# Envelopes (successful answers)
# --------------------------------------------------------------------------------------

_MESSAGE: JsonSchema = {"type": "string", "description": "A human-readable summary."}

TaskEnvelope = _component("TaskEnvelope", _closed({"data": Task}, description="One task."))

CronTaskCreated = _component("CronTaskCreated", _closed(
    {"data": Task, "message": {"const": "Cron task created"}},
    description="The cron task that was created.",
))

TaskQueued = _component("TaskQueued", _closed({
    "data": _closed({
        "task_id": UUID,
        "execution_id": UUID,
        "status": {"const": "pending"},
        "scheduled_for": TIMESTAMP,
    }, description="The new task and its first execution, committed durably."),
    "message": {"const": "Task queued for execution"},
}, description="A one-time task was created and its execution queued."))

TaskPage = _component("TaskPage", _closed({
    "data": {"type": "array", "items": Task},
    "has_more": {"type": "boolean", "description": "Whether a next page exists."},
    "limit": {"type": "integer", "minimum": 1, "maximum": 100, "description": "The limit applied."},
    "offset": {"type": "integer", "minimum": 0, "description": "The offset applied."},
}, description="One page of tasks, most recently run first."))

ExecutionList = _component("ExecutionList", _closed(
    {"data": {"type": "array", "items": Execution, "maxItems": 100}},
    description="A task's executions, newest first.",
))

Triggered = _component("Triggered", _closed({
    "data": _closed({
        "execution_id": UUID,
        "status": {"const": "pending"},
        "scheduled_for": TIMESTAMP,
    }, description="The execution that was created."),
    "message": {"const": "Task triggered successfully"},
}, description="An execution of the task was queued to run now."))

BatchCreated = _component("BatchCreated", _closed({
    "data": _closed({
        "queue": {"type": "string"},
        "created": {"type": "integer", "minimum": 1, "maximum": 1000},
        "scheduled_for": TIMESTAMP,
    }, description="How many tasks were created, in which queue, due when."),
    "message": _MESSAGE,
}, description="One one-time task per item was created."))

QueueCancelled = _component("QueueCancelled", _closed({
    "data": _closed({"cancelled": {"type": "integer", "minimum": 0}},
                    description="How many tasks were deleted."),
    "message": _MESSAGE,
}, description="The queue's tasks were deleted and its pending executions dropped."))

QueueList = _component("QueueList", _closed(
    {"data": {"type": "array", "items": Queue}},
    description="Every queue used by a live task, sorted by name.",
))

QueueState = _component("QueueState", _closed(
    {"data": Queue, "message": _MESSAGE},
    description="The queue's state after the change.",
))

SyncResponse = _component("SyncResponse", _closed({
    "data": _closed({
        "created": {"type": "array", "items": {"type": "string"}, "description": "Same as tasks.created."},
        "updated": {"type": "array", "items": {"type": "string"}, "description": "Same as tasks.updated."},
        "deleted": {"type": "array", "items": {"type": "string"}, "description": "Same as tasks.deleted."},
        "created_count": {"type": "integer", "minimum": 0},
        "updated_count": {"type": "integer", "minimum": 0},
        "deleted_count": {"type": "integer", "minimum": 0},
        "tasks": SyncResult,
        "monitors": SyncResult,
        "endpoints": SyncResult,
    }, description="Per kind of resource; the top-level lists repeat the tasks' for older clients."),
    "message": _MESSAGE,
}, description="What the sync changed."))

Health = _component("Health", _closed({
    "status": {"type": "string", "enum": ["ok", "error"]},
    "database": {"type": "string", "enum": ["connected", "disconnected"]},
}, description="Whether this server process reaches its database."))

# --------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------

_FUTURE = "2099-01-01T09:00:00Z"  # an example that stays valid
_URL: JsonSchema = {"type": "string", "format": "uri", "maxLength": _SHORT,
                    "description": "An http or https URL with a host.", "examples": ["https://example.com/hook"]}
_OPTIONAL_URL: JsonSchema = {**_nullable(_URL), "description": "An http or https URL with a host, or null."}

# Fields a create (one-time or cron) and an update have in common, under the same names.
_TASK_FIELDS: dict[str, JsonSchema] = {
    "name": {"type": ["string", "null"], "maxLength": _SHORT,
             "description": "Defaults to a name made from the URL."},
    "url": _URL,
    "method": {"type": "string", "enum": METHODS},
    "headers": {"type": "object", "propertyNames": {"pattern": _HEADER_NAME}, "additionalProperties": _HEADER_VALUE,
                "description": "Extra headers; string values must not contain CR, LF or NUL."},
    "body": {"type": ["string", "null"], "description": "At most 256 KiB of UTF-8."},
    "timeout_ms": {"type": "integer", "minimum": 1000, "maximum": 300000, "default": 30000},
    "retry_attempts": {"type": "integer", "minimum": 0, "maximum": 10, "default": 5},
    "callback_url": {**_OPTIONAL_URL,
                     "description": "Receives a POST with the outcome of every attempt."},
    "expected_status_codes": {"type": ["string", "null"], "pattern": _STATUS_CODES,
                              "description": "Comma-separated status codes (100-599) that count as success.",
                              "examples": ["200,201"]},
    "expected_body_pattern": {"type": ["string", "null"],
                              "description": "Text the response body must contain to count as success."},
    "queue": {"type": ["string", "null"], "maxLength": _SHORT,
              "description": "Named queue: its executions run one at a time."},
    "notify_on_failure": {"type": ["boolean", "null"]},
    "notify_on_recovery": {"type": ["boolean", "null"]},
    "on_failure_url": _OPTIONAL_URL,
    "on_recovery_url": _OPTIONAL_URL,
}

_TIMEZONE: JsonSchema = {"type": ["string", "null"], "maxLength": _SHORT,
                         "description": "IANA time zone the cron expression is read in; null: UTC.",
                         "examples": ["Europe/Amsterdam"]}
_CRON: JsonSchema = {"type": "string", "minLength": 1, "maxLength": _SHORT,
                     "description": "Five-field cron expression or an alias such as `@hourly`.",
                     "examples": ["*/5 * * * *", "0 9 * * 1-5", "@daily"]}

TaskCreateOnce = _component("TaskCreateOnce", {
    "type": "object",
    "description": (
        "A one-time task: runs after `delay`, else at `run_at`, else at once (in a second). "
        "Defaults: method POST, timeout 30 s, 5 retries."
    ),
    "properties": {
        **_TASK_FIELDS,
        "delay": {
            "description": ("Seconds (a positive integer) or a positive number and a unit: `30s`, `5m`, `2h`, "
                            "`1d`. The due time must fall before the year 10000."),
            "oneOf": [
                {"type": "string", "pattern": "^0*[1-9][0-9]*[smhd]$", "examples": ["30s", "5m"]},
                {"type": "integer", "minimum": 1},
            ],
        },
        "run_at": {"type": "string", "format": "date-time", "examples": [_FUTURE],
                   "description": "When to run, with an offset; at most 5 minutes in the past."},
    },
    "required": ["url"],
    "not": {"required": ["cron"]},
})

TaskCreateCron = _component("TaskCreateCron", {
    "type": "object",
    "description": "A recurring task, run at every fire time of `cron`. Defaults: method GET, timeout 30 s.",
    "properties": {
        **_TASK_FIELDS,
        "cron": _CRON,
        "timezone": _TIMEZONE,
        "enabled": {"type": "boolean", "default": True},
    },
    "required": ["url", "cron"],
})

TaskCreate = _component("TaskCreate", {
    "description": (
        "A new task. With `cron` it is recurring (201); otherwise it runs once (202). "
        "The same object wrapped as `{\"task\": {...}}` is accepted too."
    ),
    "oneOf": [TaskCreateOnce, TaskCreateCron],
})

TaskUpdate = _component("TaskUpdate", {
    "type": "object",
    "description": (
        "The fields to change, under their stored names (`cron_expression`, `scheduled_at`); "
        "the others keep their values. An edit never runs a one-time task a second time."
    ),
    "properties": {
        **_TASK_FIELDS,
        "schedule_type": {"type": "string", "enum": ["cron", "once"]},
        "cron_expression": {**_CRON, "type": ["string", "null"]},
        "timezone": _TIMEZONE,
        "scheduled_at": {"type": ["string", "null"], "format": "date-time", "examples": [_FUTURE],
                         "description": "When a one-time task runs; a new value must not lie in the past."},
        "enabled": {"type": "boolean"},
    },
})

BatchCreate = _component("BatchCreate", {
    "type": "object",
    "description": (
        "One one-time task per item, all with the same target, queue and due time; "
        "each item (a string, or any JSON value, encoded) becomes its task's body."
    ),
    "properties": {
        "items": {"type": "array", "minItems": 1, "maxItems": 1000, "items": {}},
        "url": _URL,
        "queue": {"type": "string", "minLength": 1, "maxLength": _SHORT},
        "method": {"type": "string", "enum": METHODS, "default": "POST"},
        "headers": _TASK_FIELDS["headers"],
        "timeout_ms": _TASK_FIELDS["timeout_ms"],
        "retry_attempts": _TASK_FIELDS["retry_attempts"],
        "callback_url": _TASK_FIELDS["callback_url"],
        "run_at": {"type": "string", "format": "date-time", "examples": [_FUTURE],
                   "description": "Due time of every task; wins over `delay`. Unparsable: now."},
        "delay": {"description": "As in a single create; an unparsable delay means now.",
                  "type": ["string", "integer"]},
    },
    "required": ["items", "url", "queue"],
})

SyncTask = _component("SyncTask", {
    "type": "object",
    "description": (
        "A declared task, matched by `name` against the organization's cron tasks: "
        "a match is updated, anything else is created."
    ),
    "properties": {
        **_TASK_FIELDS,
        "name": {"type": "string", "minLength": 1, "maxLength": _SHORT},
        "schedule_type": {"type": "string", "enum": ["cron", "once"]},
        "cron_expression": _CRON,
        "timezone": _TIMEZONE,
        "scheduled_at": {"type": "string", "format": "date-time", "examples": [_FUTURE],
                         "description": "When a one-time task runs; must not lie in the past."},
        "enabled": {"type": "boolean"},
    },
    "required": ["name", "url", "schedule_type"],
})

SyncRequest = _component("SyncRequest", {
    "type": "object",
    "description": (
        "The desired set of cron tasks, applied in one transaction. This server has no monitors "
        "or inbound endpoints: their lists must be empty."
    ),
    "properties": {
        "tasks": {"type": "array", "items": SyncTask},
        "monitors": {"type": "array", "maxItems": 0},
        "endpoints": {"type": "array", "maxItems": 0},
        "delete_removed": {"type": "boolean", "default": False,
                           "description": "Delete the cron tasks whose names are not declared."},
    },
    "anyOf": [{"required": ["tasks"]}, {"required": ["monitors"]}, {"required": ["endpoints"]}],
})

# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------

Error = _component("Error", _closed({
    "error": _closed({
        "code": {"type": "string", "examples": ["not_found", "invalid_params", "limit_exceeded"]},
        "message": {"type": "string"},
    }, description="A machine-readable code and a message."),
}, description="An error the API reports with a code."))

ValidationError = _component("ValidationError", _closed({
    "error": _closed({
        "code": {"const": "validation_error"},
        "details": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}},
                    "description": "Field name → what is wrong with it.",
                    "examples": [{"url": ["can't be blank"]}]},
    }, description="Every invalid field at once."),
}, description="Fields that break the task rules."))

SyncValidationError = _component("SyncValidationError", _closed({
    "error": _closed({
        "code": {"const": "validation_error"},
        "details": {
            "type": "array",
            "items": _closed({
                "name": {"description": "The `name` of the declared item, as sent."},
                "error": {"type": "string", "examples": ["url: can't be blank"]},
            }, description="One failing item."),
        },
    }, description="Every declared item that failed; nothing was changed."),
}, description="Declared items that break the rules."))

FrameworkError = _component("FrameworkError", _closed({
    "errors": _closed({"detail": {"type": "string", "examples": ["Bad Request"]}},
                      description="The HTTP reason phrase."),
}, description="A request refused before it reached an endpoint: malformed JSON or path id, unknown route, "
               "body too large."))

PlainError = _component("PlainError", _closed(
    {"error": {"type": "string"}},
    description="An error given as a bare message: rate limiting (429) and an idempotent request still "
                "running (409).",
))

# What the common error statuses can carry.
BadRequestBody: JsonSchema = {"oneOf": [Error, FrameworkError]}
NotFoundBody: JsonSchema = {"oneOf": [Error, FrameworkError]}
UnavailableBody: JsonSchema = {"oneOf": [Error, FrameworkError]}
TaskInvalidBody: JsonSchema = {"oneOf": [ValidationError, Error]}
SyncInvalidBody: JsonSchema = {"oneOf": [SyncValidationError, Error]}
