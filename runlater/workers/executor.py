"""Executor process: claims due executions and delivers them, thousands at a time.

One uvloop loop per process. The claim loop takes due rows in batches with a single
statement (``claim_due``), starts one delivery task per row, and goes back for more
while rows keep coming and there is room under ``max_inflight``. When nothing is due
it sleeps until whichever comes first:

* a ``NOTIFY runlater_executions`` (sent at commit by every create), whose payload is
  the earliest due time of that batch: now → claim at once; later → arm a timer;
* the next due time known from the table (``next_due_at``) — a timer, not polling;
* a result flush (a finished row may unblock a serial queue or an organisation's cap);
* a safety tick (``idle_check``), which also releases expired leases.

Finished deliveries are buffered and written in batches (``record_results``), which
also inserts retries. Per-task and per-organisation counters are buffered too and
flushed every second. Graceful stop: no new claims, in-flight deliveries get until the
deadline, the rest are cancelled and their claims released without using an attempt.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson
import uvloop

from runlater import __version__
from runlater.core.ids import uuid7
from runlater.core.settings import Settings
from runlater.db.pool import Database, connect_pool
from runlater.db.queries import Q
from runlater.workers import outcome
from runlater.workers.hostblock import HostBlocker
from runlater.workers.httpclient import ClientError, HttpClient, RequestTimeout
from runlater.workers.notify import Notifier
from runlater.workers.retry_after import parse_retry_after
from runlater.workers.scheduler import Scheduler
from runlater.workers.signing import upstream_signature, webhook_headers

log = logging.getLogger("runlater.executor")

EXECUTIONS_CHANNEL = "runlater_executions"
_TIMER_MARGIN = 0.002
_JUST_DUE = 0.1
HOST_BLOCKS_CHANNEL = "runlater_host_blocks"
BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))


class Result:
    __slots__ = (
        "duration_ms",
        "error_message",
        "fence",
        "finished_at",
        "id",
        "response_body",
        "retry_at",
        "retry_id",
        "status",
        "status_code",
    )

    def __init__(self, row: Any, status: str, status_code: int | None, duration_ms: int | None,
                 response_body: str | None, error_message: str | None, finished_at: datetime,
                 retry_at: datetime | None) -> None:
        self.id = row["id"]
        self.fence = row["started_at"]
        self.status = status
        self.status_code = status_code
        self.duration_ms = duration_ms
        self.response_body = response_body
        self.error_message = error_message
        self.finished_at = finished_at
        self.retry_id = uuid7() if retry_at is not None else None
        self.retry_at = retry_at


class Counters:
    """Monthly execution counts per organization (first attempts), flushed in batches
    instead of one write per execution."""

    def __init__(self) -> None:
        self.orgs: dict[uuid.UUID, int] = {}

    def add(self, row: Any) -> None:
        if row["attempt"] == 1:
            org = row["organization_id"]
            self.orgs[org] = self.orgs.get(org, 0) + 1

    async def flush(self, db: Database) -> None:
        orgs, self.orgs = self.orgs, {}
        if not orgs:
            return
        try:
            ids = list(orgs)
            await db.execute(Q.flush_org_counts, ids, [orgs[i] for i in ids])
        except Exception as exc:  # noqa: BLE001 - keep the counts for the next flush
            log.warning("counter flush failed: %s", exc)
            for k, n in orgs.items():
                self.orgs[k] = self.orgs.get(k, 0) + n


class Executor:
    def __init__(
        self,
        db: Database,
        dsn: str,
        client: HttpClient,
        notifier: Notifier,
        *,
        claim_batch: int = 500,
        max_inflight: int = 5000,
        lease_margin: float = 60.0,
        result_batch: int = 500,
        result_linger: float = 0.005,
        idle_check: float = 1.0,
        name: str = "executor",
    ) -> None:
        self.db = db
        self.dsn = dsn
        self.client = client
        self.notifier = notifier
        self.claim_batch = claim_batch
        self.max_inflight = max_inflight
        self.lease_margin = lease_margin
        self.result_batch = result_batch
        self.result_linger = result_linger
        self.idle_check = idle_check
        self.name = name
        self.blocker = HostBlocker()
        self.counters = Counters()
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._results: list[Result] = []
        self._requeues: list[tuple[uuid.UUID, datetime, datetime]] = []
        self._results_ready = asyncio.Event()
        self._inflight: dict[uuid.UUID, tuple[asyncio.Task[None], Any]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._stopping = False
        self._tasks: list[asyncio.Task[Any]] = []
        self.delivered = 0

    # -- wake-ups -----------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def wake_at(self, epoch: float) -> None:
        """Arm (or bring forward) the timer for the next due time."""
        # Fire a little after the due time: the event loop's timers may run up to a
        # millisecond early, and a claim made before the row is due finds nothing.
        delay = epoch - time.time() + _TIMER_MARGIN
        if delay <= 0:
            self.wake()
            return
        when = self._loop.time() + delay
        if self._timer is not None and self._timer_at <= when:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._timer_fired)

    def _timer_fired(self) -> None:
        # Forget the fired handle, or the next wake_at would take it for a pending,
        # earlier timer and never arm its own.
        self._timer = None
        self._timer_at = 0.0
        self.wake()

    def _on_notify(self, conn: object, pid: int, channel: str, payload: str) -> None:
        try:
            self.wake_at(float(payload))
        except ValueError:
            self.wake()

    def _on_host_block(self, conn: object, pid: int, channel: str, payload: str) -> None:
        try:
            org, until, host = payload.split(" ", 2)
            self.blocker.block(uuid.UUID(org), host, float(until))
        except ValueError:
            log.debug("ignoring malformed host block %r", payload)

    def _announce_block(self, org: uuid.UUID, host: str, until: float) -> None:
        payload = f"{org} {until:.3f} {host}"
        if len(payload) < 7900:  # NOTIFY payloads are limited to 8000 bytes
            self._loop.create_task(self._notify_block(payload), name=f"{self.name}-announce-block")

    async def _notify_block(self, payload: str) -> None:
        try:
            await self.db.execute("SELECT pg_notify($1, $2)", HOST_BLOCKS_CHANNEL, payload)
        except Exception as exc:  # noqa: BLE001 - the local block still holds
            log.debug("could not announce host block: %s", exc)

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, ready: Callable[[], None] | None = None) -> None:
        listener = self._loop.create_task(self._listen(), name=f"{self.name}-listen")
        writer = self._loop.create_task(self._write_results(), name=f"{self.name}-results")
        housekeeping = self._loop.create_task(self._housekeeping(), name=f"{self.name}-housekeeping")
        if ready is not None:
            ready()
        claimer = self._loop.create_task(self._claim_loop(), name=f"{self.name}-claim")
        await stop.wait()
        # Stop order matters, and nothing that holds claimed rows or unwritten results is
        # cancelled: the claimer finishes its statement and stops (releasing anything it
        # claimed after the stop), in-flight deliveries get until the deadline, then the
        # writer drains every result before it exits.
        self._stopping = True
        self.wake()
        await asyncio.gather(claimer, return_exceptions=True)
        await self._finish_inflight(deadline=6.0)
        self._results_ready.set()
        await asyncio.gather(writer, return_exceptions=True)
        await self.counters.flush(self.db)
        for task in (listener, housekeeping):
            task.cancel()
        await asyncio.gather(listener, housekeeping, return_exceptions=True)
        await self.notifier.close()

    async def _finish_inflight(self, deadline: float) -> None:
        if self._inflight:
            tasks = [t for t, _ in self._inflight.values()]
            await asyncio.wait(tasks, timeout=deadline)
        leftover = list(self._inflight.values())
        for task, _ in leftover:
            task.cancel()
        if leftover:
            await asyncio.gather(*(t for t, _ in leftover), return_exceptions=True)
            await self._release([row for _, row in leftover])

    async def _release(self, rows: list[Any]) -> None:
        """Give claimed rows back to pending without using an attempt."""
        if not rows:
            return
        try:
            await self.db.execute(Q.release_claims, [r["id"] for r in rows], [r["started_at"] for r in rows])
            log.info("released %d unfinished claims", len(rows))
        except Exception as exc:  # noqa: BLE001 - their leases will expire instead
            log.warning("could not release claims (%s); their leases will expire", exc)

    async def _listen(self) -> None:
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(self.dsn, timeout=5,
                                             server_settings={"application_name": f"runlater-{self.name}-listen"})
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(EXECUTIONS_CHANNEL, self._on_notify)
                await conn.add_listener(HOST_BLOCKS_CHANNEL, self._on_host_block)
                self.wake()  # anything committed while we were not listening
                await lost.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                log.debug("listener: %s", exc)
            finally:
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(0.5)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(self.idle_check)
            self.wake()  # safety net: a lost notification costs at most one tick
            self.blocker.sweep()
            try:
                released = await self.db.fetch(Q.release_expired_leases)
                if released:
                    log.warning("%d expired leases returned to pending", len(released))
                    self.wake()
            except Exception as exc:  # noqa: BLE001
                log.debug("lease check failed: %s", exc)
            await self.counters.flush(self.db)

    # -- claiming -----------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            room = self.max_inflight - len(self._inflight)
            if room <= 0:
                await self._wake.wait()
                continue
            want = min(self.claim_batch, room)
            try:
                async with self.db.connection() as conn:
                    rows = await conn.fetch(Q.claim_due, want, self.lease_margin)
                    if len(rows) < want:
                        next_due = await conn.fetchval(Q.next_due_at)
                    else:
                        next_due = None
            except asyncpg.UniqueViolationError:
                continue  # two claims raced for one serial queue; the index refused one
            except Exception as exc:  # noqa: BLE001
                log.warning("claim failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            if self._stopping:
                await self._release(rows)
                return
            for row in rows:
                task = self._loop.create_task(self._deliver(row))
                self._inflight[row["id"]] = (task, row)
            if len(rows) == want:
                continue
            if next_due is not None:
                epoch = next_due.timestamp()
                now = time.time()
                if epoch > now:
                    self.wake_at(epoch)
                elif now - epoch < _JUST_DUE:
                    # Became due while the claim ran (or another executor holds it
                    # locked): look again shortly rather than at the next safety tick.
                    self.wake_at(now + _JUST_DUE / 4)
                # Older due rows we could not take (paused or busy queue, capped
                # organization) are retried on the next wake-up, not in a tight loop.
            await self._wake.wait()

    # -- delivery -----------------------------------------------------------------------

    async def _deliver(self, row: Any) -> None:
        try:
            await self._deliver_one(row)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("delivery of %s failed unexpectedly", row["id"])
            self._finish(row, "failed", None, None, None, "Internal error: delivery failed", final=True)
        finally:
            self._inflight.pop(row["id"], None)
            if len(self._inflight) == self.max_inflight - 1:
                self.wake()

    async def _deliver_one(self, row: Any) -> None:
        url = row["url"]
        if url is None:
            self._finish(row, "failed", None, None, None, "Internal error: execution or task not found", final=True)
            return
        org = row["organization_id"]
        host = urlsplit(url).hostname or ""
        until = self.blocker.blocked_until(org, host)
        if until is not None:
            self._requeue(row, until)
            return
        method = row["method"]
        body_text = row["body"]
        body = (body_text or "").encode() if method in BODY_METHODS else b""
        headers = build_headers(row, body)
        started = time.monotonic()
        status_code: int | None = None
        retry_after: float | None = None
        response_body: str | None = None
        try:
            resp = await self.client.request(
                method, url, headers, body if method in BODY_METHODS and body_text is not None else None,
                timeout=(row["timeout_ms"] or 30000) / 1000.0,
            )
        except RequestTimeout:
            status, error = "timeout", "Request timed out"
        except ClientError as exc:
            status, error = "failed", f"Transport error: {exc.reason}"
        else:
            status_code = resp.status
            response_body = outcome.decode_body(resp.body)
            for name, value in resp.headers:
                if name == "retry-after":
                    retry_after = parse_retry_after(value, time.time())
                    break
            status, error = outcome.judge(status_code, response_body, row["expected_status_codes"],
                                          row["expected_body_pattern"])
        duration_ms = int((time.monotonic() - started) * 1000)
        blocked = self.blocker.record(org, host, status_code, retry_after)
        if blocked is not None:
            self._announce_block(org, host, blocked)
        retry_at = None
        if status != "success" and outcome.should_retry(row["schedule_type"], row["attempt"], row["retry_attempts"]):
            delay = outcome.retry_delay(row["attempt"], status_code, retry_after)
            retry_at = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=delay)
        self._finish(row, status, status_code, duration_ms, response_body, error,
                     final=retry_at is None, retry_at=retry_at)

    def _finish(self, row: Any, status: str, status_code: int | None, duration_ms: int | None,
                response_body: str | None, error: str | None, *, final: bool,
                retry_at: datetime | None = None) -> None:
        finished_at = datetime.now(UTC)
        result = Result(row, status, status_code, duration_ms, response_body, error, finished_at, retry_at)
        self._results.append(result)
        if len(self._results) >= self.result_batch:
            self._results_ready.set()
        elif len(self._results) == 1:
            self._loop.call_later(self.result_linger, self._results_ready.set)
        self.delivered += 1
        if row["url"] is not None:
            self.counters.add(row)
            self.notifier.after_attempt(row, result, final)

    def _requeue(self, row: Any, until: float) -> None:
        at = datetime.fromtimestamp(until, UTC).replace(microsecond=0)
        self._requeues.append((row["id"], row["started_at"], at))
        self._results_ready.set()

    # -- result writing -----------------------------------------------------------------

    async def _write_results(self) -> None:
        while True:
            await self._results_ready.wait()
            self._results_ready.clear()
            await self._flush_results()
            if self._stopping and not self._inflight and not self._results and not self._requeues:
                return

    async def _flush_results(self) -> None:
        while self._results or self._requeues:
            batch, self._results = self._results[: self.result_batch], self._results[self.result_batch:]
            requeues, self._requeues = self._requeues, []
            try:
                async with self.db.connection() as conn:
                    if batch:
                        row = await conn.fetchrow(
                            Q.record_results,
                            [r.id for r in batch], [r.fence for r in batch], [r.status for r in batch],
                            [r.status_code for r in batch], [r.duration_ms for r in batch],
                            [r.response_body for r in batch], [r.error_message for r in batch],
                            [r.finished_at for r in batch], [r.retry_id for r in batch],
                            [r.retry_at for r in batch],
                        )
                        if row["next_retry"] is not None:
                            self.wake_at(float(row["next_retry"]))
                    if requeues:
                        await conn.execute(Q.requeue, [r[0] for r in requeues], [r[1] for r in requeues],
                                           [r[2] for r in requeues])
                        self.wake_at(min(r[2] for r in requeues).timestamp())
            except Exception as exc:  # noqa: BLE001 - keep results; retry shortly
                log.warning("writing %d results failed: %s", len(batch), exc)
                self._results[:0] = batch
                self._requeues[:0] = requeues
                if self._stopping:
                    return  # leases expire and return these rows to pending
                await asyncio.sleep(0.5)
                continue
            # A finished row can free a serial queue or an organisation's slot.
            self.wake()


def header_text(value: Any) -> str:
    """Header values may be any JSON value in a task; send them as text."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return orjson.dumps(value).decode()


