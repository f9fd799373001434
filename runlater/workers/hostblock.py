"""Per (organization, host) back-off, local to one executor process.

Rules (upstream's, kept): a 429 blocks the host for its Retry-After (default 60 s,
capped at 1 h); a 5xx, timeout or transport error counts as a failure, and from the
third consecutive failure on every further one blocks again at the next step of
30 s → 60 s → 120 s → 300 s; any other answer resets the streak. A claimed execution
for a blocked host goes back to pending at the block's end without using an attempt.
"""

from __future__ import annotations

import time

STEPS = (30.0, 60.0, 120.0, 300.0)
STREAK = 3
DEFAULT_RATE_LIMIT_BLOCK = 60.0
MAX_BLOCK = 3600.0


class HostBlocker:
    def __init__(self, clock=time.time) -> None:
        self.clock = clock
        self._until: dict[tuple[object, str], float] = {}
        self._failures: dict[tuple[object, str], tuple[int, int]] = {}  # (count, escalation)

    def blocked_until(self, org: object, host: str) -> float | None:
        until = self._until.get((org, host))
        if until is None:
            return None
        if until <= self.clock():
            del self._until[(org, host)]
            return None
        return until

    def record(self, org: object, host: str, status: int | None, retry_after: float | None = None) -> None:
        """Feed one attempt's outcome: an HTTP status, or None for a transport error/timeout."""
        key = (org, host)
        if status == 429:
            wait = min(retry_after if retry_after else DEFAULT_RATE_LIMIT_BLOCK, MAX_BLOCK)
            self._until[key] = self.clock() + wait
            return
        if status is None or status >= 500:
            count, level = self._failures.get(key, (0, 0))
            count += 1
            if count >= STREAK:
                self._until[key] = self.clock() + STEPS[level]
                level = min(level + 1, len(STEPS) - 1)
            self._failures[key] = (count, level)
            return
        self._failures.pop(key, None)

    def sweep(self) -> None:
        now = self.clock()
        for key in [k for k, until in self._until.items() if until <= now]:
            del self._until[key]
