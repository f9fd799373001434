"""Monthly execution quotas: the shared counters across forked processes, then the real server."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import pytest

from conftest import Client, ServerProcess, make_org, wait_until
from runlater.cache.ratelimit import QuotaCounters, month_bounds, month_index
from runlater.cache.shm import SharedRegion
from test_ratelimit import run_forked

LIMIT_EXCEEDED = {"error": {"code": "limit_exceeded", "message": "Monthly execution limit would be exceeded"}}

# -- the shared counters --------------------------------------------------------------------------

MONTH = month_index(1_800_000_000.0)


def _table(slots: int = 64, columns: int = 6):
    region = SharedRegion.anonymous(QuotaCounters.region_size(slots, columns))
    table = QuotaCounters(region, slots=slots, columns=columns, probe=min(slots, 32), max_step=10)
    return region, table


def test_exactly_limit_across_processes():
    region, table = _table()
    org = uuid.uuid4()
    table.apply(MONTH, [], {}, 0.0)
    limit = 3000  # far above the lock-free margin at first, then within it

    def child(i: int) -> int:
        e = table.entry(org, MONTH)
        return sum(bool(table.consume(e, 1, limit, MONTH)) for _ in range(1500))

    admitted = run_forked(4, child)
    assert sum(admitted) == limit, admitted
    e = table.entry(org, MONTH)
    assert table.usage(e, MONTH) == limit
    table.close()
    region.close()


def test_batches_count_whole_and_reaching_the_limit_exactly_is_allowed():
    region, table = _table()
    org = uuid.uuid4()
    table.apply(MONTH, [], {}, 0.0)
    e = table.entry(org, MONTH)
    assert table.consume(e, 99, 100, MONTH) is True
    assert table.consume(e, 2, 100, MONTH) is False  # would be 101
    assert table.consume(e, 1, 100, MONTH) is True  # exactly 100
    assert table.consume(e, 1, 100, MONTH) is False
    assert table.consume(e, 500, 10_000, MONTH) is True  # larger than max_step: locked door
    assert table.usage(e, MONTH) == 600
    table.close()
    region.close()


def test_refresh_adds_the_database_base_and_keeps_unflushed_counts():
    region, table = _table()
    org, other = uuid.uuid4(), uuid.uuid4()
    table.apply(MONTH, [], {}, 0.0)
    e = table.entry(org, MONTH)
    assert table.consume(e, 7, 1000, MONTH)
    collected = table.collect(MONTH)
    assert [(c[1], c[2], c[3]) for c in collected] == [(org, 7, 7)]  # organization, sum, delta
    assert table.consume(e, 3, 1000, MONTH)  # admitted while the refresh is in flight
    # The database now knows our 7 plus 500 from elsewhere; it also reports another org.
    assert table.apply(MONTH, collected, {org: 507, other: 42}, 1.0) == 0
    assert table.usage(e, MONTH) == 510  # 507 + the 3 not flushed yet
    assert table.usage(table.entry(other, MONTH), MONTH) == 42
    # Next refresh sends only the 3.
    collected = table.collect(MONTH)
    assert {c[1]: c[3] for c in collected} == {org: 3, other: 0}
    table.apply(MONTH, collected, {org: 510, other: 42}, 2.0)
    assert table.usage(e, MONTH) == 510
    assert table.refreshed_at == 2.0
    table.close()
    region.close()


def test_a_new_month_starts_from_zero():
    region, table = _table()
    org = uuid.uuid4()
    table.apply(MONTH, [], {}, 0.0)
    e = table.entry(org, MONTH)
    table.apply(MONTH, table.collect(MONTH), {org: 90}, 0.0)
    assert table.consume(e, 10, 100, MONTH)
    assert table.consume(e, 1, 100, MONTH) is False
    assert table.consume(e, 100, 100, MONTH + 1) is True
    assert table.usage(e, MONTH + 1) == 100
    table.close()
    region.close()


def test_stale_slots_are_reused_and_current_ones_are_not():
    region, table = _table(slots=2)
    table.apply(MONTH, [], {}, 0.0)
    orgs = [uuid.uuid4() for _ in range(3)]
    a, b = table.entry(orgs[0], MONTH), table.entry(orgs[1], MONTH)
    assert table.consume(a, 1, 10, MONTH) and table.consume(b, 1, 10, MONTH)
    assert table.entry(orgs[2], MONTH) is None
    c = table.entry(orgs[2], MONTH + 1)  # a new month: both slots are stale
    assert c is not None and c[0] in (a[0], b[0])
    # The organization that lost its slot is told to look itself up again.
    moved, kept = (a, b) if c[0] == a[0] else (b, a)
    assert table.consume(moved, 1, 10, MONTH + 1) is None
    assert table.consume(kept, 1, 10, MONTH + 1) is True
    assert table.consume(c, 1, 10, MONTH + 1) is True
    table.close()
    region.close()


def test_leases_on_large_limits_count_ahead_and_are_given_back():
    region = SharedRegion.anonymous(QuotaCounters.region_size(64, 2))
    table = QuotaCounters(region, slots=64, columns=2, max_step=10, lease=8)
    table.apply(MONTH, [], {}, 0.0)
    e = table.entry(uuid.uuid4(), MONTH)
    big = 1_000_000
    assert big >= table.lease_min_limit
    assert table.consume(e, 1, big, MONTH) is True
    assert table.usage(e, MONTH) == 9  # 1 created + 8 leased
    for _ in range(8):
        assert table.consume(e, 1, big, MONTH) is True  # from the lease: no shared memory
    assert table.usage(e, MONTH) == 9
    assert table.consume(e, 3, big, MONTH) is True  # a new lease
    assert table.return_leases() == 1
    assert table.usage(e, MONTH) == 12  # exactly what was admitted
    # Below lease_min_limit every admission is counted as it is made (with the server's
    # defaults, lease 64 and at least 4 columns, that includes the free tier's 10,000).
    assert table.lease_min_limit == 100 * 2 * 8
    f = table.entry(uuid.uuid4(), MONTH)
    assert table.consume(f, 1, 1000, MONTH) and table.usage(f, MONTH) == 1
    table.close()
    region.close()


def test_exact_with_leases_once_they_are_given_back():
    region = SharedRegion.anonymous(QuotaCounters.region_size(64, 6))
    table = QuotaCounters(region, slots=64, columns=6, max_step=10, lease=8)
    table.apply(MONTH, [], {}, 0.0)
    org = uuid.uuid4()
    limit = 6000
    assert limit >= table.lease_min_limit

    def child(i: int) -> int:
        e = table.entry(org, MONTH)
        n = sum(bool(table.consume(e, 1, limit, MONTH)) for _ in range(2000))
        table.return_leases()
        return n

    children = sum(run_forked(4, child))
    e = table.entry(org, MONTH)
    parent = sum(bool(table.consume(e, 1, limit, MONTH)) for _ in range(limit))
    table.return_leases()
    assert children + parent == limit
    assert table.usage(e, MONTH) == limit
    table.close()
    region.close()


def test_month_bounds():
    start, end = month_bounds(month_index(1_800_000_000.0))  # 2027-01-15 08:00 UTC
    assert datetime.fromtimestamp(start, timezone.utc) == datetime(2027, 1, 1, tzinfo=timezone.utc)
    assert datetime.fromtimestamp(end, timezone.utc) == datetime(2027, 2, 1, tzinfo=timezone.utc)
    dec = month_index(datetime(2026, 12, 31, 23, 59, tzinfo=timezone.utc).timestamp())
    assert datetime.fromtimestamp(month_bounds(dec)[1], timezone.utc) == datetime(2027, 1, 1, tzinfo=timezone.utc)


# -- the real server --------------------------------------------------------------------------------

QUOTA_ENV = {"RUNLATER_QUOTA_PRO": "5", "RUNLATER_QUOTA_REFRESH": "0.2"}


@pytest.fixture(scope="module")
def quota_server(pg_dsn):
    srv = ServerProcess(pg_dsn, http_workers=2, env=QUOTA_ENV)
    srv.wait_ready()
    yield srv
    srv.stop()


def _create(client: Client) -> tuple[int, Any]:
    status, _, doc = client.post("/api/v1/tasks", {"url": "https://example.com/hook", "delay": "1h"})
    return status, doc


def _month_start() -> datetime:
    return datetime.fromtimestamp(month_bounds(month_index(time.time()))[0], timezone.utc)


def _wait_for_refresh(srv: ServerProcess, pg_dsn: str, sql) -> None:
    """Wait until the server has refreshed usage from the database at least once from now on:
    a probe organization put at its limit now is refused once a refresh has loaded it."""
    probe = make_org(pg_dsn, "free")
    sql("UPDATE organizations SET monthly_execution_count = 10000 WHERE id = $1", probe.id)
    client = Client("127.0.0.1", srv.port, probe.key)
    wait_until(lambda: _create(client)[0] == 422, timeout=10)


def test_free_org_at_9999_gets_one_more(quota_server, pg_dsn, sql):
    org = make_org(pg_dsn, "free")
    sql("UPDATE organizations SET monthly_execution_count = 9999 WHERE id = $1", org.id)
    _wait_for_refresh(quota_server, pg_dsn, sql)
    client = Client("127.0.0.1", quota_server.port, org.key)
    assert _create(client)[0] == 202
    status, doc = _create(client)
    assert status == 422 and doc == LIMIT_EXCEEDED
    # Every worker refuses it: try on several connections.
    for c in [Client("127.0.0.1", quota_server.port, org.key) for _ in range(6)]:
        assert _create(c) == (422, LIMIT_EXCEEDED)
    assert sql("SELECT count(*) FROM tasks WHERE organization_id = $1", org.id)[0][0] == 1


def test_quota_is_exact_across_workers_and_reaches_the_database(quota_server, pg_dsn, sql):
    org = make_org(pg_dsn, "pro")  # RUNLATER_QUOTA_PRO=5
    results: list[tuple[int, Any]] = []
    lock = threading.Lock()
    start = threading.Barrier(16)

    def worker() -> None:
        client = Client("127.0.0.1", quota_server.port, org.key)
        start.wait()
        for _ in range(3):
            got = _create(client)
            with lock:
                results.append(got)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(s for s, _ in results) == [202] * 5 + [422] * 43
    assert all(doc == LIMIT_EXCEEDED for s, doc in results if s == 422)
    assert sql("SELECT count(*) FROM tasks WHERE organization_id = $1", org.id)[0][0] == 5
    # The refresher adds the node's count to the month's row.
    wait_until(lambda: sql("SELECT created FROM execution_usage WHERE organization_id = $1 AND month = $2",
                           org.id, _month_start().date()) == [(5,)])


def test_other_nodes_usage_arrives_with_the_refresh(quota_server, pg_dsn, sql):
    org = make_org(pg_dsn, "pro")
    client = Client("127.0.0.1", quota_server.port, org.key)
    assert _create(client)[0] == 202
    # Another node (simulated) reports 4 more creations this month.
    sql("INSERT INTO execution_usage (organization_id, month, created) VALUES ($1, $2, 4) "
        "ON CONFLICT (organization_id, month) DO UPDATE SET created = execution_usage.created + 4",
        org.id, _month_start().date())
    _wait_for_refresh(quota_server, pg_dsn, sql)
    assert _create(client) == (422, LIMIT_EXCEEDED)  # 1 here + 4 elsewhere = the limit of 5
    assert sql("SELECT count(*) FROM tasks WHERE organization_id = $1", org.id)[0][0] == 1


def test_unlimited_tier_has_no_quota(quota_server, pg_dsn, sql):
    org = make_org(pg_dsn, "unlimited")
    sql("UPDATE organizations SET monthly_execution_count = 1000000000 WHERE id = $1", org.id)
    _wait_for_refresh(quota_server, pg_dsn, sql)
    client = Client("127.0.0.1", quota_server.port, org.key)
    assert [_create(client)[0] for _ in range(3)] == [202] * 3


def test_last_months_count_does_not_count(quota_server, pg_dsn, sql):
    org = make_org(pg_dsn, "free")
    sql("UPDATE organizations SET monthly_execution_count = 10000, "
        "monthly_execution_reset_at = $2::timestamptz - interval '1 month' WHERE id = $1", org.id, _month_start())
    _wait_for_refresh(quota_server, pg_dsn, sql)
    assert _create(Client("127.0.0.1", quota_server.port, org.key))[0] == 202


def test_usage_is_loaded_before_the_first_request(pg_dsn, sql):
    # Seeded before the server starts: the very first create already sees it. The server also
    # resets monthly counters that belong to an earlier month.
    full = make_org(pg_dsn, "free")
    sql("UPDATE organizations SET monthly_execution_count = 10000 WHERE id = $1", full.id)
    stale = make_org(pg_dsn, "free")
    sql("UPDATE organizations SET monthly_execution_count = 77, inserted_at = $2::timestamptz - interval '2 months', "
        "monthly_execution_reset_at = $2::timestamptz - interval '1 month' WHERE id = $1", stale.id, _month_start())
    srv = ServerProcess(pg_dsn, http_workers=2, env={"RUNLATER_QUOTA_REFRESH": "3600"})
    try:
        srv.wait_ready()
        assert _create(Client("127.0.0.1", srv.port, full.key)) == (422, LIMIT_EXCEEDED)
        rows = sql("SELECT monthly_execution_count, monthly_execution_reset_at FROM organizations "
                   "WHERE id = $1", stale.id)
        assert rows == [(0, _month_start())]
        rows = sql("SELECT monthly_execution_count FROM organizations WHERE id = $1", full.id)
        assert rows == [(10000,)]  # created this month, never reset: kept
    finally:
        srv.stop()
