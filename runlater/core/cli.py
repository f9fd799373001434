"""The ``runlater`` command line (see CONTRACT.md for the binding interface).

Exit codes: 0 success, 2 usage error (argparse), 1 anything else with a one-line
reason on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from runlater import __version__
from runlater.core import logs
from runlater.core.settings import Settings, SettingsError

log = logging.getLogger("runlater")


class CliError(Exception):
    """A failure to report as one line on stderr with exit code 1."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="runlater", description="Run HTTP requests later: a durable task API.")
    p.add_argument("--version", action="version", version=f"runlater {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="start the server (master, HTTP workers, executors)")
    s.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="port to bind (default 8080)")
    s.add_argument("--http-workers", type=int, default=None, help="HTTP worker processes (default: CPU count)")
    s.add_argument("--executors", type=int, default=None, help="executor processes (default 1; 0 = API only)")
    s.add_argument("--data-dir", default=None, help="embedded database directory (default ./.runlater)")

    m = sub.add_parser("migrate", help="apply pending database migrations and exit")
    m.add_argument("--data-dir", default=None, help="embedded database directory when DATABASE_URL is unset")

    k = sub.add_parser("keys", help="manage API keys")
    ksub = k.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    kc = ksub.add_parser("create", help="create an API key (and its organization if new); prints the key")
    kc.add_argument("--org", required=True, help="organization name")
    kc.add_argument("--tier", choices=("free", "pro", "unlimited"), default=None,
                    help="organization tier (default unlimited for a new organization)")
    kc.add_argument("--name", default=None, help="a label for the key")
    kc.add_argument("--data-dir", default=None)
    kr = ksub.add_parser("revoke", help="revoke an API key by its pk_live_… id")
    kr.add_argument("key_id")
    kr.add_argument("--data-dir", default=None)

    b = sub.add_parser("bench", help="load-testing tools")
    bsub = b.add_subparsers(dest="bench_command", required=True, metavar="TOOL")
    bl = bsub.add_parser("ladder", help="the seed load test at a ladder of rates (k6)")
    bl.add_argument("--rates", required=True)
    bl.add_argument("--duration", default="30s")
    bl.add_argument("--out", required=True)
    bl.add_argument("--url", default=None)
    bl.add_argument("--key", default=None)
    return p


@contextmanager
def database_dsn(settings: Settings) -> Iterator[str]:
    """Yield a DSN: DATABASE_URL, or the embedded server (started here if not running)."""
    if settings.database_url:
        yield settings.database_url
        return
    from runlater.db.embedded import EmbeddedPostgres, embedded_pid

    already_running = embedded_pid(settings.data_dir) is not None
    embedded = EmbeddedPostgres(settings.data_dir)
    try:
        dsn = embedded.start()
    except Exception as exc:
        raise CliError(f"cannot start the embedded PostgreSQL in {settings.data_dir}: {exc}") from exc
    try:
        yield dsn
    finally:
        if not already_running:
            embedded.stop()


async def _with_conn(dsn: str, fn):  # type: ignore[no-untyped-def]
    import asyncpg

    try:
        conn = await asyncpg.connect(dsn, timeout=10)
    except Exception as exc:
        raise CliError(f"cannot connect to the database: {exc}") from exc
    try:
        return await fn(conn)
    finally:
        await conn.close()


async def _prepare(dsn: str) -> str | None:
    from runlater.db import admin, migrate

    async def work(conn):  # type: ignore[no-untyped-def]
        await migrate.apply(conn)
        return await admin.bootstrap_default(conn)

    return await _with_conn(dsn, work)


def cmd_serve(args: argparse.Namespace) -> int:
    from runlater.cache.keycache import KeyCache
    from runlater.cache.shm import SharedRegion
    from runlater.core.master import ChildSpec, Supervisor, enable_reuseport_migration, raise_nofile_limit
    from runlater.http import worker as http_worker
    from runlater.http.limits import SharedLimits

    settings = Settings.from_env(
        host=args.host, port=args.port, http_workers=args.http_workers,
        executors=args.executors, data_dir=args.data_dir,
    )
    logs.configure(settings.log_level)
    raise_nofile_limit()
    enable_reuseport_migration()
    with database_dsn(settings) as dsn:
        key = asyncio.run(_prepare(dsn))
        if key is not None:
            print('created organization "default"; its API key (shown only once):', flush=True)
            print(f"  {key}", flush=True)
        # Created before any fork so every worker maps the same memory.
        cache = KeyCache(SharedRegion.anonymous(KeyCache.region_size()))
        limits = SharedLimits(settings)  # rate limits, quotas, in-flight idempotency keys
        specs = [ChildSpec("http worker", settings.http_workers,
                           lambda ctx: http_worker.run(settings, dsn, cache, ctx, limits))]
        if settings.executors:
            from runlater.workers import executor

            specs.append(ChildSpec("executor", settings.executors,
                                   lambda ctx: executor.run(settings, dsn, ctx)))

        def all_ready() -> None:
            print(f"listening on http://{settings.host}:{settings.port}", flush=True)

        supervisor = Supervisor(
            specs, on_all_ready=all_ready,
            heartbeat_timeout=settings.heartbeat_timeout, graceful_timeout=settings.graceful_timeout,
        )
        return supervisor.run()


def _settings_for_admin(args: argparse.Namespace) -> Settings:
    return Settings.from_env(data_dir=getattr(args, "data_dir", None))


def cmd_migrate(args: argparse.Namespace) -> int:
    from runlater.db import migrate

    settings = _settings_for_admin(args)
    logs.configure(settings.log_level)
    with database_dsn(settings) as dsn:
        applied = asyncio.run(_with_conn(dsn, migrate.apply))
    print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from runlater.db import admin, migrate

    settings = _settings_for_admin(args)
    logs.configure("warning")
    with database_dsn(settings) as dsn:
        if args.keys_command == "create":
            async def create(conn):  # type: ignore[no-untyped-def]
                await migrate.apply(conn)
                return await admin.create_key(conn, args.org, args.tier, args.name)

            print(asyncio.run(_with_conn(dsn, create)))
            return 0
        revoked = asyncio.run(_with_conn(dsn, lambda conn: admin.revoke_key(conn, args.key_id)))
        if not revoked:
            raise CliError(f"no active key {args.key_id!r}")
        print(f"revoked {args.key_id}", file=sys.stderr)
        return 0


def _import_ladder() -> Any:
    """``bench.ladder`` from the source checkout runlater runs from.

    The benchmarks live next to the package (``bench/``), not inside it: an installed
    ``runlater`` script does not have the checkout on ``sys.path`` (``python -m runlater``
    from the checkout does), so the checkout holding this package is added when it has them.
    """
    try:
        from bench import ladder
    except ImportError:
        root = Path(__file__).resolve().parents[2]
        if not (root / "bench" / "ladder.py").is_file():
            raise CliError("the bench tools are not installed (run from a source checkout)") from None
        sys.path.insert(0, str(root))
        sys.modules.pop("bench", None)
        from bench import ladder
    return ladder


def cmd_bench(args: argparse.Namespace) -> int:
    return _import_ladder().main(args)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "migrate":
            return cmd_migrate(args)
        if args.command == "keys":
            return cmd_keys(args)
        if args.command == "bench":
            return cmd_bench(args)
    except SettingsError as exc:
        print(f"runlater: {exc}", file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"runlater: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback, for operators
        if os.environ.get("RUNLATER_LOG_LEVEL") == "debug":
            raise
        print(f"runlater: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
