"""``Idempotency-Key`` on authenticated mutations (upstream-api §3.5, DECISIONS 7).

A request that carries the header runs at most once per (organization, key) within ``ttl``
(24 h): its 2xx answer is stored and a later request with the same key gets that answer
verbatim (status and body) without running again.

Decisions, where upstream left room or was wrong:

* Methods: POST, PUT, PATCH and DELETE. Upstream also applied it to GET (and HEAD); replaying
  a stored read answers with stale data and storing every read costs a write per GET, while a
  read needs no protection from being repeated. A GET with the header is served normally.
* Scope: (organization, key), as upstream -- but a key reused for a different request (method,
  path, query or body differ: SHA-256 fingerprint) is refused with
  ``422 {"error":{"code":"idempotency_key_reused",...}}`` instead of silently replaying the
  first answer.
* A key longer than 255 characters: ``400 {"error":{"code":"invalid_params",...}}`` with a
  message that says so (upstream crashed with a 500). The controller shape rather than the
  framework's ``{"errors":{"detail":"Bad Request"}}``, because the framework shape tells the
  caller nothing about what to fix. Repeated headers are joined by the server with ", " and
  the result is the key.
* Age is checked on lookup: a row older than ``ttl`` is not replayed (upstream only deleted
  rows in a daily job, so keys lived 24-48 h), and the new answer replaces it.
* Only 2xx answers are stored (upstream too), so a corrected retry of a failed request runs.
* A duplicate that arrives while the first request is still running gets
  ``409 {"error": "Request in progress. Please wait and retry."}`` on every worker of the node
  (``InflightTable`` in shared memory), not only on the same process. The in-flight entry is
  taken *before* the lookup and released only after the answer is stored, so a retry either
  sees the stored answer or gets 409 -- never runs the action a second time on this node.
  Several nodes do not share the in-flight table: two nodes may both run a duplicate that
  arrives within the first one's running time; the store keeps the first answer.
* The store is a separate statement after the action's own transaction, so a crash between
  the two loses the key (the action stays done). The window is one round trip.

Cleanup: stored rows older than ``ttl`` are deleted in bounded batches by one worker per node
per ``cleanup_interval`` (1 h), starting when the node starts; see ``_cleanup_loop``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson

from runlater.cache.inflight import InflightFull, InflightTable
from runlater.core.aio import cancel_and_wait
from runlater.core.settings import Settings
from runlater.db.pool import Database
from runlater.db.queries import Q
from runlater.http.api import Idempotency, resolve
from runlater.http.auth import AuthContext
from runlater.http.errors import IN_FLIGHT_MESSAGE, InvalidParams, ServiceUnavailable
from runlater.http.messages import Request, Response, error_response

log = logging.getLogger("runlater.idempotency")

MAX_KEY_LENGTH = 255
_METHODS = frozenset(("POST", "PUT", "PATCH", "DELETE"))
IN_FLIGHT = Response(409, orjson.dumps({"error": IN_FLIGHT_MESSAGE}))
KEY_REUSED = error_response(
    422, "idempotency_key_reused",
    "Idempotency-Key was already used for a different request (method, path, query or body differ)",
)
KEY_TOO_LONG = InvalidParams(f"Idempotency-Key must be at most {MAX_KEY_LENGTH} characters")


def fingerprint(req: Request) -> bytes:
    """SHA-256 over method, path, query and body, NUL-separated so no two requests share one."""
    h = hashlib.sha256(req.method.encode())
    h.update(b"\0" + req.path.encode("utf-8", "surrogateescape") + b"\0")
    h.update(req.query.encode("latin-1", "replace") + b"\0")
    h.update(req.body)
    return h.digest()


def key_text(raw: str) -> str:
    """The header value as the client wrote it: the server decodes headers as Latin-1; a key in
    UTF-8 is re-read as UTF-8 so that its length counts characters, not bytes."""
    if raw.isascii():
        return raw
    try:
        return raw.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return raw


class IdempotencyLayer(Idempotency):
    def __init__(self, table: InflightTable, db: Database, *, ttl: float = 86400.0,
                 inflight_ttl: float = 120.0, cleanup_interval: float = 3600.0,
                 cleanup_batch: int = 5000, cleanup_rounds: int = 20,
                 clock: Callable[[], float] = time.time) -> None:
        self.table = table
        self.db = db
        self.ttl = ttl
        self.inflight_ttl = inflight_ttl
        self.cleanup_interval = cleanup_interval
        self.cleanup_batch = cleanup_batch
        self.cleanup_rounds = cleanup_rounds
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, table: InflightTable, db: Database, settings: Settings) -> IdempotencyLayer:
        return cls(table, db, ttl=settings.idempotency_ttl, inflight_ttl=settings.idempotency_inflight_ttl,
                   cleanup_interval=settings.idempotency_cleanup_interval)

    def applies(self, req: Request) -> bool:
        # Requests without the header (nearly all) pay one dict lookup.
        raw = req.headers.get("idempotency-key")
        return raw is not None and req.method in _METHODS and raw.strip() != ""

    async def run(self, req: Request, ctx: AuthContext, call: Callable[[], Any]) -> Response:
        key = key_text(req.headers["idempotency-key"].strip())
        if len(key) > MAX_KEY_LENGTH:
            return KEY_TOO_LONG.response()
        org = ctx.organization_id
        fp = fingerprint(req)
        try:
            handle = self.table.acquire(InflightTable.digest(org.bytes, key), self.inflight_ttl)
        except InflightFull:
            log.error("in-flight idempotency table full; raise RUNLATER_IDEMPOTENCY_SLOTS")
            return ServiceUnavailable(1, cause="in-flight table full").response()
        if handle is None:
            return IN_FLIGHT
        try:
            row = await self.db.fetchrow(Q.idempotency_lookup, org, key, self.ttl)
            if row is not None:
                if bytes(row["fingerprint"]) != fp:
                    return KEY_REUSED
                return Response(row["status_code"], bytes(row["response_body"]))
            response = await resolve(call())
            if 200 <= response.status < 300:
                try:
                    await self.db.execute(Q.idempotency_store, org, key, fp, response.status,
                                          response.body, self.ttl)
                except Exception as exc:  # noqa: BLE001 - the action is done; answer it anyway
                    log.warning("could not store idempotency key for %s: %s", org, exc)
            return response
        finally:
            self.table.release(handle)

    # -- cleanup -------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._cleanup_loop(), name="idempotency-cleanup")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _cleanup_loop(self) -> None:
        # Every worker checks once a minute (or per interval, if shorter); the shared "cleaned"
        # time lets exactly one of them run the cleanup per interval.
        pause = min(60.0, self.cleanup_interval)
        while True:
            try:
                if self.table.claim_cleanup(self.cleanup_interval, self._clock()):
                    deleted = await self.cleanup()
                    if deleted:
                        log.info("deleted %d expired idempotency keys", deleted)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - next interval tries again
                log.warning("idempotency cleanup failed: %s", exc)
            await asyncio.sleep(pause)

    async def cleanup(self) -> int:
        """Delete expired rows in batches; at most ``cleanup_rounds`` batches per call, so a huge
        backlog is worked off over several intervals instead of in one long burst."""
        total = 0
        for _ in range(self.cleanup_rounds):
            n = await self.db.fetchval(Q.idempotency_cleanup, self.ttl, self.cleanup_batch)
            total += n
            if n < self.cleanup_batch:
                break
        return total
