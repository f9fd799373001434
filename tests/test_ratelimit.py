"""Rate limits: the shared counters across forked processes, then the real server.

The server tests use their own server with small limits and a one-hour window, so that a test
(well under a second of traffic) cannot straddle two windows; ``_clear_of_window_edge`` waits
out the last seconds of an hour if a test happens to start there.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest

from conftest import Client, ServerProcess, make_org
from runlater.cache.ratelimit import NoFreeColumn, RateCounters, identity_tag
from runlater.cache.shm import SharedRegion

# -- running code in several processes at once --------------------------------------------------


def run_forked(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run ``fn(i)`` in ``n`` forked children started together; return their JSON results.

    Each child blocks on one byte of a "go" pipe that the parent fills once all exist, so they
    really run at the same time. A child's exception comes back as its traceback.
    """
    go_r, go_w = os.pipe()
    children: list[tuple[int, int]] = []
    for i in range(n):
        res_r, res_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(go_w)
                os.close(res_r)
                os.read(go_r, 1)
                out = {"ok": fn(i)}
            except BaseException:  # noqa: BLE001 - reported to the parent
                out = {"error": traceback.format_exc()}
                code = 1
            view = memoryview(json.dumps(out).encode())
            while view:
                view = view[os.write(res_w, view):]
            os._exit(code)
        os.close(res_w)
        children.append((pid, res_r))
    os.close(go_r)
    os.write(go_w, b"x" * n)
    os.close(go_w)
    results = []
    for pid, res_r in children:
        chunks = []
        while chunk := os.read(res_r, 65536):
            chunks.append(chunk)
        os.close(res_r)
        os.waitpid(pid, 0)
        out = json.loads(b"".join(chunks) or b'{"error": "child died without a result"}')
        if "error" in out:
            raise AssertionError("child failed:\n" + out["error"])
        results.append(out["ok"])
    return results


# -- the shared counters --------------------------------------------------------------------------

T0 = 1_800_000_000.0  # the start of a 60 s window (divisible by 60)


def _table(slots: int = 256, columns: int = 6, probe: int = 8, window: float = 60.0):
    region = SharedRegion.anonymous(RateCounters.region_size(slots, columns))
    return region, RateCounters(region, slots=slots, columns=columns, probe=probe, window=window)


def test_exactly_limit_admissions_across_processes():
    region, table = _table()
    tag = identity_tag(b"key", b"hammered")
    limit = 5000
    now = time.time()

    def child(i: int) -> int:
        e = table.entry(tag, now)
        return sum(table.hit(e, limit, now) is None for _ in range(3000))

    admitted = run_forked(4, child)
    assert sum(admitted) == limit, admitted
    assert sum(a > 0 for a in admitted) >= 2, admitted  # they did overlap
    assert table.counts(tag, now) == (limit, 0)
    table.close()
    region.close()


def test_exact_when_every_process_sits_near_the_limit():
    # limit below the margin: every admission takes the locked door.
    region, table = _table()
    tag = identity_tag(b"key", b"small")
    now = time.time()
    assert table.margin > 10

    def child(i: int) -> int:
        e = table.entry(tag, now)
        return sum(table.hit(e, 10, now) is None for _ in range(50))

    assert sum(run_forked(4, child)) == 10
    table.close()
    region.close()


def test_identities_are_counted_apart():
    region, table = _table()
    a = table.entry(identity_tag(b"key", b"a"), T0)
    b = table.entry(identity_tag(b"ip", b"a"), T0)
    assert a[0] != b[0]
    assert [table.hit(a, 3, T0) for _ in range(4)][:3] == [None] * 3
    assert table.hit(b, 3, T0) is None
    table.close()
    region.close()


def test_sliding_window_weights_the_previous_window():
    region, table = _table()
    e = table.entry(identity_tag(b"key", b"slide"), T0)
    assert sum(table.hit(e, 100, T0 + 1) is None for _ in range(150)) == 100
    # Halfway through the next window the previous one still weighs half: 50 more fit.
    assert sum(table.hit(e, 100, T0 + 90) is None for _ in range(100)) == 50
    assert table.counts(e[2], T0 + 90) == (50, 100)
    # A window later the first one no longer counts at all.
    assert table.counts(e[2], T0 + 121) == (0, 50)
    table.close()
    region.close()


