"""Per-request cost of the shared-memory rate limiter (and of the quota check on creates).

Run:  .venv/bin/pytest bench/micro/test_ratelimit_bench.py -p no:cacheprovider --benchmark-enable

``LimitsGuard.admit`` runs before every API request, so ``test_admit_*`` are the numbers that
matter: the whole per-request cost (identity lookup, clock, counters). The ``test_hit_*`` cases
time the counters alone, one per door (see ``runlater.cache.ratelimit``): far from the limit
(the common case, no lock), refused (over the limit: one read, no write, no lock), and near the
limit (the writer lock: two ``fcntl`` calls). "8 columns" puts the counts of eight processes in
the slot, as on an 8-worker node where every worker serves the same key.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from runlater.cache.ratelimit import QuotaCounters, RateCounters, identity_tag, month_index
from runlater.cache.shm import SharedRegion
from runlater.core.settings import Settings
from runlater.http.auth import AuthContext
from runlater.http.limits import LimitsGuard, SharedLimits
from runlater.http.messages import Request

HUGE = 10**9


@pytest.fixture
def rates() -> Iterator[RateCounters]:
    region = SharedRegion.anonymous(RateCounters.region_size(16384, 6))
    table = RateCounters(region, slots=16384, columns=6, window=60.0)
    yield table
    table.close()
    region.close()


def test_hit_far_from_limit(benchmark, rates: RateCounters) -> None:
    # Leases on (a large limit): 15 of 16 hits use the process's lease, 1 in 16 counts a new one.
    e = rates.entry(identity_tag(b"key", b"far"), time.time())
    assert benchmark(lambda: rates.hit(e, HUGE, time.time())) is None


def test_hit_far_from_limit_no_lease(benchmark) -> None:
    # Every hit reads the slot, publishes one increment and reads again (door 2).
    region = SharedRegion.anonymous(RateCounters.region_size(16384, 6))
    table = RateCounters(region, slots=16384, columns=6, window=60.0, lease=1)
    e = table.entry(identity_tag(b"key", b"far-no-lease"), time.time())
    assert benchmark(lambda: table.hit(e, HUGE, time.time())) is None
    table.close()
    region.close()


def test_hit_far_from_limit_8_columns_no_lease(benchmark) -> None:
    region = SharedRegion.anonymous(RateCounters.region_size(16384, 18))
    tag = identity_tag(b"key", b"far8")
    now = time.time()
    # Eight tables on one region in one process hold eight different columns.
    tables = [RateCounters(region, slots=16384, columns=18, window=60.0, lease=1) for _ in range(8)]
    for t in tables:
        t.hit(t.entry(tag, now), HUGE, now)
    table = tables[0]
    e = table.entry(tag, now)
    assert benchmark(lambda: table.hit(e, HUGE, time.time())) is None
    assert table.counts(tag, time.time())[0] >= 8
    for t in tables:
        t.close()
    region.close()


def test_hit_refused(benchmark, rates: RateCounters) -> None:
    e = rates.entry(identity_tag(b"key", b"over"), time.time())
    for _ in range(100):
        rates.hit(e, 50, time.time())
    assert benchmark(lambda: rates.hit(e, 50, time.time())) is not None


def test_hit_near_limit(benchmark, rates: RateCounters) -> None:
    # The limit moves up with every call, so each request is the last one that fits: the
    # locked door, every time.
    e = rates.entry(identity_tag(b"key", b"near"), time.time())
    limit = [0]

    def hit() -> float | None:
        limit[0] += 1
        return rates.hit(e, limit[0], time.time())

    assert benchmark(hit) is None


@pytest.fixture
def guard() -> Iterator[LimitsGuard]:
    settings = Settings(http_workers=2, rate_limit_pro=HUGE, quota_pro=HUGE)
    yield LimitsGuard(SharedLimits(settings), db=None, settings=settings)  # type: ignore[arg-type]


def _request() -> Request:
    return Request("GET", "/api/v1/tasks", "", {}, b"", "127.0.0.1")


def test_admit_pro_key(benchmark, guard: LimitsGuard) -> None:
    ctx = AuthContext(uuid.uuid4(), uuid.uuid4(), "pro")
    req = _request()
    assert benchmark(guard.admit, req, ctx) is None


def test_admit_unlimited_key(benchmark, guard: LimitsGuard) -> None:
    ctx = AuthContext(uuid.uuid4(), uuid.uuid4(), "unlimited")
    req = _request()
    assert benchmark(guard.admit, req, ctx) is None


def test_admit_client_ip(benchmark, guard: LimitsGuard) -> None:
    settings = Settings(http_workers=2, rate_limit_ip=HUGE)
    g = LimitsGuard(SharedLimits(settings), db=None, settings=settings)  # type: ignore[arg-type]
    req = _request()
    assert benchmark(g.admit, req, None) is None


@pytest.mark.parametrize("lease", [64, 0])
def test_quota_consume_far_from_limit(benchmark, lease: int) -> None:
    region = SharedRegion.anonymous(QuotaCounters.region_size(1024, 6))
    table = QuotaCounters(region, slots=1024, columns=6, lease=lease)
    month = month_index(time.time())
    table.apply(month, [], {}, 0.0)
    e = table.entry(uuid.uuid4(), month)
    assert benchmark(table.consume, e, 1, HUGE, month) is True
    table.close()
    region.close()


def test_admit_executions_pro(benchmark, guard: LimitsGuard) -> None:
    # What a create pays for the quota in the server: the guard's lookup, then the counters.
    guard.quota.apply(month_index(time.time()), [], {}, 0.0)
    ctx = AuthContext(uuid.uuid4(), uuid.uuid4(), "pro")
    benchmark(guard.admit_executions, ctx, 1)


# -- the seed-mix ceiling with the limiter counting vs. skipping, on one server -----------------
#
#   .venv/bin/python -m bench.micro.test_ratelimit_bench [--duration 20s] [--rounds 2]
#       [--connections 64] [--threads 2] [--http-workers 2] [--database-url URL]
#
# One server, one database (``runlater_bench_ratelimit``, dropped afterwards), two keys: one of an
# organization of tier ``pro`` with limits far above what the run can reach
# (RUNLATER_RATE_LIMIT_PRO=10**9, RUNLATER_QUOTA_PRO=10**12: every request is counted and every
# create pays the quota check, nothing is refused), one of tier ``unlimited`` (the guard returns
# before counting). wrk runs the seed mix (bench/wrk/seed_mix.lua) with each key in turn,
# ``--rounds`` times, alternating, so drift of the shared machine and of the growing tables hits
# both alike. Reported per run: req/s and the HTTP workers' CPU µs per request (the stable figure
# on a busy machine); the verdict compares the sums over all rounds. Uses bench.ceiling's helpers.

BENCH_DB_NAME = "runlater_bench_ratelimit"


def _ceiling_main(argv: list[str] | None = None) -> int:
    import argparse
    import asyncio
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from bench import ceiling as c

    p = argparse.ArgumentParser(prog="python -m bench.micro.test_ratelimit_bench")
    p.add_argument("--duration", type=c.parse_duration, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--http-workers", type=int, default=2)
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL") or c.DEFAULT_ADMIN_DSN)
    args = p.parse_args(argv)

    admin = args.database_url
    asyncio.run(c._admin(admin, f"DROP DATABASE IF EXISTS {BENCH_DB_NAME} WITH (FORCE)",
                         f"CREATE DATABASE {BENCH_DB_NAME}"))
    dsn = c.with_database(admin, BENCH_DB_NAME)
    env = {**os.environ, "DATABASE_URL": dsn}
    subprocess.run(c.runlater_cmd("migrate"), env=env, check=True, capture_output=True, timeout=120)

    def key(org: str, tier: str) -> str:
        out = subprocess.run(c.runlater_cmd("keys", "create", "--org", org, "--tier", tier), env=env,
                             check=True, capture_output=True, text=True, timeout=60)
        return out.stdout.strip().splitlines()[-1]

    keys = {"counted (pro)": key("bench-pro", "pro"), "skipped (unlimited)": key("bench-unlimited", "unlimited")}
    server = None
    rows: list[tuple[str, float, float, int]] = []
    workdir = Path(tempfile.mkdtemp(prefix="rlbench"))
    try:
        server = c.start_runlater(dsn, c.free_port(), args.http_workers, {
            "RUNLATER_RATE_LIMIT_PRO": str(10**9), "RUNLATER_QUOTA_PRO": str(10**12),
        }, workdir / "server.log")
        for label, k in keys.items():
            c.run_wrk(f"{label} warm-up", server.url, k, args.threads, args.connections, c.WARMUP_S)
        for r in range(args.rounds):
            for label, k in (keys.items() if r % 2 == 0 else reversed(keys.items())):
                meter = c.CpuMeter()
                meter.start(server.workers)
                try:
                    out, _ = c.run_wrk(label, server.url, k, args.threads, args.connections, args.duration)
                finally:
                    meter.stop()
                res = c.parse_wrk(label, out)
                if res.non2xx or res.errors:
                    raise c.BenchError(f"{label}: {res.non2xx} non-2xx, {res.errors} socket errors")
                rows.append((label, res.rps, meter.cpu * 1e6 / res.requests, res.requests))
                c.log(f"round {r + 1} {label}: {res.rps:,.0f} req/s, {rows[-1][2]:,.0f} µs CPU/request")
    finally:
        c.stop_runlater(server)
        asyncio.run(c._admin(admin, f"DROP DATABASE IF EXISTS {BENCH_DB_NAME} WITH (FORCE)"))
    print("| round | key | req/s | HTTP worker CPU µs/request |")
    print("|---:|---|---:|---:|")
    for i, (label, rps, us, _) in enumerate(rows):
        print(f"| {i // 2 + 1} | {label} | {rps:,.0f} | {us:,.0f} |")
    totals = {}
    for label, rps, us, n in rows:
        t = totals.setdefault(label, [0.0, 0.0, 0])
        t[0] += rps
        t[1] += us * n
        t[2] += n
    on, off = totals["counted (pro)"], totals["skipped (unlimited)"]
    # Each round ran both keys back to back: the ratio within a round cancels most of the drift.
    pairs = [(rows[i], rows[i + 1]) for i in range(0, len(rows) - 1, 2)]
    rps_ratios = sorted((a[1] / b[1]) if a[0].startswith("counted") else (b[1] / a[1]) for a, b in pairs)
    cpu_ratios = sorted((a[2] / b[2]) if a[0].startswith("counted") else (b[2] / a[2]) for a, b in pairs)
    median = lambda xs: (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2  # noqa: E731
    print(f"\nthroughput counted ÷ skipped: {on[0] / off[0]:.3f} over all rounds, "
          f"median of per-round ratios {median(rps_ratios):.3f} (range {rps_ratios[0]:.3f}-{rps_ratios[-1]:.3f})")
    print(f"CPU per request counted ÷ skipped: {(on[1] / on[2]) / (off[1] / off[2]):.3f} over all rounds, "
          f"median of per-round ratios {median(cpu_ratios):.3f} (range {cpu_ratios[0]:.3f}-{cpu_ratios[-1]:.3f})")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(_ceiling_main())
