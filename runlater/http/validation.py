"""Turning request input into validated values, with upstream's exact errors. No I/O.

What lives here, in the order a request meets it:

* ``decode_json_body`` / ``merge_params``: body and query string → one parameter map
  (upstream-api §0.1, §0.2).
* ``parse_create``: the one-time ``POST /api/v1/tasks`` (§1.5, §1.5.2) → ``NewTask``.
  Cron creates go through ``parse_cron_create`` (§1.5.1) → ``NewCronTask``; the cron
  rules themselves live in ``runlater.core.cron`` and ``derive_cron_schedule``.
* ``validate_task_fields``: the model rules of §2.1, shared by create and update.
* ``parse_list_params`` / ``parse_executions_limit``: the list endpoints' query (§1.3, §1.10).

Speed: ``parse_create`` runs for most requests the service gets, so the common path
(url, method, body, maybe headers and a delay) uses plain string checks (one
precompiled pattern for the URL), builds no error structures unless something is
wrong, and reuses what repeats between requests: the current second's truncated time
and name suffix, and the timedelta of each distinct delay. Measured by
``bench/micro/test_validation_bench.py``.

Where upstream would crash (500) or store something PostgreSQL cannot hold, we answer
422 on the field instead (DECISIONS 5): NUL characters in any string, over-long
varchar(255) values, an empty ``method``, a non-string ``run_at``, out-of-range times.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, NamedTuple
from urllib.parse import unquote_plus

import orjson

from runlater.core import cron
from runlater.http.errors import BadRequest, InvalidDelay, InvalidRunAt, ValidationError
from runlater.workers.ssrf import validate_target_url

__all__ = [
    "NO_QUEUE",
    "NewCronTask",
    "NewTask",
    "check_cron_expression",
    "decode_json_body",
    "derive_cron_schedule",
    "default_name",
    "merge_params",
    "parse_create",
    "parse_cron_create",
    "parse_executions_limit",
    "parse_list_params",
    "url_host",
    "validate_task_fields",
]


# Messages are protocol values (upstream-api §0.4, §2.1): clients and tests compare them.
BLANK = "can't be blank"
INVALID = "is invalid"
TOO_LONG = "should be at most 255 character(s)"  # Ecto's validate_length wording
HAS_NUL = "must not contain null characters"
BAD_URL = "must be a valid HTTP or HTTPS URL"
BODY_TOO_BIG = "must be less than 256KB"
BAD_STATUS_CODES = "must be comma-separated HTTP status codes (100-599)"
NOT_FUTURE = "must be in the future"
# Only for callers written before cron support existed; nothing here returns it now.
BAD_HEADER_NAME = "contains an invalid header name"
BAD_HEADER_VALUE_TYPE = "header values must be strings, numbers, booleans or null"
BAD_HEADER_VALUE = "header values must not contain line breaks or null characters"

DELAY_NOT_POSITIVE = "delay must be a positive number"
DELAY_ZERO = "delay must be greater than 0"
DELAY_REQUIRED = "delay is required"
DELAY_FORMAT = "invalid delay format. Use a number with unit: 30s, 5m, 2h, 1d"
DELAY_TYPE = 'delay must be a string (e.g. "30s", "5m") or integer (seconds)'
DELAY_TOO_LARGE = "delay is too large"

# Upstream's columns for these are varchar(255); keeping the limit keeps data portable
# and turns what was a database crash upstream into a field error.
MAX_SHORT_TEXT = 255
MAX_BODY_BYTES = 262144
METHODS = frozenset(("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"))

DEFAULT_TIMEOUT_MS = 30000
DEFAULT_RETRY_ATTEMPTS = 5
PAST_TOLERANCE = timedelta(seconds=300)  # run_at/scheduled_at may lie this far in the past

NO_QUEUE = "none"  # list filter value reserved for "tasks without a queue" (§1.3)
LIST_DEFAULT_LIMIT = 50
LIST_MAX_LIMIT = 100
# Leading-integer parses saturate here: keeps int() off pathological digit strings and
# every offset inside PostgreSQL's bigint.
_SATURATE_DIGITS = 18

_ONE_SECOND = timedelta(seconds=1)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_TWO_DIGITS = tuple(f"{i:02d}" for i in range(100))  # 5x cheaper than ":02d" formatting
_EMPTY_HEADERS_JSON = b"{}"
_NAME_SEPARATOR = " \u00b7 "
# " · DD Mon, HH:MM" is always 16 characters.
_NAME_SUFFIX_LEN = len(_NAME_SEPARATOR) + len("05 Mar, 14:30")

# RFC 9110 token characters, the only ones allowed in a header name.
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class NewTask(NamedTuple):
    """A validated one-time task, exactly the columns the insert needs.

    A tuple so that building one per request is a single allocation and a batch can be
    turned into per-column arrays cheaply. ``scheduled_at`` is an aware UTC datetime
    with zero microseconds; ``headers_json`` is the headers object as given, encoded.
    """

    name: str
    url: str
    method: str
    headers_json: bytes
    body: str | None
    scheduled_at: datetime
    timeout_ms: int
    retry_attempts: int
    callback_url: str | None
    expected_status_codes: str | None
    expected_body_pattern: str | None
    queue: str | None
    notify_on_failure: bool | None
    notify_on_recovery: bool | None
    on_failure_url: str | None
    on_recovery_url: str | None


class NewCronTask(NamedTuple):
    """A validated cron task (§1.5.1): ``NewTask``'s columns without ``scheduled_at``,
    plus the schedule. ``next_run_at`` is aware UTC, or None for a disabled task;
    ``timezone`` is an IANA name or None (UTC)."""

    name: str
    url: str
    method: str
    headers_json: bytes
    body: str | None
    timeout_ms: int
    retry_attempts: int
    callback_url: str | None
    expected_status_codes: str | None
    expected_body_pattern: str | None
    queue: str | None
    notify_on_failure: bool | None
    notify_on_recovery: bool | None
    on_failure_url: str | None
    on_recovery_url: str | None
    cron_expression: str
    timezone: str | None
    interval_minutes: int
    next_run_at: datetime | None
    enabled: bool


_new_task = tuple.__new__  # skips NamedTuple's keyword-handling __new__ on the hot path


# --------------------------------------------------------------------------------------
# Request body and parameters
# --------------------------------------------------------------------------------------


def decode_json_body(body: bytes, content_type: str | None) -> dict[str, Any]:
    """Parse a request body into a parameter map, by content type (upstream §0.1).

    * JSON (``application/json``, ``application/*+json``) must be an object; malformed
      JSON, or an array or scalar, is a 400 framework error.
    * ``application/x-www-form-urlencoded`` is decoded like a query string, including
      bracketed keys (``task[url]=…``, ``headers[X-Key]=…``).
    * No content type at all: parsed as JSON. Upstream ignores such bodies (and then
      reports ``url can't be blank``); clients that forget the header mean JSON.
    * Any other type (multipart included) is ignored, as upstream ignores unknown types.
    """
    if not body:
        return {}
    if content_type is not None and content_type != "application/json":
        media = content_type.partition(";")[0].strip().lower()
        if media == "application/x-www-form-urlencoded":
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadRequest(value=body, reason="form body is not UTF-8") from exc
            return _decode_form(text)
        if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
            return {}
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(value=body, reason=f"malformed JSON: {exc}") from exc
    if type(value) is not dict:
        raise BadRequest(value=value, reason="JSON body is not an object")
    return value


def merge_params(query: str, body_params: dict[str, Any]) -> dict[str, Any]:
    """Query-string parameters overlaid by the body's (§0.2), then ``{"task": {...}}``
    unwrapped: when ``task`` is an object it replaces the whole map, as upstream's
    ``Map.get(params, "task", params)`` does."""
    if query:
        params = _decode_form(query)
        params.update(body_params)
    else:
        params = body_params
    task = params.get("task")
    if type(task) is dict:
        return task
    return params


def _decode_form(text: str) -> dict[str, Any]:
    """Decode ``a=1&b[c]=2&d[]=3`` into nested maps and lists (Plug's query syntax).

    Later keys overwrite earlier ones. A key whose brackets do not form ``name[a][b]``
    is kept literally.
    """
    out: dict[str, Any] = {}
    for part in text.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        # urllib's parse_qsl costs several times this; most queries need no unquoting.
        if "%" in part or "+" in part:
            try:
                key = unquote_plus(key, errors="strict")
                value = unquote_plus(value, errors="strict")
            except UnicodeDecodeError as exc:
                raise BadRequest(value=text, reason="query or form data is not UTF-8") from exc
        open_at = key.find("[")
        if open_at <= 0 or key[-1] != "]":
            out[key] = value
            continue
        path = key[open_at + 1 : -1].split("][")
        if any("[" in seg or "]" in seg for seg in path) or any(seg == "" for seg in path[:-1]):
            out[key] = value
            continue
        node = out
        segs = [key[:open_at], *path]
        for seg in segs[:-2]:
            child = node.get(seg)
            if type(child) is not dict:
                child = node[seg] = {}
            node = child
        parent_key, last = segs[-2], segs[-1]
        if last == "":
            items = node.get(parent_key)
            if type(items) is not list:
                items = node[parent_key] = []
            items.append(value)
        else:
            child = node.get(parent_key)
            if type(child) is not dict:
                child = node[parent_key] = {}
            child[last] = value
    return out


# --------------------------------------------------------------------------------------
# POST /api/v1/tasks
# --------------------------------------------------------------------------------------


def parse_create(params: dict[str, Any], now: datetime) -> NewTask:
    """Validate a create request and return the one-time task it describes.

    The schedule comes from the first present key of ``cron`` > ``delay`` > ``run_at``
    (present = not null and not false; ``""`` and ``0`` are present), else now + 1 s;
    ``now`` is an aware UTC datetime. Schedule errors (400 ``invalid_delay`` /
    ``invalid_run_at``) are raised before any field is looked at, as upstream's
    controller does; field errors are then collected together into one 422.
    """
    value = params.get("cron")
    if value is not None and value is not False:
        return parse_cron_create(params, now)
    too_old = False
    suffix = None
    value = params.get("delay")
    if value is not None and value is not False:
        scheduled_at = _delay_time(value, now)
    else:
        value = params.get("run_at")
        if value is not None and value is not False:
            if type(value) is not str:
                raise InvalidRunAt(value)
            scheduled_at = _parse_datetime(value, True)
            if scheduled_at is None:
                raise InvalidRunAt(value)
            too_old = scheduled_at < now - PAST_TOLERANCE
        else:
            clock = _clock
            if not (clock[0] <= now < clock[1]):
                clock = _tick(now)
            scheduled_at, suffix = clock[2], clock[3]

    clean, errors = _check_fields(params, _ONCE_RULES, _ONCE_DEFAULTS, False)
    if too_old:
        if errors is None:
            errors = {}
        errors["scheduled_at"] = [NOT_FUTURE]
    if errors:
        raise ValidationError(errors, value=params)

    url = clean["url"]
    name = clean.get("name")
    if name is None:
        name = _join_name(url, suffix or _name_suffix(scheduled_at))
    headers = clean["headers"]
    get = clean.get
    return _new_task(
        NewTask,
        (
            name,
            url,
            clean["method"],
            orjson.dumps(headers) if headers else _EMPTY_HEADERS_JSON,
            get("body"),
            scheduled_at,
            clean["timeout_ms"],
            clean["retry_attempts"],
            get("callback_url"),
            get("expected_status_codes"),
            get("expected_body_pattern"),
            get("queue"),
            get("notify_on_failure"),
            get("notify_on_recovery"),
            get("on_failure_url"),
            get("on_recovery_url"),
        ),
    )


def parse_cron_create(
    params: dict[str, Any], now: datetime, tier: str = "unlimited", *, allow_private: bool | None = None
) -> NewCronTask:
    """Validate a create with a ``cron`` key (§1.5.1) and return the cron task it describes.

    Fields are forwarded to the model under their model names (``cron`` becomes
    ``cron_expression``; ``timezone`` is ours, DECISIONS 19); all other keys are
    ignored. On top of the §2.1 rules: the SSRF save-time check of ``url`` (skipped
    when ``allow_private``, which defaults to ``RUNLATER_ALLOW_PRIVATE_TARGETS``), the
    tier's minimum interval (``tier`` is the organisation's), and ``next_run_at`` = the
    first fire time after ``now`` (None when the task is created disabled). Every
    field error is reported together in one 422.
    """
    attrs = {field: params[key] for key, field in _CRON_PARAMS if key in params}
    clean, errors = _check_fields(attrs, _CRON_RULES, _MODEL_DEFAULTS, False)
    if errors is None:
        errors = {}
    if allow_private is None:
        allow_private = os.environ.get("RUNLATER_ALLOW_PRIVATE_TARGETS", "") in ("1", "true", "yes")
    url = clean.get("url")
    if url is not None and not allow_private:
        refused = validate_target_url(url)
        if refused is not None:
            errors["url"] = [refused]
    expression = clean.get("cron_expression")
    enabled = clean["enabled"] if "enabled" in clean else True
    interval = next_run_at = None
    if expression is None:
        if "cron_expression" not in errors:
            errors["cron_expression"] = [BLANK]
    elif "timezone" not in errors:
        interval, next_run_at, schedule_errors = derive_cron_schedule(
            expression, clean.get("timezone"), tier=tier, now=now, enabled=enabled
        )
        errors.update(schedule_errors)
    if errors:
        raise ValidationError(errors, value=params)

    if "name" not in clean:
        # Absent or null: upstream names the task after the URL exactly as sent.
        raw = params.get("url")
        name = _CRON_NAME_PREFIX + (raw if type(raw) is str else url)
        if len(name) > MAX_SHORT_TEXT:
            name = name[: MAX_SHORT_TEXT - 1] + "\u2026"
    else:
        name = clean["name"]
        if name is None:  # explicit blank: the URL's host, as the model does
            name = url_host(url) or ""
    headers = clean["headers"]
    get = clean.get
    return NewCronTask(
        name=name,
        url=url,
        method=clean["method"],
        headers_json=orjson.dumps(headers) if headers else _EMPTY_HEADERS_JSON,
        body=get("body"),
        timeout_ms=clean["timeout_ms"],
        retry_attempts=clean["retry_attempts"],
        callback_url=get("callback_url"),
        expected_status_codes=get("expected_status_codes"),
        expected_body_pattern=get("expected_body_pattern"),
        queue=get("queue"),
        notify_on_failure=get("notify_on_failure"),
        notify_on_recovery=get("notify_on_recovery"),
        on_failure_url=get("on_failure_url"),
        on_recovery_url=get("on_recovery_url"),
        cron_expression=expression,
        timezone=get("timezone"),
        interval_minutes=interval,
        next_run_at=next_run_at,
        enabled=enabled,
    )


def derive_cron_schedule(
    expression: str, timezone: str | None, *, tier: str, now: datetime, enabled: bool = True
) -> tuple[int | None, datetime | None, dict[str, list[str]]]:
    """``(interval_minutes, next_run_at, errors)`` of a cron schedule being saved.

    The rules every path that saves a cron task applies (create, update, sync): the
    expression and time zone must parse, the estimated interval must meet ``tier``'s
    minimum (message on ``cron_expression``), and there must be a fire time after
    ``now``. ``next_run_at`` is that fire time when ``enabled``, else None. ``errors``
    maps fields to messages and is empty when the schedule is valid.
    """
    try:
        schedule = cron.parse(expression, timezone)
    except cron.CronError as exc:
        return None, None, {exc.field: [exc.message]}
    interval = cron.interval_minutes(expression)
    refused = cron.min_interval_error(expression, tier)
    if refused is not None:
        return interval, None, {"cron_expression": [refused]}
    first = schedule.next_after(now)
    if first is None:
        return interval, None, {"cron_expression": [cron.INVALID_EXPRESSION]}
    return interval, first if enabled else None, {}


def check_cron_expression(expression: str) -> str | None:
    """The ``cron_expression`` model rule: an error message, or None when valid.
    Time zone, tier and next-run rules are ``derive_cron_schedule``'s."""
    try:
        cron.parse(expression)
    except cron.CronError as exc:
        return exc.message
    return None


# parse_create's view of the current second. datetime.replace() alone costs more than
# the rest of an immediate create, and every request within one second shares the
# truncated time, the immediate schedule (+1 s) and its name suffix: recomputed once a
# second. Holds only values derived from the clock, so it cannot leak between callers.
_clock: tuple[datetime, datetime, datetime, str] = (
    datetime.max.replace(tzinfo=UTC),
    datetime.min.replace(tzinfo=UTC),
    datetime.max.replace(tzinfo=UTC),
    "",
)


def _tick(now: datetime) -> tuple[datetime, datetime, datetime, str]:
    global _clock
    start = now.replace(microsecond=0)
    immediate = start + _ONE_SECOND
    _clock = (start, immediate, immediate, _name_suffix(immediate))
    return _clock


def _truncate(now: datetime) -> datetime:
    clock = _clock
    if not (clock[0] <= now < clock[1]):
        clock = _tick(now)
    return clock[0]


def _delay_time(value: Any, now: datetime) -> datetime:
    """The §1.5.2 delay table → the scheduled time (whole seconds)."""
    kind = type(value)
    # Upstream has no upper bound and crashes past PostgreSQL's range; ours ends where
    # Python's datetime does (year 9999), answered as a 400 like the other delay errors.
    try:
        if kind is str:
            delta = _delay_string(value)
        elif kind is int:
            if value <= 0:
                raise InvalidDelay(DELAY_NOT_POSITIVE, value)
            delta = _delay_seconds(value)
        else:
            # bool lands here too: type(True) is bool, not int.
            raise InvalidDelay(DELAY_TYPE, value)
        return _truncate(now) + delta
    except OverflowError:
        raise InvalidDelay(DELAY_TOO_LARGE, value) from None


# Clients use a handful of distinct delays, and turning one into a timedelta costs about
# as much as all the field checks of a create. Errors are raised, so never cached.
@lru_cache(maxsize=512)
def _delay_string(value: str) -> timedelta:
    if not value:
        raise InvalidDelay(DELAY_REQUIRED, value)
    unit = _UNIT_SECONDS.get(value[-1])
    digits = value[:-1]
    # isascii() first: str.isdigit() also accepts other scripts' digits ("３０s").
    if unit is None or not digits or not digits.isascii() or not digits.isdigit():
        raise InvalidDelay(DELAY_FORMAT, value)
    if len(digits) > _SATURATE_DIGITS:
        raise InvalidDelay(DELAY_TOO_LARGE, value)
    seconds = int(digits) * unit
    if seconds == 0:
        raise InvalidDelay(DELAY_ZERO, value)
    return _delay_seconds(seconds)


@lru_cache(maxsize=512)
def _delay_seconds(seconds: int) -> timedelta:
    return timedelta(seconds=seconds)


def _parse_datetime(text: str, require_offset: bool) -> datetime | None:
    """``YYYY-MM-DD(T|t| )HH:MM:SS[(.|,)digits](Z|z|±HH:MM|±HHMM)`` → aware UTC datetime
    truncated to the second, or None.

    Hand-written rather than ``datetime.fromisoformat``, which on 3.11+ also accepts
    week dates, hour-only times and any separator character. Without ``require_offset``
    a missing offset means UTC (the model's cast of ``scheduled_at``).
    """
    n = len(text)
    if n < 19 or not text.isascii():
        return None
    if text[4] != "-" or text[7] != "-" or text[13] != ":" or text[16] != ":" or text[10] not in "Tt ":
        return None
    fields = (text[0:4], text[5:7], text[8:10], text[11:13], text[14:16], text[17:19])
    for part in fields:
        if not part.isdigit():
            return None
    i = 19
    if i < n and text[i] in ".,":
        j = i + 1
        while j < n and text[j].isdigit():
            j += 1
        if j == i + 1:
            return None
        i = j
    rest = text[i:]
    offset_minutes = 0
    if rest == "Z" or rest == "z":
        pass
    elif rest == "":
        if require_offset:
            return None
    elif rest[0] in "+-" and len(rest) in (5, 6):
        hh, mm = rest[1:3], rest[-2:]
        if (len(rest) == 6 and rest[3] != ":") or not hh.isdigit() or not mm.isdigit():
            return None
        h, m = int(hh), int(mm)
        if h > 23 or m > 59:
            return None
        offset_minutes = h * 60 + m
        if rest[0] == "-":
            offset_minutes = -offset_minutes
    else:
        return None
    year, month, day, hour, minute, second = map(int, fields)
    try:
        value = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
        if offset_minutes:
            value -= timedelta(minutes=offset_minutes)
    except (ValueError, OverflowError):
        return None
    return value


_NAME_URL_MAX = MAX_SHORT_TEXT - _NAME_SUFFIX_LEN


def default_name(url: str, scheduled_at: datetime) -> str:
    """``"<url> · <DD Mon, HH:MM>"`` (§1.5.2), kept within the 255-character name limit.

    The suffix is always 16 characters, so a URL longer than 239 characters is cut to
    238 and ends in "…": the name stays recognisably the URL, and the time (the part
    that tells tasks to the same URL apart) is never the part that is lost.
    """
    return _join_name(url, _name_suffix(scheduled_at))


def _join_name(url: str, suffix: str) -> str:
    if len(url) > _NAME_URL_MAX:
        url = url[: _NAME_URL_MAX - 1] + "\u2026"
    return url + suffix


def _name_suffix(d: datetime) -> str:
    # A fixed month table: strftime("%b") would follow the process locale.
    two = _TWO_DIGITS
    return f"{_NAME_SEPARATOR}{two[d.day]} {_MONTHS[d.month - 1]}, {two[d.hour]}:{two[d.minute]}"


# --------------------------------------------------------------------------------------
# Model field rules (§2.1)
# --------------------------------------------------------------------------------------


class _Invalid(Exception):
    """Raised by a field rule; carries the field's messages."""

    def __init__(self, *messages: str) -> None:
        super().__init__(*messages)
        self.messages = list(messages)


def _text(value: Any) -> str:
    if type(value) is not str:
        raise _Invalid(INVALID)
    if "\x00" in value:
        raise _Invalid(HAS_NUL)
    return value


def _short_text(value: Any) -> str:
    if type(value) is not str:
        raise _Invalid(INVALID)
    if "\x00" in value:
        raise _Invalid(HAS_NUL)
    if len(value) > MAX_SHORT_TEXT:
        raise _Invalid(TOO_LONG)
    return value


def url_host(url: str) -> str | None:
    """The host of an ``http(s)://`` URL, or None when it is not one or has no host.

    Mirrors what upstream's check needs from ``URI.parse``: the scheme (any case), then
    an authority whose host part, after any ``user@`` and ``:port``, is non-empty. The
    model also uses the host as the name of a task created with a blank name (§2.1).
    """
    if url.startswith("https://"):
        start = 8
    elif url.startswith("http://"):
        start = 7
    else:
        head = url[:8].lower()
        if head.startswith("https://"):
            start = 8
        elif head.startswith("http://"):
            start = 7
        else:
            return None
    end = len(url)
    for stop in "/?#":
        i = url.find(stop, start, end)
        if i != -1:
            end = i
    authority = url[start:end]
    at = authority.rfind("@")
    if at != -1:
        authority = authority[at + 1 :]
    if authority[:1] == "[":  # IPv6 literal
        close = authority.find("]")
        host = authority[1:close] if close != -1 else ""
    else:
        host = authority.partition(":")[0]
    return host or None


# The same rule as url_host() in one match, for the hot path: scheme, optional
# userinfo (up to the last "@" of the authority), then a non-empty host or IPv6 literal
# that ends the authority or is followed by a port, path, query or fragment.
_HTTP_URL = re.compile(r"https?://(?:[^/?#]*@)?(?:\[[^\]/?#@]+\]|[^:/?#@\[\]]+)(?![^:/?#])", re.IGNORECASE)


def _http_url(value: str) -> bool:
    # Whitespace and control characters are refused although upstream's URI.parse lets
    # them through: such a URL can never be requested (the HTTP client rejects the
    # request line), so accepting it would only create a task that always fails.
    return _HTTP_URL.match(value) is not None and value.isprintable() and " " not in value


def _task_url(value: Any) -> str:
    if type(value) is not str:
        raise _Invalid(INVALID)
    if "\x00" in value:
        raise _Invalid(HAS_NUL)
    url = value.strip()  # only the task URL is trimmed upstream
    if len(url) > MAX_SHORT_TEXT:
        if _http_url(url):
            raise _Invalid(TOO_LONG)
        raise _Invalid(BAD_URL, TOO_LONG)
    if not _http_url(url):
        raise _Invalid(BAD_URL)
    return url


def _optional_url(value: Any) -> str:
    if type(value) is not str:
        raise _Invalid(INVALID)
    if "\x00" in value:
        raise _Invalid(HAS_NUL)
    if not _http_url(value):
        raise _Invalid(BAD_URL)
    return value


def _callback_url(value: Any) -> str:
    url = _optional_url(value)
    if len(url) > MAX_SHORT_TEXT:
        raise _Invalid(TOO_LONG)
    return url


def _method(value: Any) -> str:
    if type(value) is not str or value not in METHODS:
        raise _Invalid(INVALID)
    return value


def _headers(value: Any) -> dict[str, Any]:
    """A JSON object of header name → scalar, stored as given (the executor stringifies
    the values). Names must be tokens and string values free of CR, LF and NUL: anything
    else could never be sent, or would smuggle extra header lines, and NUL cannot be
    stored in jsonb."""
    if type(value) is not dict:
        raise _Invalid(INVALID)
    bad: list[str] | None = None
    for name, item in value.items():
        if not name or not _TOKEN_CHARS.issuperset(name):
            bad = bad or []
            if BAD_HEADER_NAME not in bad:
                bad.append(BAD_HEADER_NAME)
        kind = type(item)
        if kind is str:
            if "\r" in item or "\n" in item or "\x00" in item:
                bad = bad or []
                if BAD_HEADER_VALUE not in bad:
                    bad.append(BAD_HEADER_VALUE)
        elif kind is not int and kind is not float and kind is not bool and item is not None:
            bad = bad or []
            if BAD_HEADER_VALUE_TYPE not in bad:
                bad.append(BAD_HEADER_VALUE_TYPE)
    if bad:
        raise _Invalid(*bad)
    return value


def _body(value: Any) -> str:
    if type(value) is not str:
        raise _Invalid(INVALID)
    if "\x00" in value:
        raise _Invalid(HAS_NUL)
    n = len(value)
    # A character is 1-4 UTF-8 bytes, so most bodies are decided without encoding them.
    if n > MAX_BODY_BYTES or (n * 4 > MAX_BODY_BYTES and len(value.encode("utf-8", "surrogatepass")) > MAX_BODY_BYTES):
        raise _Invalid(BODY_TOO_BIG)
    return value


def _cast_int(value: Any) -> int:
    """Ecto's integer cast: integers, or strings that are entirely an optionally signed
    decimal number. Floats, booleans and anything else are invalid."""
    if type(value) is int:
        return value
    if type(value) is str:
        digits = value[1:] if value[:1] in ("+", "-") else value
        if digits and digits.isascii() and digits.isdigit():
            if len(digits) > _SATURATE_DIGITS:  # out of every range anyway; spare int()
                number = 10**_SATURATE_DIGITS
                return -number if value[0] == "-" else number
            return int(value)
    raise _Invalid(INVALID)


def _int_between(low: int, high: int) -> Callable[[Any], int]:
    too_low = f"must be greater than or equal to {low}"
    too_high = f"must be less than or equal to {high}"

    def rule(value: Any) -> int:
        number = _cast_int(value)
        if number < low:
            raise _Invalid(too_low)
        if number > high:
            raise _Invalid(too_high)
        return number

    return rule


_timeout_ms = _int_between(1000, 300000)
_retry_attempts = _int_between(0, 10)

_BOOL_STRINGS = {"true": True, "1": True, "false": False, "0": False}


def _bool(value: Any) -> bool:
    if value is True or value is False:
        return value
    if type(value) is str:
        cast = _BOOL_STRINGS.get(value)
        if cast is not None:
            return cast
    raise _Invalid(INVALID)


def _status_codes(value: Any) -> str:
    text = _text(value)
    bad = 0
    for segment in text.split(","):
        code = segment.strip()
        if not code:
            continue
        if not (code.isascii() and code.isdigit() and len(code) <= 10 and 100 <= int(code) <= 599):
            bad += 1
    if bad:
        raise _Invalid(*([BAD_STATUS_CODES] * bad))  # once per bad segment, like upstream
    return text  # stored verbatim, spaces included


def _schedule_type(value: Any) -> str:
    if value != "cron" and value != "once":
        raise _Invalid(INVALID)
    return value


def _cron_expression(value: Any) -> str:
    expression = _short_text(value)
    message = check_cron_expression(expression)
    if message is not None:
        raise _Invalid(message)
    return expression


def _scheduled_at(value: Any) -> datetime:
    if type(value) is datetime:
        if value.tzinfo is None:
            return value.replace(microsecond=0, tzinfo=UTC)
        return value.astimezone(UTC).replace(microsecond=0)
    if type(value) is str:
        parsed = _parse_datetime(value, False)
        if parsed is not None:
            return parsed
    raise _Invalid(INVALID)


Rule = Callable[[Any], Any]

# Every castable model field (§1.6) → its rule. Keys not listed are ignored, as
# upstream's cast ignores them.
_MODEL_RULES: dict[str, Rule] = {
    "name": _short_text,
    "url": _task_url,
    "method": _method,
    "headers": _headers,
    "body": _body,
    "schedule_type": _schedule_type,
    "cron_expression": _cron_expression,
    "scheduled_at": _scheduled_at,
    "enabled": _bool,
    "timeout_ms": _timeout_ms,
    "retry_attempts": _retry_attempts,
    "callback_url": _callback_url,
    "expected_status_codes": _status_codes,
    "expected_body_pattern": _text,
    "queue": _short_text,
    "notify_on_failure": _bool,
    "notify_on_recovery": _bool,
    "on_failure_url": _optional_url,
    "on_recovery_url": _optional_url,
}

# A one-time create ignores the schedule fields and `enabled` (§1.5).
_ONCE_RULES = {
    key: rule
    for key, rule in _MODEL_RULES.items()
    if key not in ("schedule_type", "cron_expression", "scheduled_at", "enabled")
}


def _timezone(value: Any) -> str:
    if type(value) is not str:
        raise _Invalid(INVALID)
    try:
        cron.zone(value)
    except cron.CronError as exc:
        raise _Invalid(exc.message) from None
    return value


# A cron create: the model rules plus the task's time zone (DECISIONS 19).
_CRON_RULES = dict(_MODEL_RULES, timezone=_timezone)

# Request key → model field of a cron create (§1.5.1), in the model's order.
_CRON_PARAMS = (
    ("name", "name"), ("url", "url"), ("method", "method"), ("headers", "headers"), ("body", "body"),
    ("cron", "cron_expression"), ("timezone", "timezone"), ("enabled", "enabled"),
    ("timeout_ms", "timeout_ms"), ("retry_attempts", "retry_attempts"), ("callback_url", "callback_url"),
    ("expected_status_codes", "expected_status_codes"), ("expected_body_pattern", "expected_body_pattern"),
    ("queue", "queue"), ("notify_on_failure", "notify_on_failure"), ("notify_on_recovery", "notify_on_recovery"),
    ("on_failure_url", "on_failure_url"), ("on_recovery_url", "on_recovery_url"),
)
_CRON_NAME_PREFIX = "Cron: "

# Columns that cannot be null: an explicit blank value is an error rather than null.
_NOT_NULL = frozenset(("url", "method", "headers", "schedule_type", "enabled", "timeout_ms", "retry_attempts"))

# Shared by every call: parse_create only encodes it; validate_task_fields hands its
# callers a fresh dict instead.
_NO_HEADERS: dict[str, Any] = {}
_MODEL_DEFAULTS = {
    "method": "GET",
    "headers": _NO_HEADERS,
    "enabled": True,
    "timeout_ms": DEFAULT_TIMEOUT_MS,
    "retry_attempts": DEFAULT_RETRY_ATTEMPTS,
}
_ONCE_DEFAULTS = {
    "method": "POST",
    "headers": _NO_HEADERS,
    "timeout_ms": DEFAULT_TIMEOUT_MS,
    "retry_attempts": DEFAULT_RETRY_ATTEMPTS,
}
_NO_DEFAULTS: dict[str, Any] = {}


def _check_fields(
    attrs: dict[str, Any],
    rules: dict[str, Rule],
    defaults: dict[str, Any],
    partial: bool,
) -> tuple[dict[str, Any], dict[str, list[str]] | None]:
    """Cast and check every known field of ``attrs``; errors of all fields together.

    Null and blank (§0.4: ``""`` or whitespace only) values:
    * create (``partial`` false): null means "not given" and the default applies; a
      blank string for a NOT NULL column is ``can't be blank``, for others it is null.
    * update (``partial`` true): both mean null, so NOT NULL columns get
      ``can't be blank``; no defaults.
    The error map is only built once something fails (the common case builds none).
    """
    clean = dict(defaults)
    errors: dict[str, list[str]] | None = None
    for key, value in attrs.items():
        rule = rules.get(key)
        if rule is None:
            continue
        if value is None:
            if not partial:
                continue
        elif type(value) is not str or (value and not value.isspace()):
            try:
                clean[key] = rule(value)
            except _Invalid as exc:
                if errors is None:
                    errors = {}
                errors[key] = exc.messages
                clean.pop(key, None)
            continue
        if key in _NOT_NULL:
            if errors is None:
                errors = {}
            errors[key] = [BLANK]
            clean.pop(key, None)
        else:
            clean[key] = None
    if not partial and "url" not in clean and (errors is None or "url" not in errors):
        if errors is None:
            errors = {}
        errors["url"] = [BLANK]
    return clean, errors


def validate_task_fields(
    attrs: dict[str, Any], *, partial: bool, now: datetime | None = None
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The §2.1 model rules over model field names (create, update, sync).

    Returns the cast values of the fields given (plus defaults unless ``partial``) and
    a field → messages map, empty when valid. Unknown keys are ignored.

    * ``partial=False`` (create): ``url`` and ``schedule_type`` are required,
      ``cron_expression`` when cron and ``scheduled_at`` when once; a missing or blank
      ``name`` becomes the URL's host.
    * ``partial=True`` (update): only the given fields are checked. Cross-field rules
      involving stored values (switching ``schedule_type`` needs the matching schedule
      field) and the name fallback (``name`` cleared → host of the stored URL, see
      ``url_host``) are the caller's, because only it has the stored row.
    * ``now``: when given, a ``scheduled_at`` in the result must not be older than
      ``now`` − 300 s. Pass it only when ``scheduled_at`` changes.
    """
    clean, errors = _check_fields(attrs, _MODEL_RULES, _NO_DEFAULTS if partial else _MODEL_DEFAULTS, partial)
    if errors is None:
        errors = {}
    if clean.get("headers") is _NO_HEADERS:
        clean["headers"] = {}
    if not partial:
        kind = clean.get("schedule_type")
        if kind is None and "schedule_type" not in errors:
            errors["schedule_type"] = [BLANK]
        elif kind == "cron" and clean.get("cron_expression") is None and "cron_expression" not in errors:
            errors["cron_expression"] = [BLANK]
        elif kind == "once" and clean.get("scheduled_at") is None and "scheduled_at" not in errors:
            errors["scheduled_at"] = [BLANK]
        if clean.get("name") is None and "name" not in errors and "url" in clean:
            clean["name"] = url_host(clean["url"]) or ""
    if now is not None:
        scheduled_at = clean.get("scheduled_at")
        if scheduled_at is not None and scheduled_at < now - PAST_TOLERANCE:
            errors.setdefault("scheduled_at", []).append(NOT_FUTURE)
    return clean, errors


# --------------------------------------------------------------------------------------
# GET /api/v1/tasks and GET /api/v1/tasks/{id}/executions
# --------------------------------------------------------------------------------------


def _leading_int(value: Any) -> int | None:
    """Elixir's ``Integer.parse``: an optional sign and digits at the start of the
    string; what follows is ignored ("10abc" → 10). None when there are no digits."""
    if type(value) is not str:
        return None
    if value.isdigit() and value.isascii() and len(value) <= _SATURATE_DIGITS:
        return int(value)
    start = 1 if value[:1] in ("+", "-") else 0
    end = start
    n = len(value)
    while end < n and "0" <= value[end] <= "9":
        end += 1
    if end == start:
        return None
    number = int(value[start:end]) if end - start <= _SATURATE_DIGITS else 10**_SATURATE_DIGITS
    return -number if value[0] == "-" else number


def _limit(params: dict[str, Any]) -> int:
    limit = _leading_int(params.get("limit"))
    if limit is None or limit <= 0:
        return LIST_DEFAULT_LIMIT
    return min(limit, LIST_MAX_LIMIT)


def parse_list_params(query: str) -> tuple[int, int, str | None, bool]:
    """``(limit, offset, queue, queue_given)`` for ``GET /api/v1/tasks`` (§1.3).

    ``queue`` is the filter exactly as given when ``queue_given`` (``""`` included,
    which matches nothing, and the reserved ``NO_QUEUE`` = ``"none"``, which means
    tasks without a queue); None when the parameter is absent.
    """
    params = _decode_form(query) if query else {}
    offset = _leading_int(params.get("offset"))
    if offset is None or offset < 0:
        offset = 0
    if "queue" not in params:
        return _limit(params), offset, None, False
    queue = params["queue"]
    if type(queue) is not str or "\x00" in queue:
        raise BadRequest(value=queue, reason="queue filter must be a plain string")
    return _limit(params), offset, queue, True


def parse_executions_limit(query: str) -> int:
    """``limit`` for ``GET /api/v1/tasks/{id}/executions`` (§1.10): same rule as §1.3."""
    return _limit(_decode_form(query)) if query else LIST_DEFAULT_LIMIT
