"""Schema migrations: ``.sql`` files in ``migrations/`` applied in name order.

Every process that starts (``runlater serve`` on several machines, ``runlater migrate``)
may call ``apply`` at the same time; a session-level advisory lock serialises them so
each file runs exactly once. Each file runs in its own transaction together with the
row that records it, so a failed migration leaves no half-applied schema.
"""

from __future__ import annotations

import logging
from importlib import resources

import asyncpg

log = logging.getLogger("runlater.db")

# Arbitrary but fixed: the key of the advisory lock that serialises migrations.
MIGRATION_LOCK_KEY = 0x72756E6C_61746572 & 0x7FFFFFFFFFFFFFFF


def migration_files() -> list[tuple[str, str]]:
    folder = resources.files(__package__).joinpath("migrations")
    files = sorted((p.name, p) for p in folder.iterdir() if p.name.endswith(".sql"))
    return [(name.removesuffix(".sql"), p.read_text(encoding="utf-8")) for name, p in files]


async def apply(conn: asyncpg.Connection) -> list[str]:
    """Apply pending migrations; return the versions applied by this call."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        applied = []
        for version, sql in migration_files():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            log.info("applied migration %s", version)
            applied.append(version)
        if applied:
            # Fresh tables have no statistics; give the planner some at once.
            await conn.execute("ANALYZE")
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
