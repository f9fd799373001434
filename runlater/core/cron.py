"""Cron expressions: parsing, fire times in a task's time zone, and the interval estimate.

Used by the API (validation of ``cron``/``cron_expression``, the first ``next_run_at``)
and by the scheduler (every later fire time, the catch-up grace period).

Why cronsim and not a parser of our own or croniter
---------------------------------------------------
Fire-time arithmetic is where cron implementations go wrong: month ends, Feb 29, the
day-of-month/day-of-week rule, and above all daylight-saving transitions, where a
local time can be missing or happen twice. cronsim is small (one module, no
dependencies), maintained, tested against Debian cron's behaviour, and handles DST the
way cron users expect (below). A hand-written parser would have to re-derive and
re-test all of that. croniter was the usual choice, but its issue tracker holds years of
DST reports (runs an hour off, or twice, around the transitions) closed without a fix,
and its maintainer declared it abandoned in 2025 before others adopted it; cronsim was
written as a DST-careful replacement and is what its author's own monitoring service
(Healthchecks) evaluates every schedule with.

The dialect we accept
---------------------
* Five fields ``minute hour day-of-month month day-of-week``, separated by whitespace,
  with ``*``, lists ``a,b``, ranges ``a-b``, steps ``*/n``, ``a-b/n`` and ``a/n``
  (= ``a-max/n``), month names ``JAN``-``DEC`` and weekday names ``SUN``-``SAT`` in
  any case, Sunday as ``0`` or ``7``, and cronsim's extras ``L``, ``LW``, ``<d>L``,
  ``<d>#<n>``.
* Fewer than five fields: the missing trailing fields are ``*`` (``"0 9"`` = 09:00
  every day). Upstream accepts this, so its clients may send it.
* Aliases, case-insensitive, mapped here to five fields: ``@yearly``/``@annually``
  ``0 0 1 1 *``, ``@monthly`` ``0 0 1 * *``, ``@weekly`` ``0 0 * * 0``,
  ``@daily``/``@midnight`` ``0 0 * * *``, ``@hourly`` ``0 * * * *``, and
  ``@minutely`` ``* * * * *`` (upstream accepts it).
* Rejected with upstream's message ``is not a valid cron expression``: ``@reboot``
  (no fire time; upstream crashed on it), ``@secondly`` and every other alias, and
  six or more fields. A sixth field is the *year* upstream but the *seconds* (placed
  first!) in cronsim and several other libraries: the same text would mean two
  different schedules, so neither reading is accepted.
* Expressions that can never fire in practice (``0 0 30 2 *``) are rejected by
  cronsim; the API also rejects an expression with no fire time after now.

Where we follow cron rather than upstream's parser (Elixir ``crontab``): when both
day-of-month and day-of-week are restricted, a day matches if *either* matches
(upstream: both); ``*/n`` counts from the field's first value, so day ``*/2`` is the
1st, 3rd, ... (upstream: multiples of n); wrap-around ranges such as ``FRI-MON`` and
the ``W`` nearest-weekday form are not accepted. Minute and hour steps, the ones
people actually use, mean the same in both.

Time zones (DECISIONS 19)
-------------------------
A schedule is evaluated in its task's IANA time zone (UTC when none). Datetimes in and
out are aware UTC. Across DST transitions we behave as cron (cronsim mirrors Debian
cron):

* Schedules with a fixed minute and hour (``30 2 * * *``): a local time that does not
  exist (spring forward) fires at the first existing minute after it (03:00 on that
  day); a local time that happens twice (fall back) fires once, at its first
  occurrence.
* Schedules whose minute or hour field starts with ``*`` (``*/15 * * * *``,
  ``0 * * * *``) follow real elapsed time: no run is invented for the skipped hour
  and the repeated hour runs again, so "every hour" stays every 60 minutes.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

__all__ = [
    "INVALID_EXPRESSION",
    "INVALID_TIMEZONE",
    "MIN_INTERVAL_MESSAGE",
    "CronError",
    "CronSchedule",
    "grace_seconds",
    "interval_minutes",
    "min_interval_error",
    "normalize",
    "parse",
    "zone",
]

# Field messages: protocol values (upstream-api §2.1, §5); clients compare them.
INVALID_EXPRESSION = "is not a valid cron expression"
INVALID_TIMEZONE = "is not a valid timezone"
MIN_INTERVAL_MESSAGE = (
    "Free plan only allows hourly or less frequent schedules. Upgrade to Pro for per-minute scheduling."
)

# CONTRACT "Tiers": the shortest schedule each tier may use, in minutes. Unknown tiers
# are treated as free, as upstream does.
MIN_INTERVAL_MINUTES = {"free": 60, "pro": 1, "unlimited": 1}

_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
    "@minutely": "* * * * *",
}

# Guard against pathological input before handing it to cronsim, whose parser is
# recursive over lists and builds sets per item.
_MAX_EXPRESSION_LENGTH = 255


class CronError(ValueError):
    """An expression or time zone that cannot be used; ``message`` is the field message
    and ``field`` the model field it belongs to (``cron_expression`` or ``timezone``)."""

    def __init__(self, message: str, field: str = "cron_expression") -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def normalize(expression: str) -> str:
    """The five-field form of an expression (aliases expanded, short forms padded with
    ``*``, fields joined by one space). Raises ``CronError`` when it is not one we accept;
    fields are not validated here (``parse`` does that)."""
    if type(expression) is not str or len(expression) > _MAX_EXPRESSION_LENGTH:
        raise CronError(INVALID_EXPRESSION)
    text = expression.strip()
    if text.startswith("@"):
        alias = _ALIASES.get(text.lower())
        if alias is None:
            raise CronError(INVALID_EXPRESSION)
        return alias
    fields = text.split()
    if not 1 <= len(fields) <= 5:
        raise CronError(INVALID_EXPRESSION)
    if not text.isascii():
        raise CronError(INVALID_EXPRESSION)
    fields.extend("*" * (5 - len(fields)))
    return " ".join(fields)


@lru_cache(maxsize=1024)
def zone(name: str | None) -> ZoneInfo | None:
    """The ZoneInfo for an IANA name, None for UTC (no name). Raises ``CronError``."""
    if name is None:
        return None
    if type(name) is not str or not name or "\x00" in name:
        raise CronError(INVALID_TIMEZONE, "timezone")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        # ValueError: keys that are not relative paths ("/etc/passwd", "../x").
        raise CronError(INVALID_TIMEZONE, "timezone") from None


class CronSchedule:
    """A validated expression in a time zone. Immutable; shared through ``parse``'s cache."""

    __slots__ = ("expression", "timezone", "fields", "_tz")

    def __init__(self, expression: str, fields: str, timezone: str | None, tz: ZoneInfo | None) -> None:
        self.expression = expression  # as given (stored and echoed verbatim)
        self.fields = fields  # the normalized five-field form
        self.timezone = timezone
        self._tz = tz

    def __repr__(self) -> str:
        return f"CronSchedule({self.expression!r}, timezone={self.timezone!r})"

    def _iterate(self, after: datetime) -> Iterator[datetime]:
        """Fire times strictly after ``after`` (aware), as aware UTC datetimes, increasing.

        cronsim evaluates fixed-time schedules on the local wall clock, which forgets
        which of two repeated local hours ``after`` was in; the filter keeps the
        sequence strictly increasing in real time all the same.
        """
        if after.tzinfo is None:
            raise ValueError("datetime must be timezone-aware")
        start = after.astimezone(UTC) if self._tz is None else after.astimezone(self._tz)
        last = after
        try:
            for t in CronSim(self.fields, start):
                t = t.astimezone(UTC)
                if t > last:
                    last = t
                    yield t
        except StopIteration:  # pragma: no cover - cronsim ends iteration itself
            return

    def next_after(self, dt: datetime) -> datetime | None:
        """The first fire time strictly after ``dt``, aware UTC, whole minute.

        None when there is none within cronsim's search horizon (50 years).
        """
        return next(self._iterate(dt), None)

    def fire_times(self, after: datetime, until: datetime | None = None, limit: int | None = None) -> Iterator[datetime]:
        """Fire times in ``(after, until]`` in order, at most ``limit`` of them."""
        n = 0
        for t in self._iterate(after):
            if (until is not None and t > until) or (limit is not None and n >= limit):
                return
            n += 1
            yield t