def test_wait_is_the_time_until_one_more_request_fits():
    region, table = _table()
    e = table.entry(identity_tag(b"key", b"wait"), T0)
    for _ in range(10):
        assert table.hit(e, 10, T0 + 15) is None
    # Full at a quarter of the window: the next request fits once this window's 10 requests
    # weigh 9 in the next one, i.e. at 1/10 into it: 45 s + 6 s.
    wait = table.hit(e, 10, T0 + 15)
    assert wait == pytest.approx(51.0)
    assert table.hit(e, 10, T0 + 15 + wait + 0.01) is None
    table.close()
    region.close()


def test_refused_requests_are_not_counted():
    region, table = _table()
    e = table.entry(identity_tag(b"key", b"refused"), T0)
    for _ in range(50):
        table.hit(e, 5, T0)
    assert table.counts(e[2], T0) == (5, 0)
    table.close()
    region.close()


def test_a_dead_workers_column_and_counts_pass_to_its_replacement():
    region, table = _table(columns=2)
    tag = identity_tag(b"key", b"takeover")
    now = time.time()
    table.close()  # the parent holds no column: the children use both

    def child(i: int) -> int:
        t = RateCounters(region, slots=256, columns=2, probe=8, window=60.0)
        e = t.entry(tag, now)
        for _ in range(7):
            assert t.hit(e, 1000, now) is None
        return t.column

    # Children that overlap hold different columns; one that starts after the other exited
    # takes over the freed column 0 and adds to its counts.
    assert all(c in (0, 1) for c in run_forked(2, child))
    # Both children exited, so their columns are free again, and their counts remain.
    t = RateCounters(region, slots=256, columns=2, probe=8, window=60.0)
    assert t.column == 0
    assert t.counts(tag, now) == (14, 0)
    e = t.entry(tag, now)
    assert t.hit(e, 15, now) is None
    assert t.hit(e, 15, now) is not None
    t.close()
    region.close()


def test_no_free_column_when_every_column_is_held():
    region, table = _table(columns=1)
    with pytest.raises(NoFreeColumn):
        RateCounters(region, slots=256, columns=1, probe=8, window=60.0)
    table.close()
    region.close()


def test_layout_mismatch_is_refused():
    region, table = _table(columns=2)
    with pytest.raises(ValueError, match="columns"):
        RateCounters(region, slots=256, columns=1, probe=8, window=60.0)
    with pytest.raises(ValueError, match="param"):
        RateCounters(region, slots=256, columns=2, probe=8, window=30.0)
    table.close()
    region.close()


def test_full_probe_window_until_a_slot_goes_stale():
    region, table = _table(slots=4, probe=4)
    entries = [table.entry(identity_tag(b"key", str(i).encode()), T0) for i in range(4)]
    for e in entries:
        assert table.hit(e, 10, T0) is None
    assert table.entry(identity_tag(b"key", b"late"), T0) is None  # all four slots active
    assert table.entry(identity_tag(b"key", b"late"), T0 + 60) is None  # still counted as previous
    late = table.entry(identity_tag(b"key", b"late"), T0 + 120)  # two windows on: stale, reusable
    assert late is not None
    assert table.hit(late, 10, T0 + 120) is None
    # The identity whose slot was taken finds itself a new one (here: none is left) and is
    # admitted uncounted rather than counted into someone else's slot.
    moved = [e for e in entries if e[0] == late[0]][0]
    assert table.hit(moved, 10, T0 + 120) is None
    assert table.counts(late[2], T0 + 120) == (1, 0)
    table.close()
    region.close()


def test_a_forked_child_takes_its_own_column():
    region, table = _table(columns=3)
    assert table.column == 0
    now = time.time()

    def child(i: int) -> int:
        table.entry(identity_tag(b"key", b"x"), now)
        return table.column

    # Never the parent's column (fcntl locks are not inherited); children that overlap get
    # different ones, children that do not may reuse a column freed by an exited one.
    assert all(c in (1, 2) for c in run_forked(2, child))
    table.close()
    region.close()


def test_leases_count_ahead_and_are_given_back():
    region, table = _table(columns=2)
    assert table.lease_min_limit <= 10_000
    e = table.entry(identity_tag(b"key", b"lease"), T0)
    for _ in range(5):
        assert table.hit(e, 10_000, T0) is None
    assert table.counts(e[2], T0) == (table.lease, 0)  # one lease counted, four of it used
    assert table.return_leases() == 1
    assert table.counts(e[2], T0) == (5, 0)
    # A small limit never leases: counts are exact at every moment.
    f = table.entry(identity_tag(b"key", b"small"), T0)
    for _ in range(5):
        table.hit(f, 600, T0)
    assert table.counts(f[2], T0) == (5, 0) and table.return_leases() == 0
    table.close()
    region.close()


