"""Time formatting shared by every place that renders a timestamp for clients."""

from __future__ import annotations

from datetime import UTC, datetime


def iso_seconds(ts: datetime) -> str:
    """UTC, whole seconds, ISO 8601 with "Z" — the API's one timestamp format.

    Built field by field rather than with ``strftime("%Y")``, which does not pad years
    before 1000 to four digits and would produce a timestamp clients cannot parse.
    """
    if ts.tzinfo is not None:
        ts = ts.astimezone(UTC)
    return (f"{ts.year:04d}-{ts.month:02d}-{ts.day:02d}"
            f"T{ts.hour:02d}:{ts.minute:02d}:{ts.second:02d}Z")
