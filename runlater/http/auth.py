"""API-key authentication backed by the shared-memory key cache.

Token format: ``Bearer pk_live_<24>.sk_live_<32>``. The database keeps only the
SHA-256 of the secret part; the comparison is constant-time. A cache hit (the common
case) costs one shared-memory read and one SHA-256 and never touches the database;
unknown key ids are cached as negative entries, so a flood of made-up keys costs one
query per key id per TTL, not one per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import uuid
from typing import Any

from runlater.cache.keycache import NEGATIVE, CachedKey, KeyCache
from runlater.db.pool import Database
from runlater.db.queries import Q

log = logging.getLogger("runlater.auth")

TIERS = ("free", "pro", "unlimited")
_TIER_CODE = {name: i for i, name in enumerate(TIERS)}
_sha256 = hashlib.sha256
_compare = hmac.compare_digest


class AuthContext:
    __slots__ = ("api_key_id", "organization_id", "tier")

    def __init__(self, api_key_id: uuid.UUID, organization_id: uuid.UUID, tier: str) -> None:
        self.api_key_id = api_key_id
        self.organization_id = organization_id
        self.tier = tier


class Unauthorized(Exception):
    def __init__(self, reason: str, key_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.key_id = key_id


def split_token(header: str | None) -> tuple[str, str]:
    """Return (key_id, secret) from an Authorization header value, or raise Unauthorized."""
    if header is None:
        raise Unauthorized("missing header")
    if not header.startswith("Bearer "):
        raise Unauthorized("wrong scheme")
    parts = header[7:].split(".")
    if len(parts) != 2:
        raise Unauthorized("bad format")
    key_id, secret = parts
    if (len(key_id) != 32 or not key_id.startswith("pk_live_") or not secret.startswith("sk_live_")
            or not key_id.isascii()):
        raise Unauthorized("bad format", key_id[:40])
    return key_id, secret


class Authenticator:
    def __init__(
        self,
        cache: KeyCache,
        db: Database,
        *,
        ttl: float = 60.0,
        touch_interval: float = 300.0,
    ) -> None:
        self.cache = cache
        self.db = db
        self.ttl = ttl
        self.touch_interval = touch_interval
        self._touched: dict[bytes, float] = {}
        # Bumped by the revocation listener; a lookup that raced with a revocation
        # must not put the key back into the cache.
        self.invalidations = 0
        self._contexts: dict[tuple[bytes, bytes, int], AuthContext] = {}

    def cached(self, header: str | None) -> AuthContext | None:
        """Authenticate from the cache alone: a context, None on a cache miss, or raise."""
        key_id, secret = split_token(header)
        kid = key_id.encode()
        entry = self.cache.get(kid)
        if entry is None:
            return None
        if entry is NEGATIVE:
            raise Unauthorized("unknown key", key_id)
        return self._check(kid, entry, secret)

    async def authenticate(self, header: str | None) -> AuthContext:
        ctx = self.cached(header)
        if ctx is not None:
            return ctx
        key_id, secret = split_token(header)
        kid = key_id.encode()
        seen = self.invalidations
        row = await self.db.fetchrow(Q.lookup_key, key_id)
        if row is None or row["revoked"]:
            self.cache.put_negative(kid, ttl=self.ttl)
            raise Unauthorized("unknown key" if row is None else "revoked key", key_id)
        entry = CachedKey(
            api_key_id=row["id"].bytes,
            organization_id=row["organization_id"].bytes,
            key_hash=bytes(row["key_hash"]),
            tier=_TIER_CODE.get(row["tier"], 0),
        )
        if seen == self.invalidations:
            self.cache.put(kid, entry, ttl=self.ttl)
        return self._check(kid, entry, secret)

    def _check(self, kid: bytes, entry: CachedKey, secret: str) -> AuthContext:
        if not _compare(_sha256(secret.encode()).digest(), entry.key_hash):
            raise Unauthorized("wrong secret", kid.decode())
        memo = (entry.api_key_id, entry.organization_id, entry.tier)
        ctx = self._contexts.get(memo)
        if ctx is None:
            if len(self._contexts) > 10_000:
                self._contexts.clear()
            ctx = AuthContext(uuid.UUID(bytes=entry.api_key_id), uuid.UUID(bytes=entry.organization_id),
                              TIERS[entry.tier] if entry.tier < len(TIERS) else "free")
            self._contexts[memo] = ctx
        self._maybe_touch(kid, ctx)
        return ctx

    def _maybe_touch(self, kid: bytes, ctx: AuthContext) -> None:
        now = time.monotonic()
        last = self._touched.get(kid)
        if last is not None and now - last < self.touch_interval:
            return
        self._touched[kid] = now
        asyncio.get_running_loop().create_task(self._touch(ctx.api_key_id), name="auth-touch-key")

    async def _touch(self, api_key_id: uuid.UUID) -> Any:
        try:
            await self.db.execute(Q.touch_key, api_key_id)
        except Exception as exc:  # noqa: BLE001 - bookkeeping must never fail a request
            log.debug("could not record key use: %s", exc)
