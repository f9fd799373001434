"""Idempotency-Key: the shared in-flight table across forked processes, then the real server."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
import uuid
from typing import Any

import asyncpg
import pytest

from conftest import Client, run, wait_until
from runlater.cache.inflight import InflightFull, InflightTable
from runlater.cache.shm import SharedRegion
from test_ratelimit import run_forked

IN_FLIGHT = {"error": "Request in progress. Please wait and retry."}

# -- the in-flight table ------------------------------------------------------------------------


def _table(slots: int = 64, probe: int = 8, clock=time.monotonic):
    region = SharedRegion.anonymous(InflightTable.region_size(slots))
    return region, InflightTable(region, slots=slots, probe=probe, clock=clock)


def test_one_winner_across_processes():
    region, table = _table()
    digest = InflightTable.digest(uuid.uuid4().bytes, "same-key")
    # Nobody releases, and nobody exits before everyone has tried: an exited holder is dead,
    # and a dead holder's key is free (I2), which is not what this test is about.
    everyone_tried = multiprocessing.Barrier(4)

    def child(i: int) -> int:
        won = any(table.acquire(digest, 60.0) is not None for _ in range(200))
        everyone_tried.wait(30)
        return int(won)

    assert sum(run_forked(4, child)) == 1
    region.close()


def test_release_frees_the_key_and_only_its_own_entry():
    now = [100.0]
    region, table = _table(clock=lambda: now[0])
    digest = InflightTable.digest(b"o" * 16, "k")
    first = table.acquire(digest, 10.0)
    assert first is not None and table.acquire(digest, 10.0) is None
    now[0] += 11  # expired: a crashed holder cannot keep it
    second = table.acquire(digest, 10.0)
    assert second is not None
    assert table.release(first) is False  # late release of the expired entry changes nothing
    assert table.held(digest)
    assert table.release(second) is True
    assert not table.held(digest)
    region.close()


def test_a_dead_holder_does_not_wedge_the_key():
    region, table = _table()
    digest = InflightTable.digest(b"o" * 16, "crash")

    def child(i: int) -> bool:
        return table.acquire(digest, 3600.0) is not None  # exits without releasing

    assert run_forked(1, child) == [True]
    assert table.acquire(digest, 3600.0) is not None
    region.close()


def test_keys_are_scoped_by_organization():
    region, table = _table()
    a = table.acquire(InflightTable.digest(b"a" * 16, "k"), 10.0)
    b = table.acquire(InflightTable.digest(b"b" * 16, "k"), 10.0)
    assert a is not None and b is not None
    region.close()


def test_full_window_is_reported():
    region, table = _table(slots=4, probe=4)
    held = [table.acquire(InflightTable.digest(b"o" * 16, str(i)), 10.0) for i in range(4)]
    assert all(held)
    with pytest.raises(InflightFull):
        table.acquire(InflightTable.digest(b"o" * 16, "one too many"), 10.0)
    table.release(held[0])
    assert table.acquire(InflightTable.digest(b"o" * 16, "one too many"), 10.0) is not None
    region.close()


def test_cleanup_is_claimed_once_per_interval():
    region, table = _table()

    def child(i: int) -> bool:
        return table.claim_cleanup(3600.0, 10_000.0)

    assert sum(run_forked(4, child)) == 1
    assert table.claim_cleanup(3600.0, 11_000.0) is False
    assert table.claim_cleanup(3600.0, 13_601.0) is True
    region.close()


# -- the real server --------------------------------------------------------------------------------

BODY = {"url": "https://example.com/hook", "delay": "1h"}


def _post(api: Client, key: str | None, body: Any = BODY, path: str = "/api/v1/tasks"):
    headers = {"idempotency-key": key} if key is not None else {}
    return api.post(path, body, headers=headers)


def _tasks(sql, org) -> int:
    return sql("SELECT count(*) FROM tasks WHERE organization_id = $1", org.id)[0][0]


def test_same_key_twice_replays_the_first_answer(api, org, sql):
    s1, _, d1 = _post(api, "create-1")
    s2, _, d2 = _post(api, "create-1")
    assert s1 == s2 == 202
    assert d1 == d2  # same task_id and execution_id: the action ran once
    assert _tasks(sql, org) == 1
    # Without the key, or with another key, a new task.
    assert _post(api, None)[2]["data"]["task_id"] != d1["data"]["task_id"]
    assert _post(api, "create-2")[2]["data"]["task_id"] != d1["data"]["task_id"]
    assert _tasks(sql, org) == 3


def test_replay_is_verbatim_and_keys_are_per_organization(server, api, org, other_org, sql):
    _, _, first = _post(api, "shared-key")
    other = server.client().with_key(other_org.key)
    _, _, theirs = _post(other, "shared-key")
    assert theirs["data"]["task_id"] != first["data"]["task_id"]
    stored = sql("SELECT status_code, response_body FROM idempotency_keys WHERE organization_id = $1 "
                 "AND key = 'shared-key'", org.id)
    assert len(stored) == 1 and stored[0][0] == 202
    status, headers, raw = api.request("POST", "/api/v1/tasks", BODY, headers={"idempotency-key": "shared-key"})
    assert status == 202 and headers["content-type"] == "application/json; charset=utf-8"
    assert raw == first


def test_reuse_for_a_different_request_is_refused(api, org, sql):
    assert _post(api, "reused")[0] == 202
    for changed in ({"url": "https://example.com/other", "delay": "1h"},):
        status, _, doc = _post(api, "reused", changed)
        assert status == 422 and doc["error"]["code"] == "idempotency_key_reused"
    # Another path with the same key and body.
    task_id = _post(api, None)[2]["data"]["task_id"]
    status, _, doc = _post(api, "reused", BODY, path=f"/api/v1/tasks/{task_id}/trigger")
    assert status == 422 and doc["error"]["code"] == "idempotency_key_reused"
    # Same body in a different query string.
    status, _, doc = _post(api, "reused", BODY, path="/api/v1/tasks?x=1")
    assert status == 422 and doc["error"]["code"] == "idempotency_key_reused"
    assert _tasks(sql, org) == 2


def test_key_length_limit(api, org, sql):
    status, _, doc = _post(api, "k" * 256)
    assert status == 400
    assert doc == {"error": {"code": "invalid_params", "message": "Idempotency-Key must be at most 255 characters"}}
    assert _tasks(sql, org) == 0
    assert _post(api, "k" * 255)[0] == 202
    assert _post(api, "é" * 255)[0] == 202  # characters, not bytes
    stored = sql("SELECT key FROM idempotency_keys WHERE organization_id = $1 AND key LIKE 'é%'", org.id)
    assert stored == [("é" * 255,)]


def test_errors_are_not_stored_so_a_corrected_retry_runs(api, org, sql):
    status, _, doc = _post(api, "fix-me", {"url": "not-a-url"})
    assert status == 422 and doc["error"]["code"] == "validation_error"
    assert sql("SELECT count(*) FROM idempotency_keys WHERE organization_id = $1", org.id)[0][0] == 0
    status, _, doc = _post(api, "fix-me", BODY)
    assert status == 202
    assert _tasks(sql, org) == 1


def test_delete_is_replayed(api, org):
    task_id = _post(api, None)[2]["data"]["task_id"]
    assert api.delete(f"/api/v1/tasks/{task_id}", headers={"idempotency-key": "del"})[0] == 204
    status, headers, body = api.delete(f"/api/v1/tasks/{task_id}", headers={"idempotency-key": "del"})
    assert status == 204 and body is None  # without the key this would be 404
    assert api.delete(f"/api/v1/tasks/{task_id}")[0] == 404


def test_get_ignores_the_key(api, org, sql):
    for _ in range(2):
        assert api.get("/api/v1/tasks", headers={"idempotency-key": "read"})[0] == 200
    assert sql("SELECT count(*) FROM idempotency_keys WHERE organization_id = $1", org.id)[0][0] == 0


def test_an_answer_older_than_24_hours_is_not_replayed(api, org, sql):
    first = _post(api, "old")[2]["data"]["task_id"]
    sql("UPDATE idempotency_keys SET inserted_at = now() - interval '24 hours 1 second' "
        "WHERE organization_id = $1", org.id)
    second = _post(api, "old")[2]["data"]["task_id"]
    assert second != first
    # The new answer replaced the expired one and is replayed from now on.
    assert _post(api, "old")[2]["data"]["task_id"] == second
    assert _tasks(sql, org) == 2
    # Even with a different body: the expired row binds nothing.
    sql("UPDATE idempotency_keys SET inserted_at = now() - interval '25 hours' WHERE organization_id = $1", org.id)
    assert _post(api, "old", {"url": "https://example.com/new"})[0] == 202


def _hold_lock_on_tasks(dsn: str, locked: threading.Event, release: threading.Event) -> threading.Thread:
    """A transaction that holds SHARE on ``tasks`` until ``release``: inserts wait behind it."""

    async def hold() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():
                await conn.execute("LOCK TABLE tasks IN SHARE MODE")
                locked.set()
                await asyncio.get_running_loop().run_in_executor(None, release.wait, 30)
        finally:
            await conn.close()

    thread = threading.Thread(target=lambda: run(hold()), daemon=True)
    thread.start()
    return thread


def _concurrently(n: int, fn) -> list[Any]:
    results: list[Any] = [None] * n
    start = threading.Barrier(n)

    def worker(i: int) -> None:
        start.wait()
        results[i] = fn(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_duplicate_while_the_first_is_in_flight_gets_409_on_every_worker(server, org, sql, pg_dsn):
    # The first request is held inside its insert by a table lock, so it is certainly in flight
    # while the duplicates arrive, on 16 connections spread over both workers.
    locked, release = threading.Event(), threading.Event()
    holder = _hold_lock_on_tasks(pg_dsn, locked, release)
    assert locked.wait(10)
    first: list[Any] = []
    try:
        t = threading.Thread(target=lambda: first.append(_post(server.client().with_key(org.key), "slow")))
        t.start()
        wait_until(lambda: sql("SELECT count(*) FROM pg_locks WHERE relation = 'tasks'::regclass "
                               "AND NOT granted")[0][0] > 0)  # the first request waits in its insert
        dupes = _concurrently(16, lambda i: _post(server.client().with_key(org.key), "slow"))
        assert [(s, d) for s, _, d in dupes] == [(409, IN_FLIGHT)] * 16
    finally:
        release.set()
        holder.join(10)
    t.join(10)
    assert first and first[0][0] == 202
    # Now that it is done, a duplicate gets the stored answer.
    assert _post(server.client().with_key(org.key), "slow")[2] == first[0][2]
    assert _tasks(sql, org) == 1


def test_simultaneous_identical_requests_run_once(server, org, sql):
    answers = _concurrently(24, lambda i: _post(server.client().with_key(org.key), "burst"))
    done = [d for s, _, d in answers if s == 202]
    refused = [d for s, _, d in answers if s != 202]
    assert done and all(d == done[0] for d in done)  # the first answer, or its replay
    assert all(d == IN_FLIGHT for d in refused)
    assert {s for s, _, _ in answers} <= {202, 409}
    assert _tasks(sql, org) == 1


def test_cleanup_deletes_only_expired_rows_in_bounded_batches(pg_dsn, org, sql):
    from runlater.db.pool import Database, connect_pool
    from runlater.http.idempotency import IdempotencyLayer

    for i in range(7):
        sql("INSERT INTO idempotency_keys (organization_id, key, fingerprint, status_code, response_body, "
            "inserted_at) VALUES ($1, $2, '\\x00', 200, '', now() - interval '2 days')", org.id, f"old-{i}")
    sql("INSERT INTO idempotency_keys (organization_id, key, fingerprint, status_code, response_body) "
        "VALUES ($1, 'fresh', '\\x00', 200, '')", org.id)

    async def clean() -> tuple[int, int]:
        db = Database(await connect_pool(pg_dsn, size=2, application_name="test-cleanup"))
        try:
            region = SharedRegion.anonymous(InflightTable.region_size(64))
            layer = IdempotencyLayer(InflightTable(region, slots=64), db, cleanup_batch=3, cleanup_rounds=2)
            first = await layer.cleanup()  # two batches of 3: bounded
            second = await layer.cleanup()
            region.close()
            return first, second
        finally:
            await db.close()

    first, second = run(clean())
    assert first == 6
    assert second >= 1  # the last old row (and any left by other tests)
    keys = [r[0] for r in sql("SELECT key FROM idempotency_keys WHERE organization_id = $1", org.id)]
    assert keys == ["fresh"]


def test_a_failed_request_releases_its_key_at_once(api):
    # The in-flight entry is released in a finally: the retry of a failed action is neither
    # refused as in flight nor answered from storage (errors are not stored).
    path = f"/api/v1/tasks/{uuid.uuid4()}/trigger"
    for _ in range(2):
        status, _, doc = api.post(path, {}, headers={"idempotency-key": "missing"})
        assert status == 404 and doc["error"]["code"] == "not_found"
