"""Settings: parsed once from the command line and the environment, validated, frozen.

Each component receives only the fields it uses (a ``ProtocolConfig``, a batcher's
limits, ...) rather than this object, so the dependency of every component on
configuration is visible in its constructor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


class SettingsError(ValueError):
    """A setting is missing, malformed, or conflicts with another one."""


def _env_int(env: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{name}={value} is outside {lo}..{hi}")
    return value


def _env_float(env: dict[str, str], name: str, default: float, lo: float, hi: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{name}={value} is outside {lo}..{hi}")
    return value


LOG_LEVELS = ("debug", "info", "warning")


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    http_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    executors: int = 1
    data_dir: Path = Path(".runlater")
    database_url: str | None = None  # None: start the embedded server in data_dir
    log_level: str = "info"
    allow_private_targets: bool = False

    # HTTP limits and timeouts (seconds / bytes)
    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 1024 * 1024
    keepalive_timeout: float = 5.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0

    # Database
    db_pool_size: int = 8
    db_acquire_timeout: float = 1.0  # a request waits at most this long for a connection → 503
    db_query_timeout: float = 3.0  # a connection held longer is dropped and the database marked down

    # Batching insert path
    batch_max_rows: int = 500
    batch_max_backlog: int = 20_000
    batch_max_inflight: int = 3
    batch_max_wait: float = 0.5  # oldest queued create older than this → new creates get 503

    # Executors
    executor_max_inflight: int = 5000  # deliveries in flight per executor process
    executor_max_per_origin: int = 512  # keep-alive connections per target origin
    executor_claim_batch: int = 500
    lease_margin: float = 60.0  # seconds a claim outlives its request timeout

    # Supervision
    heartbeat_timeout: float = 30.0
    graceful_timeout: float = 10.0

    # Rate limits: requests per window per API key (by tier) and per client IP on public
    # routes; 0 = no limit. Counted in shared memory by all workers of the node.
    rate_limit_free: int = 600
    rate_limit_pro: int = 60_000
    rate_limit_unlimited: int = 0
    rate_limit_ip: int = 6000
    rate_limit_window: float = 60.0
    rate_limit_slots: int = 16384
    trusted_proxies: tuple[str, ...] = ()  # peers whose X-Forwarded-For names the client

    # Monthly execution quotas by tier; 0 = no limit.
    quota_free: int = 10_000
    quota_pro: int = 1_000_000
    quota_unlimited: int = 0
    quota_refresh: float = 10.0  # seconds between syncs of the shared counters with the database
    quota_slots: int = 8192

    # Idempotency keys
    idempotency_ttl: float = 86400.0  # a stored answer is replayed this long
    idempotency_inflight_ttl: float = 120.0  # a crashed worker's in-flight key frees itself after this
    idempotency_slots: int = 4096
    idempotency_cleanup_interval: float = 3600.0

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise SettingsError(f"--port {self.port} must be within 1..65535")
        if not 1 <= self.http_workers <= 256:
            raise SettingsError(f"--http-workers {self.http_workers} must be within 1..256")
        if not 0 <= self.executors <= 256:
            raise SettingsError(f"--executors {self.executors} must be within 0..256")
        if self.log_level not in LOG_LEVELS:
            raise SettingsError(f"RUNLATER_LOG_LEVEL={self.log_level!r} must be one of {', '.join(LOG_LEVELS)}")
        if self.batch_max_inflight >= self.db_pool_size:
            raise SettingsError(
                f"RUNLATER_BATCH_MAX_INFLIGHT={self.batch_max_inflight} must be below "
                f"RUNLATER_DB_POOL_SIZE={self.db_pool_size}, or reads would starve behind batches"
            )
        if self.batch_max_backlog < self.batch_max_rows:
            raise SettingsError(
                f"RUNLATER_BATCH_MAX_BACKLOG={self.batch_max_backlog} must be at least "
                f"RUNLATER_BATCH_MAX_ROWS={self.batch_max_rows}"
            )

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **cli: object) -> "Settings":
        """Build settings from ``RUNLATER_*`` variables, with command-line values winning."""
        env = dict(os.environ if env is None else env)
        values: dict[str, object] = dict(
            database_url=env.get("DATABASE_URL") or None,
            log_level=(env.get("RUNLATER_LOG_LEVEL") or "info").lower(),
            allow_private_targets=env.get("RUNLATER_ALLOW_PRIVATE_TARGETS", "") in ("1", "true", "yes"),
            max_header_bytes=_env_int(env, "RUNLATER_MAX_HEADER_BYTES", 16 * 1024, 1024, 1 << 20),
            max_body_bytes=_env_int(env, "RUNLATER_MAX_BODY_BYTES", 1 << 20, 1024, 64 << 20),
            keepalive_timeout=_env_float(env, "RUNLATER_KEEPALIVE_TIMEOUT", 5.0, 0.1, 3600),
            header_timeout=_env_float(env, "RUNLATER_HEADER_TIMEOUT", 10.0, 0.1, 3600),
            body_timeout=_env_float(env, "RUNLATER_BODY_TIMEOUT", 30.0, 0.1, 3600),
            db_pool_size=_env_int(env, "RUNLATER_DB_POOL_SIZE", 8, 2, 500),
            db_acquire_timeout=_env_float(env, "RUNLATER_DB_ACQUIRE_TIMEOUT", 1.0, 0.05, 60),
            db_query_timeout=_env_float(env, "RUNLATER_DB_QUERY_TIMEOUT", 3.0, 0.1, 3600),
            batch_max_rows=_env_int(env, "RUNLATER_BATCH_MAX_ROWS", 500, 1, 10_000),
            batch_max_backlog=_env_int(env, "RUNLATER_BATCH_MAX_BACKLOG", 20_000, 1, 1_000_000),
            batch_max_inflight=_env_int(env, "RUNLATER_BATCH_MAX_INFLIGHT", 3, 1, 64),
            batch_max_wait=_env_float(env, "RUNLATER_BATCH_MAX_WAIT", 0.5, 0.01, 60),
            heartbeat_timeout=_env_float(env, "RUNLATER_HEARTBEAT_TIMEOUT", 30.0, 1, 3600),
            executor_max_inflight=_env_int(env, "RUNLATER_EXECUTOR_MAX_INFLIGHT", 5000, 1, 100_000),
            executor_max_per_origin=_env_int(env, "RUNLATER_EXECUTOR_MAX_PER_ORIGIN", 512, 1, 100_000),
            executor_claim_batch=_env_int(env, "RUNLATER_EXECUTOR_CLAIM_BATCH", 500, 1, 10_000),
            lease_margin=_env_float(env, "RUNLATER_LEASE_MARGIN", 60.0, 0.5, 3600),
            rate_limit_free=_env_int(env, "RUNLATER_RATE_LIMIT_FREE", 600, 0, 2**31),
            rate_limit_pro=_env_int(env, "RUNLATER_RATE_LIMIT_PRO", 60_000, 0, 2**31),
            rate_limit_unlimited=_env_int(env, "RUNLATER_RATE_LIMIT_UNLIMITED", 0, 0, 2**31),
            rate_limit_ip=_env_int(env, "RUNLATER_RATE_LIMIT_IP", 6000, 0, 2**31),
            rate_limit_window=_env_float(env, "RUNLATER_RATE_LIMIT_WINDOW", 60.0, 1, 86400),
            rate_limit_slots=_env_int(env, "RUNLATER_RATE_LIMIT_SLOTS", 16384, 64, 1 << 24),
            trusted_proxies=tuple(p.strip() for p in env.get("RUNLATER_TRUSTED_PROXIES", "").split(",") if p.strip()),
            quota_free=_env_int(env, "RUNLATER_QUOTA_FREE", 10_000, 0, 2**46),
            quota_pro=_env_int(env, "RUNLATER_QUOTA_PRO", 1_000_000, 0, 2**46),
            quota_unlimited=_env_int(env, "RUNLATER_QUOTA_UNLIMITED", 0, 0, 2**46),
            quota_refresh=_env_float(env, "RUNLATER_QUOTA_REFRESH", 10.0, 0.05, 3600),
            quota_slots=_env_int(env, "RUNLATER_QUOTA_SLOTS", 8192, 64, 1 << 24),
            idempotency_ttl=_env_float(env, "RUNLATER_IDEMPOTENCY_TTL", 86400.0, 1, 30 * 86400),
            idempotency_inflight_ttl=_env_float(env, "RUNLATER_IDEMPOTENCY_INFLIGHT_TTL", 120.0, 1, 86400),
            idempotency_slots=_env_int(env, "RUNLATER_IDEMPOTENCY_SLOTS", 4096, 64, 1 << 24),
            idempotency_cleanup_interval=_env_float(env, "RUNLATER_IDEMPOTENCY_CLEANUP_INTERVAL", 3600.0, 1, 86400),
        )
        values.update({k: v for k, v in cli.items() if v is not None})
        if "data_dir" in values:
            values["data_dir"] = Path(values["data_dir"])  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]
