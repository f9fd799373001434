"""Per (organization, host) back-off, shared by every executor through notifications.

Each executor keeps the blocks in memory; when one starts a block it announces it on
the ``runlater_host_blocks`` channel and every executor (on any machine) applies it, so
a blocked host is not hammered by the executor that did not see the 429. Blocks are
not persisted: after a full restart a host is tried once more before it is blocked
again, as upstream does.

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

    def record(self, org: object, host: str, status: int | None, retry_after: float | None = None) -> float | None:
        """Feed one attempt's outcome: an HTTP status, or None for a transport error/timeout.

        Returns the end of a block this outcome started (epoch seconds), so the caller can
        tell the other executors; None when it started none.
        """
        key = (org, host)
        if status == 429:
            wait = min(retry_after if retry_after else DEFAULT_RATE_LIMIT_BLOCK, MAX_BLOCK)
            return self.block(org, host, self.clock() + wait)
        if status is None or status >= 500:
            count, level = self._failures.get(key, (0, 0))
            count += 1
            until = None
            if count >= STREAK:
                until = self.block(org, host, self.clock() + STEPS[level])
                level = min(level + 1, len(STEPS) - 1)
            self._failures[key] = (count, level)
            return until
        self._failures.pop(key, None)
        return None

    def block(self, org: object, host: str, until: float) -> float:
        """Block until ``until`` (never shortening a longer block already in place)."""
        key = (org, host)
        current = self._until.get(key, 0.0)
        if until > current:
            self._until[key] = until
        return self._until[key]

    def sweep(self) -> None:
        now = self.clock()
        for key in [k for k, until in self._until.items() if until <= now]:
            del self._until[key]