def build_headers(row: Any, body: bytes) -> list[tuple[str, str]]:
    """Task headers first (stringified), then runlater's own, then signatures."""
    headers: list[tuple[str, str]] = []
    raw = row["headers"]
    if raw and raw != "{}":
        for name, value in orjson.loads(raw).items():
            headers.append((str(name), header_text(value)))
    task_id = str(row["task_id"])
    execution_id = str(row["id"])
    secret = row["webhook_secret"]
    secrets = [secret] if not row["webhook_secret_previous"] else [secret, row["webhook_secret_previous"]]
    headers.append(("x-runlater-task-id", task_id))
    headers.append(("x-runlater-execution-id", execution_id))
    headers.append(("x-runlater-signature", upstream_signature(secret, body)))
    headers.extend(webhook_headers(execution_id, int(time.time()), body, secrets))
    return headers


async def _main(settings: Settings, dsn: str, index: int, heartbeat: Callable[[], None],
                ready: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pool = await connect_pool(dsn, size=4, application_name=f"runlater-executor-{index}", min_size=2)
    db = Database(pool, acquire_timeout=5.0, query_timeout=30.0)
    client = HttpClient(allow_private=settings.allow_private_targets, user_agent=f"runlater/{__version__}",
                        max_per_origin=settings.executor_max_per_origin)
    notifier = Notifier(client, allow_private=settings.allow_private_targets)
    executor = Executor(db, dsn, client, notifier, name=f"executor-{index}",
                        max_inflight=settings.executor_max_inflight, claim_batch=settings.executor_claim_batch,
                        lease_margin=settings.lease_margin, idle_check=min(1.0, settings.lease_margin / 2))

    async def beat() -> None:
        while True:
            heartbeat()
            await asyncio.sleep(1.0)

    beating = loop.create_task(beat(), name="heartbeat")
    # Every executor contends for the one scheduler leadership (an advisory lock), so
    # cron keeps running while any executor anywhere is alive.
    # The tier limits are the same settings the API's quota check uses (0 = no limit).
    quotas = {"free": settings.quota_free, "pro": settings.quota_pro, "unlimited": settings.quota_unlimited}
    scheduler = Scheduler(dsn, name=f"scheduler-{index}",
                          monthly_limits={tier: (n or None) for tier, n in quotas.items()})
    scheduling = loop.create_task(scheduler.run(stop), name=f"scheduler-{index}")
    try:
        await executor.run(stop, ready)
    finally:
        stop.set()
        try:
            await asyncio.wait_for(scheduling, 5)
        except (TimeoutError, Exception):  # noqa: BLE001 - its session ends with us anyway
            scheduling.cancel()
        beating.cancel()
        await client.close()
        await db.close()


def run(settings: Settings, dsn: str, ctx: Any) -> None:
    # A SIGHUP sent to the whole process group (a terminal hang-up, `kill -HUP -PGID`)
    # is the master's business: it replaces workers one by one.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    uvloop.run(_main(settings, dsn, ctx.index, ctx.heartbeat, ctx.ready))