def parse(expression: str, timezone: str | None = None) -> CronSchedule:
    """Validate ``expression`` (and ``timezone``, an IANA name or None for UTC).

    Raises ``CronError`` with ``is not a valid cron expression`` or
    ``is not a valid timezone``.
    """
    return _parse(expression, timezone)


@lru_cache(maxsize=4096)
def _parse(expression: str, timezone: str | None) -> CronSchedule:
    fields = normalize(expression)
    tz = zone(timezone)
    try:
        # Constructing the iterator parses and range-checks every field; any exception
        # from it (not only CronSimError) means cronsim cannot use the text.
        CronSim(fields, datetime(2000, 1, 1, tzinfo=UTC))
    except (CronSimError, ValueError, TypeError, IndexError, KeyError, AssertionError):
        raise CronError(INVALID_EXPRESSION) from None
    return CronSchedule(expression, fields, timezone, tz)


def _estimate(field: str, single: int, span: int, per_day: int) -> int:
    """One step of the §2.3 heuristic for one field (see ``interval_minutes``)."""
    if field == "*":
        return single
    if field.startswith("*/") and field[2:].isdigit():
        return single * int(field[2:])
    items = field.count(",") + 1
    if items > 1:
        return per_day // items
    return span


@lru_cache(maxsize=4096)
def interval_minutes(expression: str) -> int:
    """Upstream's estimate of the minutes between runs (upstream-api §2.3), exactly.

    Minute field: ``*`` → 1, ``*/n`` → n, a list of k > 1 items → 60 // k, anything
    else → 60. Below 60 that is the answer. Otherwise the hour field decides: ``*`` → 60,
    ``*/n`` → 60·n, a list of k > 1 items → 1440 // k, anything else → 1440. Day, month
    and weekday are ignored, so ``0-59 * * * *`` estimates 60 (upstream's loophole,
    kept for parity). Aliases are estimated through their five-field form.
    Raises ``CronError`` for expressions ``normalize`` refuses.
    """
    minute, hour = normalize(expression).split(" ", 2)[:2]
    m = _estimate(minute, 1, 60, 60)
    if m < 60:
        return m
    return _estimate(hour, 60, 1440, 1440)


def min_interval_error(expression: str, tier: str) -> str | None:
    """The tier rule (upstream-api §5): the message for ``cron_expression`` when the
    estimated interval is below what ``tier`` allows, else None."""
    minimum = MIN_INTERVAL_MINUTES.get(tier, MIN_INTERVAL_MINUTES["free"])
    if interval_minutes(expression) < minimum:
        return MIN_INTERVAL_MESSAGE
    return None


def grace_seconds(interval: int) -> int:
    """How late the last overdue slot may still run (engine §5.4): half the interval,
    at least 30 s, at most one hour."""
    return min(max(interval * 30, 30), 3600)
