"""The HTTP worker process: one uvloop loop serving the API on its own listener.

Started by the master after fork (``run``). Owns, for this process only: an asyncpg
pool, the insert batcher, a LISTEN connection for key revocations, and the listening
socket (SO_REUSEPORT, created here, after the fork). Stop order on SIGTERM: stop
accepting → finish in-flight requests → flush every pending batch → close the pool.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import asyncpg
import uvloop

from runlater.cache.inflight import InflightTable
from runlater.cache.keycache import KeyCache
from runlater.core.aio import cancel_and_wait
from runlater.core.settings import Settings
from runlater.db.batcher import InsertBatcher
from runlater.db.pool import Database, connect_pool
from runlater.db.queries import Q
from runlater.http.api import Api, _error_for, once_columns
from runlater.http.auth import Authenticator
from runlater.http.idempotency import IdempotencyLayer
from runlater.http.limits import LimitsGuard, SharedLimits
from runlater.http.protocol import ProtocolConfig
from runlater.http.server import serve

log = logging.getLogger("runlater.http")

KEYS_CHANNEL = "runlater_keys"


class KeyRevocationListener:
    """Drops revoked keys from the shared cache as soon as PostgreSQL announces them.

    Any process that sees the notification invalidates the shared entry, so it is gone
    for every worker at once. If the LISTEN connection breaks, notifications may have
    been missed: the whole cache is cleared on reconnect, which keeps the guarantee
    (a revoked key stops working within seconds) at the price of one lookup per key.
    """

    def __init__(self, dsn: str, cache: KeyCache, auth: Authenticator, *, retry_interval: float = 0.5) -> None:
        self.dsn = dsn
        self.cache = cache
        self.auth = auth
        self.retry_interval = retry_interval
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="key-revocation-listener")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    def _on_notify(self, conn: object, pid: int, channel: str, payload: str) -> None:
        self.auth.invalidations += 1
        key_id = payload.encode()
        if 0 < len(key_id) <= 32:
            self.cache.invalidate(key_id)

    async def _run(self) -> None:
        first = True
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(self.dsn, timeout=5, server_settings={"application_name": "runlater-keys"})
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c: lost.set())
                await conn.add_listener(KEYS_CHANNEL, self._on_notify)
                if not first:
                    self.auth.invalidations += 1
                    self.cache.clear()
                first = False
                self.connected.set()
                await lost.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep retrying while the process lives
                log.debug("key listener: %s", exc)
            finally:
                self.connected.clear()
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(self.retry_interval)


async def _serve(settings: Settings, dsn: str, cache: KeyCache, index: int, heartbeat, ready,
                 limits: SharedLimits | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    pool = await connect_pool(dsn, size=settings.db_pool_size, application_name=f"runlater-http-{index}", min_size=2)
    db = Database(pool, acquire_timeout=settings.db_acquire_timeout, query_timeout=settings.db_query_timeout,
                  max_waiters=4 * settings.db_pool_size)
    batcher = InsertBatcher(
        db, Q.create_once_batch, once_columns, _error_for,
        max_rows=settings.batch_max_rows,
        max_inflight=settings.batch_max_inflight,
        max_backlog=settings.batch_max_backlog,
        max_wait=settings.batch_max_wait,
        name=f"create-batcher-{index}",
    )
    auth = Authenticator(cache, db)
    guard = idempotency = None
    if limits is not None:
        guard = LimitsGuard(limits, db, settings)
        await guard.start()  # monthly usage is loaded before the first request is admitted
        idempotency = IdempotencyLayer.from_settings(
            InflightTable(limits.inflight_region, slots=settings.idempotency_slots), db, settings)
        idempotency.start()
    api = Api(db, auth, batcher, guard=guard, idempotency=idempotency)
    listener = KeyRevocationListener(dsn, cache, auth)
    listener.start()
    config = ProtocolConfig(
        max_header_bytes=settings.max_header_bytes,
        max_body_bytes=settings.max_body_bytes,
        keepalive_timeout=settings.keepalive_timeout,
        header_timeout=settings.header_timeout,
        body_timeout=settings.body_timeout,
    )
    server = await serve(api.handle, config, settings.host, settings.port)

    async def beat() -> None:
        while True:
            heartbeat()
            await asyncio.sleep(1.0)

    beating = loop.create_task(beat(), name="heartbeat")
    ready()
    await stop.wait()

    server.close_listener()
    await server.drain(settings.graceful_timeout * 0.6)
    if not await batcher.drain(settings.graceful_timeout * 0.2):
        log.error("worker %d stopped with %d rows unflushed", index, batcher.backlog)
    log.info("worker %d: %d tasks created in %d statements", index, batcher.rows_committed, batcher.statements)
    beating.cancel()
    await listener.stop()
    if guard is not None:
        await guard.stop()
    if idempotency is not None:
        await idempotency.stop()
    await db.close()


def run(settings: Settings, dsn: str, cache: KeyCache, ctx, limits: SharedLimits | None = None) -> None:
    """Child entry point: serve until SIGTERM/SIGINT."""
    # A SIGHUP sent to the whole process group (a terminal hang-up, `kill -HUP -PGID`)
    # is the master's business: it replaces workers one by one.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    uvloop.run(_serve(settings, dsn, cache, ctx.index, ctx.heartbeat, ctx.ready, limits))
