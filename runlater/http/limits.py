"""Admission before a handler runs: request rate limits and monthly execution quotas.

Rate limits (DECISIONS 8)
    Per API key on authenticated routes (the limit of the key's tier), per client IP on public
    ones. Counted in shared memory by every worker of the node (``RateCounters``), so the limit
    is the node's, not each process's. Sliding window: the count of the current window plus the
    previous window's count weighted by the share of it still inside the last ``window``
    seconds. Upstream used a fixed window; the sliding estimate does not let a client send a
    whole limit's worth at the end of one window and again at the start of the next, and for a
    client that stays under its limit it is never stricter than a fixed window of twice the
    limit. Only admitted requests are counted, so a client that waits for ``Retry-After`` gets
    in. Tier ``unlimited`` is not counted at all.

    Over the limit: ``429 {"error":"Rate limit exceeded. Try again later."}`` with
    ``Retry-After`` (whole seconds until a request would be admitted if no other request is)
    and ``X-RateLimit-Limit``, ``X-RateLimit-Remaining`` (0) and ``X-RateLimit-Reset`` (epoch
    seconds of that moment). Only 429s carry these headers: an admitted request's answer is
    built by its handler (often before the limiter's numbers exist, as the batcher's prepared
    202), so adding headers to every answer would cost a list and four encodings per request.

    Cost: the counters need no lock and no system call on the common path; for large limits
    (pro) a worker counts 16 requests at a time and admits the next 15 from a local lease,
    so most requests touch no shared memory at all (``runlater.cache.ratelimit``, R5).
    Measured with bench/micro/test_ratelimit_bench.py on the project's 2-vCPU VM: 0.6 µs per
    admitted request with a lease, 2.2 µs without (small limits), 0.35 µs for ``unlimited``;
    the quota check adds 0.4 µs per create (2 µs without a lease).

    Behind a reverse proxy every client has the proxy's address. With
    ``RUNLATER_TRUSTED_PROXIES`` listing the proxies' addresses, a request from one of them is
    counted under the last ``X-Forwarded-For`` entry (the address the proxy saw).

Monthly execution quotas (DECISIONS 9)
    Every path that creates executions calls ``admit_executions(ctx, n)`` before creating
    them. The check costs no query: usage per organization and month lives in shared memory
    (``QuotaCounters``) as a base from the database plus the executions this node admitted
    since the base was read. One worker per node at a time (whichever gets the refresh lock)
    refreshes every ``quota_refresh`` seconds with one statement for all organizations
    (``quota_refresh`` in limits.sql): it adds the node's new admissions to
    ``execution_usage`` and reads back each limited organization's usage.

    What counts: executions *created* (first attempts; retries do not count), checked before
    they are created -- an admission whose insert then fails stays counted. Upstream counts
    first attempts *finished* (``organizations.monthly_execution_count``, which the executors
    still maintain); counting at creation is the conservative choice: a quota cannot be
    outrun by queueing far-future tasks, and usage never goes down because tasks are deleted.
    The base is the larger of the two figures, so executions created by a path that does not
    report here (older versions, a process without the shared memory) still count once they
    run. The executors only ever add to ``monthly_execution_count``; the refresher resets it
    at the start of each month (``quota_reset_monthly_counts``).

    Limits: free 10,000, pro 1,000,000 (upstream's pro limit never blocked; the contract says
    enforce it), unlimited none. Reaching the limit exactly is allowed. Over it:
    ``422 {"error":{"code":"limit_exceeded","message":"Monthly execution limit would be exceeded"}}``.
    Within a node the limit is exact; several nodes see each other's admissions only at the
    next refresh, so together they may exceed it by what they admit in one refresh interval.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import orjson

from runlater.cache.inflight import InflightTable
from runlater.cache.ratelimit import QuotaCounters, RateCounters, identity_tag, month_bounds, month_index
from runlater.cache.shm import SharedRegion
from runlater.core.aio import cancel_and_wait
from runlater.core.settings import Settings
from runlater.db.pool import Database
from runlater.db.queries import Q
from runlater.http.api import Guard
from runlater.http.auth import AuthContext
from runlater.http.errors import RATE_LIMITED_MESSAGE, ControllerError, ServiceUnavailable
from runlater.http.messages import Request, Response

log = logging.getLogger("runlater.limits")

_RATE_LIMITED_BODY = orjson.dumps({"error": RATE_LIMITED_MESSAGE})
# Cached entries per process (identities seen); cleared wholesale when this many.
_MAX_ENTRIES = 100_000
# How often each worker gives back the counts it leased but has not used (seconds).
LEASE_RETURN_INTERVAL = 0.5
# How long an identity that found no room in the rate table is admitted uncounted before
# its placement is tried again (each try takes the writer lock).
_UNTRACKED_RETRY = 1.0


class LimitExceeded(ControllerError):
    def __init__(self, value: Any = None) -> None:
        super().__init__(422, "limit_exceeded", "Monthly execution limit would be exceeded", value=value)


class SharedLimits:
    """The shared memory behind rate limits, quotas and in-flight idempotency keys.

    Created by the master before it forks (``runlater serve``), so every worker maps the same
    regions; each worker then builds its own ``LimitsGuard`` and ``IdempotencyLayer`` on them.
    """

    def __init__(self, settings: Settings, *, columns: int | None = None) -> None:
        # Every worker takes a column, and workers draining after a reload keep theirs until
        # they exit, so allow two per position plus spares.
        self.columns = columns if columns is not None else 2 * settings.http_workers + 2
        self.settings = settings
        self.rate_region = SharedRegion.anonymous(RateCounters.region_size(settings.rate_limit_slots, self.columns))
        self.quota_region = SharedRegion.anonymous(QuotaCounters.region_size(settings.quota_slots, self.columns))
        self.inflight_region = SharedRegion.anonymous(InflightTable.region_size(settings.idempotency_slots))


class LimitsGuard(Guard):
    """The real ``Guard``: see the module docstring."""

    def __init__(self, shared: SharedLimits, db: Database, settings: Settings, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.rates = RateCounters(shared.rate_region, slots=settings.rate_limit_slots, columns=shared.columns,
                                  window=settings.rate_limit_window)
        self.quota = QuotaCounters(shared.quota_region, slots=settings.quota_slots, columns=shared.columns)
        self._clock = clock
        self._key_limits = {
            "free": settings.rate_limit_free,
            "pro": settings.rate_limit_pro,
            "unlimited": settings.rate_limit_unlimited,
        }
        self._ip_limit = settings.rate_limit_ip
        self._quota_limits = {
            "free": settings.quota_free,
            "pro": settings.quota_pro,
            "unlimited": settings.quota_unlimited,
        }
        self._trusted = frozenset(settings.trusted_proxies)
        self.refresh_interval = settings.quota_refresh
        # identity (an AuthContext, which the authenticator reuses per key and tier, or a client
        # address) -> (RateCounters entry or None, limit; or 0 when not limited / retry deadline)
        self._entries: dict[Any, tuple[list | None, float]] = {}
        self._orgs: dict[AuthContext, list] = {}  # QuotaCounters entries, per key context
        self._month = -1
        self._month_end = 0.0
        self._task: asyncio.Task[None] | None = None
        self._last_untracked_log = 0.0

    # -- rate limits ------------------------------------------------------------------------

    def admit(self, req: Request, ctx: AuthContext | None) -> Response | None:
        ident: Any = ctx if ctx is not None else self._client(req)
        pair = self._entries.get(ident)
        if pair is None:
            pair = self._place(ident, ctx, self._clock())
        e, limit = pair
        if e is None:
            if limit == 0:
                return None  # not limited (tier unlimited, or a limit of 0)
            now = self._clock()
            if now < limit:
                return None  # no room in the table: admitted uncounted until ``limit``
            e, limit = self._place(ident, ctx, now)
            if e is None:
                return None
        else:
            now = self._clock()
            if e[5] and now < e[6]:
                e[5] -= 1  # a request of a lease this process holds (RateCounters, R5)
                return None
        wait = self.rates.hit(e, limit, now)
        if wait is None:
            return None
        return self._refuse(int(limit), wait, now)

    def _client(self, req: Request) -> str:
        client = req.client
        if self._trusted and client in self._trusted:
            forwarded = req.headers.get("x-forwarded-for")
            if forwarded:
                return forwarded.rsplit(",", 1)[-1].strip() or client
        return client

    def _place(self, ident: Any, ctx: AuthContext | None, now: float) -> tuple[list | None, float]:
        if ctx is None:
            limit = self._ip_limit
            tag_of = (b"ip", str(ident).encode())
        else:
            limit = self._key_limits.get(ctx.tier, self._key_limits["free"])
            tag_of = (b"key", ctx.api_key_id.bytes)
        if not limit:
            pair: tuple[list | None, float] = (None, 0)
        else:
            e = self.rates.entry(identity_tag(*tag_of), now)
            if e is None:
                if now - self._last_untracked_log > 60:
                    self._last_untracked_log = now
                    log.warning("rate-limit table full: requests of some clients are not counted; "
                                "raise RUNLATER_RATE_LIMIT_SLOTS")
                pair = (None, now + _UNTRACKED_RETRY)
            else:
                pair = (e, limit)
        if len(self._entries) >= _MAX_ENTRIES:
            self._entries.clear()
        self._entries[ident] = pair
        return pair

    @staticmethod
    def _refuse(limit: int, wait: float, now: float) -> Response:
        return Response(429, _RATE_LIMITED_BODY, [
            (b"retry-after", str(max(1, math.ceil(wait))).encode()),
            (b"x-ratelimit-limit", str(limit).encode()),
            (b"x-ratelimit-remaining", b"0"),
            (b"x-ratelimit-reset", str(math.ceil(now + wait)).encode()),
        ])

    # -- monthly quotas ----------------------------------------------------------------------

    def admit_executions(self, ctx: AuthContext, count: int) -> None:
        e = self._orgs.get(ctx)
        if e is not None and e[5] >= count and e[6] == self._month and count > 0:
            now = self._clock()
            if now < self._month_end:
                e[5] -= count  # executions of a lease this process holds (QuotaCounters, Q6)
                return
        limit = self._quota_limits.get(ctx.tier, self._quota_limits["free"])
        if not limit or count <= 0:
            return
        now = self._clock()
        if now >= self._month_end:
            self._set_month(now)
        quota = self.quota
        if not quota.loaded:
            raise ServiceUnavailable(1, cause="monthly usage not loaded yet")
        for _ in range(3):
            if e is None:
                e = quota.entry(ctx.organization_id, self._month)
                if e is None:
                    log.error("quota table full: cannot place organization %s; raise RUNLATER_QUOTA_SLOTS",
                              ctx.organization_id)
                    raise ServiceUnavailable(5, cause="quota table full")
                if len(self._orgs) >= _MAX_ENTRIES:
                    self._orgs.clear()
                self._orgs[ctx] = e
            ok = quota.consume(e, count, limit, self._month)
            if ok:
                return
            if ok is False:
                raise LimitExceeded(value=count)
            e = None  # the slot went stale and was reused: place the organization again
        raise ServiceUnavailable(1, cause="quota slot kept moving")

    def _set_month(self, now: float) -> None:
        self._month = month_index(now)
        self._month_end = month_bounds(self._month)[1]

    def usage(self, ctx: AuthContext) -> int:
        """This node's view of the organization's usage this month (for tests and diagnostics)."""
        month = month_index(self._clock())
        e = self.quota.entry(ctx.organization_id, month)
        return 0 if e is None else self.quota.usage(e, month)

    # -- the refresher -----------------------------------------------------------------------

    async def start(self, load_timeout: float = 30.0) -> None:
        """Load usage from the database before serving, then refresh in the background."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + load_timeout
        while not self.quota.loaded:
            try:
                if await self.refresh(force=True):
                    break
            except Exception as exc:  # retried until the deadline
                if loop.time() > deadline:
                    raise RuntimeError(f"could not load monthly usage: {exc}") from exc
            if loop.time() > deadline:
                raise RuntimeError("could not load monthly usage: another process holds the refresh lock")
            await asyncio.sleep(0.02)  # another worker is loading it
        self._task = loop.create_task(self._refresh_loop(), name="quota-refresh")

    async def stop(self, timeout: float = 2.0) -> None:
        """Stop refreshing; flush this node's counts once more (best effort)."""
        await cancel_and_wait(self._task)
        self._task = None
        self.rates.return_leases()
        self.quota.return_leases()
        try:
            await asyncio.wait_for(self.refresh(force=True), timeout)
        except Exception as exc:  # noqa: BLE001 - the next refresh of a live worker sends them
            log.debug("final quota flush skipped: %s", exc)

    async def _refresh_loop(self) -> None:
        # Every worker wakes up twice a second (or more often if the refresh interval is short):
        # it gives back its unused leases (see runlater.cache.ratelimit, R5 and Q6), and the
        # first worker to find the shared refresh time old enough and to get the refresh lock
        # refreshes usage for the node.
        pause = max(0.05, min(LEASE_RETURN_INTERVAL, self.refresh_interval / 4))
        while True:
            await asyncio.sleep(pause)
            self.rates.return_leases()
            self.quota.return_leases()
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep the last known usage; retry
                log.warning("monthly usage refresh failed: %s", exc)

    async def refresh(self, *, force: bool = False) -> bool:
        """One refresh if due (or ``force``) and no other process is doing one; True if done."""
        quota = self.quota
        if not force and self._clock() - quota.refreshed_at < self.refresh_interval:
            return False
        if not quota.try_refresh_lock():
            return False
        try:
            now = self._clock()
            if not force and now - quota.refreshed_at < self.refresh_interval:
                return False
            month = month_index(now)
            start = datetime.fromtimestamp(month_bounds(month)[0], timezone.utc)
            if quota.reset_for != month:
                await self.db.execute(Q.quota_reset_monthly_counts, start)
                quota.mark_reset(month)
            collected = quota.collect(month)
            sent = [(org, delta) for _, org, _, delta in collected if delta]
            rows = await self.db.fetch(Q.quota_refresh, start, start.date(),
                                       [org for org, _ in sent], [delta for _, delta in sent])
            used = {row["organization_id"]: row["used"] for row in rows}
            missing = quota.apply(month, collected, used, self._clock())
            if missing:
                log.error("quota table full: %d organizations with usage have no slot; "
                          "raise RUNLATER_QUOTA_SLOTS", missing)
            return True
        finally:
            quota.release_refresh_lock()
