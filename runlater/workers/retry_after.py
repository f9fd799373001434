"""Parsing of the ``Retry-After`` response header (RFC 9110 §10.2.3), honoured per DECISIONS 11.

Upstream meant to honour it but never did (its parser received a list where it expected a string).
We accept both forms the RFC allows and the two obsolete date formats recipients must still read:

* delta-seconds: a positive decimal integer (``0`` means "no hint", so it yields None);
* HTTP-date: IMF-fixdate ``Sun, 06 Nov 1994 08:49:37 GMT``, RFC 850
  ``Sunday, 06-Nov-94 08:49:37 GMT`` and asctime ``Sun Nov  6 08:49:37 1994``.

Anything else — fractions, negative numbers, unknown months, dates not in the future — is None,
so the caller falls back to its own backoff. The one-hour cap of DECISIONS 11 is the caller's
policy; pass ``cap`` to apply it here.
"""

from __future__ import annotations

import calendar
import re
import time

_MONTHS = {
    name: index
    for index, name in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
    )
}
_TIME = r"(\d{2}):(\d{2}):(\d{2})"
_IMF_FIXDATE = re.compile(
    r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), (\d{2}) ([A-Z][a-z]{2}) (\d{4}) " + _TIME + r" GMT"
)
_RFC850 = re.compile(
    r"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday), "
    r"(\d{2})-([A-Z][a-z]{2})-(\d{2}) " + _TIME + r" GMT"
)
_ASCTIME = re.compile(
    r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) ([A-Z][a-z]{2}) ([ \d]\d) " + _TIME + r" (\d{4})"
)


def _epoch(year: int, month_name: str, day: int, hh: str, mm: str, ss: str) -> float | None:
    month = _MONTHS.get(month_name)
    if month is None:
        return None
    hour, minute, second = int(hh), int(mm), int(ss)
    # Range checks first: timegm would silently roll "31 Feb" or "25:00" into another day.
    if not (1 <= day <= calendar.monthrange(year, month)[1]):
        return None
    if hour > 23 or minute > 59 or second > 60:  # 60: leap second
        return None
    return float(calendar.timegm((year, month, day, hour, minute, min(second, 59), 0, 0, 0)))


def _rfc850_year(two_digits: int, now: float) -> int:
    # RFC 9110 §5.6.7: a two-digit year more than 50 years in the future means the past century.
    this_year = time.gmtime(now).tm_year
    year = this_year - this_year % 100 + two_digits
    if year > this_year + 50:
        year -= 100
    return year


def parse_http_date(value: str, now: float | None = None) -> float | None:
    """Seconds since the epoch for an HTTP-date in any of the three RFC 9110 formats, else None."""
    m = _IMF_FIXDATE.fullmatch(value)
    if m:
        day, month, year, hh, mm, ss = m.groups()
        return _epoch(int(year), month, int(day), hh, mm, ss)
    m = _RFC850.fullmatch(value)
    if m:
        day, month, yy, hh, mm, ss = m.groups()
        year = _rfc850_year(int(yy), time.time() if now is None else now)
        return _epoch(year, month, int(day), hh, mm, ss)
    m = _ASCTIME.fullmatch(value)
    if m:
        month, day, hh, mm, ss, year = m.groups()
        return _epoch(int(year), month, int(day), hh, mm, ss)
    return None


def parse_retry_after(value: str | None, now: float, cap: float | None = None) -> float | None:
    """Seconds to wait according to a ``Retry-After`` value, or None when it gives no usable hint.

    ``now`` is the current wall-clock time (``time.time()``), needed for the date form.
    A positive result is capped at ``cap`` seconds when ``cap`` is given.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():
        seconds: float | None = float(int(value))
    else:
        when = parse_http_date(value, now)
        seconds = None if when is None else when - now
    if seconds is None or seconds <= 0:
        return None
    if cap is not None and seconds > cap:
        return cap
    return seconds