def test_an_expired_lease_leaves_only_real_requests_in_the_previous_window():
    region, table = _table(columns=2)
    e = table.entry(identity_tag(b"key", b"expire"), T0)
    for _ in range(3):
        assert table.hit(e, 10_000, T0 + 59) is None
    assert table.hit(e, 10_000, T0 + 61) is None  # next window: the lease is given back first
    table.return_leases()
    assert table.counts(e[2], T0 + 61) == (1, 3)
    table.close()
    region.close()


def test_exact_with_leases_once_they_are_given_back():
    # Far from the limit the children lease; near it they go one by one. Unused leases count
    # until given back, so the children give theirs back at the end, and then the parent can
    # take exactly what is left: all admissions together equal the limit.
    region, table = _table(columns=6)
    tag = identity_tag(b"key", b"leased")
    limit = 12_000
    now = time.time()
    assert limit >= table.lease_min_limit

    def child(i: int) -> int:
        e = table.entry(tag, now)
        n = sum(table.hit(e, limit, now) is None for _ in range(4000))
        table.return_leases()
        return n

    children = sum(run_forked(4, child))
    e = table.entry(tag, now)
    parent = sum(table.hit(e, limit, now) is None for _ in range(limit))
    table.return_leases()
    assert children + parent == limit, (children, parent)
    assert table.counts(tag, now) == (limit, 0)
    table.close()
    region.close()


def _guard(**settings_kw):
    from runlater.core.settings import Settings
    from runlater.http.limits import LimitsGuard, SharedLimits

    settings = Settings(http_workers=1, **settings_kw)
    return LimitsGuard(SharedLimits(settings), db=None, settings=settings)  # type: ignore[arg-type]


def _req(client: str = "10.0.0.1", **headers: str):
    from runlater.http.messages import Request

    return Request("GET", "/health", "", dict(headers), b"", client)


def test_guard_answers_429_with_headers_and_skips_unlimited():
    import uuid as _uuid

    from runlater.http.auth import AuthContext

    guard = _guard(rate_limit_free=2, rate_limit_unlimited=0)
    free = AuthContext(_uuid.uuid4(), _uuid.uuid4(), "free")
    assert guard.admit(_req(), free) is None and guard.admit(_req(), free) is None
    refused = guard.admit(_req(), free)
    assert refused is not None and refused.status == 429
    assert json.loads(refused.body) == {"error": "Rate limit exceeded. Try again later."}
    headers = dict(refused.headers)
    assert headers[b"x-ratelimit-limit"] == b"2" and headers[b"x-ratelimit-remaining"] == b"0"
    assert int(headers[b"retry-after"]) >= 1
    assert int(headers[b"x-ratelimit-reset"]) >= int(time.time()) + 1
    unlimited = AuthContext(_uuid.uuid4(), _uuid.uuid4(), "unlimited")
    assert all(guard.admit(_req(), unlimited) is None for _ in range(100))


def test_client_address_behind_a_trusted_proxy():
    guard = _guard(rate_limit_ip=1, trusted_proxies=("10.0.0.1",))
    # From the proxy: counted under the address it saw (the last X-Forwarded-For entry).
    assert guard.admit(_req("10.0.0.1", **{"x-forwarded-for": "6.6.6.6, 1.2.3.4"}), None) is None
    assert guard.admit(_req("10.0.0.1", **{"x-forwarded-for": "7.7.7.7, 1.2.3.4"}), None).status == 429
    assert guard.admit(_req("10.0.0.1", **{"x-forwarded-for": "1.2.3.5"}), None) is None
    # From anyone else the header is ignored: it could be forged.
    assert guard.admit(_req("10.9.9.9", **{"x-forwarded-for": "1.2.3.6"}), None) is None
    assert guard.admit(_req("10.9.9.9", **{"x-forwarded-for": "1.2.3.7"}), None).status == 429


# -- the real server --------------------------------------------------------------------------------

WINDOW = 3600
LIMITS = {"free": 20, "pro": 30, "ip": 20}


@pytest.fixture(scope="module")
def limited(pg_dsn):
    srv = ServerProcess(pg_dsn, http_workers=2, env={
        "RUNLATER_RATE_LIMIT_FREE": str(LIMITS["free"]),
        "RUNLATER_RATE_LIMIT_PRO": str(LIMITS["pro"]),
        "RUNLATER_RATE_LIMIT_IP": str(LIMITS["ip"]),
        "RUNLATER_RATE_LIMIT_WINDOW": str(WINDOW),
    })
    srv.wait_ready()
    yield srv
    srv.stop()


