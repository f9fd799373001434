"""Judging a delivery and planning its retry: pure functions, no I/O.

Messages are upstream's, verbatim, so stored histories read the same.
"""

from __future__ import annotations

MAX_STORED_BODY = 256 * 1024
MAX_RETRY_AFTER = 3600.0


def parse_expected_codes(raw: str | None) -> frozenset[int] | None:
    if not raw:
        return None
    codes = frozenset(int(part) for part in raw.split(",") if part.strip())
    return codes or None


def judge(status: int, body: str, expected_codes: str | None, pattern: str | None) -> tuple[str, str | None]:
    """Return (status, error_message) for an HTTP response."""
    codes = parse_expected_codes(expected_codes)
    if codes is None:
        if not 200 <= status < 300:
            return "failed", f"HTTP {status}"
    elif status not in codes:
        return "failed", f"Assertion failed: status {status} not in [{expected_codes}]"
    if pattern and pattern not in body:
        return "failed", f'Assertion failed: response body does not contain "{pattern}"'
    return "success", None


def retry_delay(attempt: int, status_code: int | None, retry_after: float | None) -> float:
    """Seconds until the next attempt after failing attempt ``attempt`` (1-based).

    Retry-After is honoured for 429 and 503 answers (capped at one hour); otherwise the
    quadratic back-off (attempt + 1)² × 30 s: 2 min, 4.5 min, 8 min, …
    """
    if retry_after is not None and status_code in (429, 503):
        return min(retry_after, MAX_RETRY_AFTER)
    return float((attempt + 1) ** 2 * 30)


def should_retry(schedule_type: str | None, attempt: int, retry_attempts: int | None) -> bool:
    """Only one-time tasks retry; total attempts = retry_attempts + 1."""
    return schedule_type == "once" and retry_attempts is not None and attempt <= retry_attempts


def decode_body(raw: bytes) -> str:
    """Stored response text: raw bytes as UTF-8 with replacement, at most 256 KiB of input."""
    return raw[:MAX_STORED_BODY].decode("utf-8", "replace").replace("\x00", "\ufffd")
