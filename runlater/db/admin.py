"""Administrative operations used by the command line: organisations and keys."""

from __future__ import annotations

import asyncpg

from runlater.core.apikeys import generate_key, generate_webhook_secret, hash_secret
from runlater.core.ids import uuid7
from runlater.db.queries import Q


async def create_key(conn: asyncpg.Connection, org_name: str, tier: str | None = None, name: str | None = None) -> str:
    """Create the organisation if needed and a key for it; return the raw key."""
    async with conn.transaction():
        org_id = await conn.fetchval(Q.ensure_organization, uuid7(), org_name, tier, generate_webhook_secret())
        key_id, secret = generate_key()
        await conn.execute(Q.create_key, uuid7(), org_id, name, key_id, hash_secret(secret))
    # organizations stays small, so autovacuum may never analyze it; without statistics
    # the planner assumes hundreds of rows and prices the executors' claim (which visits
    # every organization) far too high.
    await conn.execute("ANALYZE organizations")
    return f"{key_id}.{secret}"


async def revoke_key(conn: asyncpg.Connection, key_id: str) -> bool:
    return await conn.fetchval(Q.revoke_key, key_id) is not None


async def bootstrap_default(conn: asyncpg.Connection) -> str | None:
    """On a fresh database, create the ``default`` organisation and return a key for it."""
    exists = await conn.fetchval("SELECT 1 FROM organizations WHERE name = 'default'")
    if exists:
        return None
    return await create_key(conn, "default", "unlimited", name="created at first start")