def _clear_of_window_edge(margin: float = 20.0) -> None:
    # Not a synchronisation sleep: the limit is per clock window, so a burst must not straddle
    # two of them. Only runs in the last seconds of an hour.
    left = WINDOW - time.time() % WINDOW
    if left < margin:
        time.sleep(left + 0.5)


def _hammer(srv: ServerProcess, key: str | None, path: str, total: int, connections: int = 16):
    """``total`` requests over ``connections`` keep-alive connections at once."""
    results: list[tuple[int, dict[str, str], Any]] = []
    lock = threading.Lock()
    start = threading.Barrier(connections)
    per = [total // connections + (1 if i < total % connections else 0) for i in range(connections)]

    def worker(n: int) -> None:
        client = Client("127.0.0.1", srv.port, key)
        start.wait()
        for _ in range(n):
            got = client.get(path)
            with lock:
                results.append(got)

    threads = [threading.Thread(target=worker, args=(n,)) for n in per]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _assert_refusals(refused, limit: int) -> None:
    assert refused
    for status, headers, doc in refused:
        assert status == 429
        assert doc == {"error": "Rate limit exceeded. Try again later."}
        retry = int(headers["retry-after"])
        assert 1 <= retry <= 2 * WINDOW
        assert headers["x-ratelimit-limit"] == str(limit)
        assert headers["x-ratelimit-remaining"] == "0"
        reset = int(headers["x-ratelimit-reset"])
        assert abs(reset - (time.time() + retry)) <= 5


def test_key_limit_is_exact_across_two_workers(limited, pg_dsn):
    _clear_of_window_edge()
    org = make_org(pg_dsn, "free")
    results = _hammer(limited, org.key, "/api/v1/tasks", total=6 * LIMITS["free"])
    ok = [r for r in results if r[0] == 200]
    assert len(ok) == LIMITS["free"]
    _assert_refusals([r for r in results if r[0] != 200], LIMITS["free"])
    # Admitted answers carry no rate-limit headers (see runlater.http.limits).
    assert all("x-ratelimit-limit" not in headers for _, headers, _ in ok)
    # Another key of another organization has its own budget.
    other = make_org(pg_dsn, "free")
    assert Client("127.0.0.1", limited.port, other.key).get("/api/v1/tasks")[0] == 200


def test_limit_follows_the_tier(limited, pg_dsn):
    _clear_of_window_edge()
    org = make_org(pg_dsn, "pro")
    results = _hammer(limited, org.key, "/api/v1/tasks", total=3 * LIMITS["pro"])
    assert sum(1 for r in results if r[0] == 200) == LIMITS["pro"]
    _assert_refusals([r for r in results if r[0] != 200], LIMITS["pro"])


def test_unlimited_tier_is_never_limited(limited, pg_dsn):
    org = make_org(pg_dsn, "unlimited")
    results = _hammer(limited, org.key, "/api/v1/tasks", total=5 * LIMITS["free"])
    assert [r[0] for r in results] == [200] * len(results)


def test_retry_after_is_honest(limited, pg_dsn):
    _clear_of_window_edge()
    org = make_org(pg_dsn, "free")
    client = Client("127.0.0.1", limited.port, org.key)
    for _ in range(LIMITS["free"]):
        assert client.get("/api/v1/tasks")[0] == 200
    status, headers, _ = client.get("/api/v1/tasks")
    assert status == 429
    # A full window on a fresh key: the next request fits once this window's count weighs
    # limit-1 in the next one, i.e. at the window's end plus 1/limit of a window.
    left = WINDOW - time.time() % WINDOW
    expected = left + WINDOW / LIMITS["free"]
    assert math.isclose(int(headers["retry-after"]), expected, abs_tol=3)


def test_public_routes_are_limited_per_client_ip(limited, pg_dsn):
    _clear_of_window_edge()
    results = _hammer(limited, None, "/health", total=3 * LIMITS["ip"], connections=8)
    ok = [r for r in results if r[0] == 200]
    assert len(ok) == LIMITS["ip"]
    assert all(doc == {"status": "ok", "database": "connected"} for _, _, doc in ok)
    _assert_refusals([r for r in results if r[0] != 200], LIMITS["ip"])
    # Keys are limited per key, not per address: this address's exhausted budget does not matter.
    org = make_org(pg_dsn, "free")
    assert Client("127.0.0.1", limited.port, org.key).get("/api/v1/tasks")[0] == 200
