"""The task API over a real socket against a real server and PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from conftest import ROOT, FreshDatabase, make_org, run, wait_until


def _ts(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def _create(api, **body):
    body.setdefault("url", "https://example.com/hook")
    status, _, doc = api.post("/api/v1/tasks", body)
    assert status == 202, doc
    return doc["data"]


# -- health and routing -------------------------------------------------------------


def test_health_needs_no_key(server):
    client = server.client()
    status, headers, doc = client.get("/health")
    assert status == 200
    assert doc == {"status": "ok", "database": "connected"}
    assert headers["content-type"] == "application/json; charset=utf-8"


def test_unknown_route_is_404(api):
    status, _, doc = api.get("/api/v1/nothing-here")
    assert status == 404
    assert doc == {"errors": {"detail": "Not Found"}}


# -- authentication -----------------------------------------------------------------

UNAUTHORIZED = {"error": {"code": "unauthorized", "message": "Invalid or missing API key"}}


@pytest.mark.parametrize("header", [
    None,
    "Basic abc",
    "Bearer invalid",
    "Bearer pk_live_AAAAAAAAAAAAAAAAAAAAAAAA.sk_live_BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB",
    "bearer pk_live_AAAAAAAAAAAAAAAAAAAAAAAA.sk_live_BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB",
])
def test_bad_credentials_get_401(server, header):
    client = server.client()
    headers = {} if header is None else {"authorization": header}
    for path, method in (("/api/v1/tasks", "GET"), ("/api/v1/tasks", "POST")):
        status, resp_headers, doc = client.request(method, path, {"url": "https://x.io"}, headers=headers)
        assert status == 401
        assert doc == UNAUTHORIZED
        assert "www-authenticate" not in resp_headers


def test_wrong_secret_for_a_real_key_is_401(server, org):
    key_id = org.key_id
    client = server.client().with_key(f"{key_id}.sk_live_{'x' * 32}")
    for _ in range(3):  # the first fills the cache, the rest are served from it
        status, _, doc = client.get("/api/v1/tasks")
        assert status == 401 and doc == UNAUTHORIZED
    good = server.client().with_key(org.key)
    assert good.get("/api/v1/tasks")[0] == 200


def test_revoked_key_stops_working_on_every_worker_within_two_seconds(server, pg_dsn, org):
    clients = [server.client().with_key(org.key) for _ in range(8)]  # spread over both workers
    for c in clients:
        assert c.get("/api/v1/tasks")[0] == 200
    env = dict(__import__("os").environ, DATABASE_URL=pg_dsn)
    out = subprocess.run([sys.executable, "-m", "runlater", "keys", "revoke", org.key_id],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    revoked_at = time.monotonic()
    for c in clients:
        wait_until(lambda c=c: c.get("/api/v1/tasks")[0] == 401, timeout=2.0)
    assert time.monotonic() - revoked_at < 2.5


def test_key_create_cli_prints_only_the_key(pg_dsn):
    env = dict(__import__("os").environ, DATABASE_URL=pg_dsn)
    out = subprocess.run([sys.executable, "-m", "runlater", "keys", "create", "--org", f"cli-{uuid.uuid4().hex[:8]}",
                          "--tier", "pro"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    key_id, secret = key.split(".")
    assert key_id.startswith("pk_live_") and len(key_id) == 32
    assert secret.startswith("sk_live_") and len(secret) == 40


def test_revoking_an_unknown_key_exits_1(pg_dsn):
    env = dict(__import__("os").environ, DATABASE_URL=pg_dsn)
    out = subprocess.run([sys.executable, "-m", "runlater", "keys", "revoke", "pk_live_nope"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and "pk_live_nope" in out.stderr


def test_secret_is_stored_only_as_a_hash(sql, org):
    rows = sql("SELECT key_hash FROM api_keys WHERE key_id = $1", org.key_id)
    import hashlib

    secret = org.key.split(".")[1]
    assert bytes(rows[0]["key_hash"]) == hashlib.sha256(secret.encode()).digest()
    assert secret.encode() not in bytes(rows[0]["key_hash"])


# -- create ---------------------------------------------------------------------------


def test_immediate_create_is_durable_with_its_execution(api, sql, org):
    before = datetime.now(timezone.utc).replace(microsecond=0)
    status, headers, doc = api.post("/api/v1/tasks", {"url": "https://example.com/a", "method": "POST", "body": "{}"})
    assert status == 202
    assert doc["message"] == "Task queued for execution"
    data = doc["data"]
    assert data["status"] == "pending"
    assert set(data) == {"task_id", "execution_id", "status", "scheduled_for"}
    scheduled = _ts(data["scheduled_for"])
    assert before <= scheduled <= before + timedelta(seconds=3)
    task = sql("SELECT * FROM tasks WHERE id = $1", uuid.UUID(data["task_id"]))[0]
    assert task["organization_id"] == org.id and task["schedule_type"] == "once" and task["method"] == "POST"
    execution = sql("SELECT * FROM executions WHERE id = $1", uuid.UUID(data["execution_id"]))[0]
    assert execution["task_id"] == task["id"] and execution["status"] == "pending" and execution["attempt"] == 1
    assert execution["scheduled_for"] == scheduled


def test_ids_are_uuid_v7(api):
    data = _create(api)
    assert uuid.UUID(data["task_id"]).version == 7
    assert uuid.UUID(data["execution_id"]).version == 7


@pytest.mark.parametrize("delay,seconds", [("30s", 30), ("5m", 300), ("2h", 7200), ("1d", 86400), (45, 45)])
def test_delay(api, delay, seconds):
    now = datetime.now(timezone.utc)
    data = _create(api, delay=delay)
    assert abs((_ts(data["scheduled_for"]) - now).total_seconds() - seconds) <= 2


@pytest.mark.parametrize("delay,message", [
    ("abc", "invalid delay format. Use a number with unit: 30s, 5m, 2h, 1d"),
    ("30", "invalid delay format. Use a number with unit: 30s, 5m, 2h, 1d"),
    ("0s", "delay must be greater than 0"),
    (0, "delay must be a positive number"),
    ("", "delay is required"),
    (1.5, 'delay must be a string (e.g. "30s", "5m") or integer (seconds)'),
])
def test_bad_delay_is_400_and_creates_nothing(api, sql, org, delay, message):
    status, _, doc = api.post("/api/v1/tasks", {"url": "https://example.com", "delay": delay})
    assert status == 400
    assert doc == {"error": {"code": "invalid_delay", "message": message}}
    assert sql("SELECT count(*) FROM tasks WHERE organization_id = $1", org.id)[0][0] == 0


def test_run_at(api):
    at = (datetime.now(timezone.utc) + timedelta(hours=1)).replace(microsecond=0)
    data = _create(api, run_at=at.strftime("%Y-%m-%dT%H:%M:%S+00:00"))
    assert _ts(data["scheduled_for"]) == at


@pytest.mark.parametrize("run_at", ["2026-01-01T10:00:00", "tomorrow", 12345])
def test_bad_run_at_is_400(api, run_at):
    status, _, doc = api.post("/api/v1/tasks", {"url": "https://example.com", "run_at": run_at})
    assert status == 400
    assert doc == {"error": {"code": "invalid_run_at", "message": "run_at must be a valid ISO 8601 datetime"}}


def test_run_at_in_the_past_is_422(api):
    at = datetime.now(timezone.utc) - timedelta(hours=1)
    status, _, doc = api.post("/api/v1/tasks", {"url": "https://example.com", "run_at": at.isoformat()})
    assert status == 422
    assert doc["error"]["details"] == {"scheduled_at": ["must be in the future"]}


@pytest.mark.parametrize("body,field", [
    ({"url": "not-a-valid-url"}, "url"),
    ({}, "url"),
    ({"url": "ftp://example.com"}, "url"),
    ({"url": "https://example.com/" + "a" * 300}, "url"),
    ({"url": "https://example.com", "method": "FETCH"}, "method"),
    ({"url": "https://example.com", "method": ""}, "method"),
    ({"url": "https://example.com", "timeout_ms": 10}, "timeout_ms"),
    ({"url": "https://example.com", "retry_attempts": 11}, "retry_attempts"),
    ({"url": "https://example.com", "headers": ["x"]}, "headers"),
    ({"url": "https://example.com", "body": {"a": 1}}, "body"),
    ({"url": "https://example.com", "body": "x" * 262145}, "body"),
    ({"url": "https://example.com", "callback_url": "nope"}, "callback_url"),
    ({"url": "https://example.com", "expected_status_codes": "200,999"}, "expected_status_codes"),
    ({"url": "https://example.com", "name": "a\u0000b"}, "name"),
])
def test_invalid_fields_are_422_and_create_nothing(api, sql, org, body, field):
    status, _, doc = api.post("/api/v1/tasks", body)
    assert status == 422, doc
    assert doc["error"]["code"] == "validation_error"
    assert field in doc["error"]["details"]
    assert sql("SELECT count(*) FROM tasks WHERE organization_id = $1", org.id)[0][0] == 0


def test_malformed_json_is_400(api):
    status, _, doc = api.request("POST", "/api/v1/tasks", raw=b'{"url": ')
    assert status == 400
    assert doc == {"errors": {"detail": "Bad Request"}}


def test_body_over_the_limit_is_413(api):
    status, _, _ = api.request("POST", "/api/v1/tasks", raw=b"x" * (1024 * 1024 + 1))
    assert status == 413


def test_wrapped_params_and_callback(api, sql):
    status, _, doc = api.post("/api/v1/tasks", {"task": {"url": "https://example.com/w", "name": "wrapped",
                                                         "callback_url": "https://example.com/cb"}})
    assert status == 202
    task_id = uuid.UUID(doc["data"]["task_id"])
    assert sql("SELECT name, callback_url FROM tasks WHERE id = $1", task_id)[0] == ("wrapped", "https://example.com/cb")
    execution = sql("SELECT callback_url FROM executions WHERE task_id = $1", task_id)[0]
    assert execution["callback_url"] == "https://example.com/cb"


def test_query_string_params_are_merged(api):
    now = datetime.now(timezone.utc)
    status, _, doc = api.post("/api/v1/tasks?delay=5m", {"url": "https://example.com"})
    assert status == 202
    assert abs((_ts(doc["data"]["scheduled_for"]) - now).total_seconds() - 300) <= 2


def test_concurrent_creates_each_get_their_own_row(server, org, sql):
    """Many creates in flight at once share statements but every one is answered for itself."""
    import concurrent.futures

    def one(i):
        client = server.client().with_key(org.key)
        try:
            status, _, doc = client.post("/api/v1/tasks", {"url": f"https://example.com/{i}", "name": f"n{i}"})
            return status, doc["data"]["task_id"]
        finally:
            client.close()

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(200)))
    assert all(status == 202 for status, _ in results)
    ids = {uuid.UUID(t) for _, t in results}
    assert len(ids) == 200
    rows = sql("SELECT t.id, t.name FROM tasks t JOIN executions e ON e.task_id = t.id WHERE t.organization_id = $1",
               org.id)
    assert {r["id"] for r in rows} == ids


# -- list -------------------------------------------------------------------------------


def test_list_pagination_and_has_more(api):
    created = [_create(api, name=f"t{i}")["task_id"] for i in range(5)]
    status, _, doc = api.get("/api/v1/tasks?limit=2&offset=1")
    assert status == 200
    assert len(doc["data"]) == 2 and doc["has_more"] is True
    assert doc["limit"] == 2 and doc["offset"] == 1
    status, _, doc = api.get("/api/v1/tasks")
    assert doc["limit"] == 50 and doc["offset"] == 0 and doc["has_more"] is False
    assert [t["id"] for t in doc["data"]] == list(reversed(created))  # newest first
    assert list(doc["data"][0]) == [
        "id", "name", "url", "method", "headers", "body", "schedule_type", "cron_expression", "scheduled_at",
        "enabled", "timeout_ms", "retry_attempts", "expected_status_codes", "expected_body_pattern", "queue",
        "notify_on_failure", "notify_on_recovery", "on_failure_url", "on_recovery_url", "next_run_at",
        "inserted_at", "updated_at",
    ]


def test_has_more_is_true_at_limit_100(api, sql, org):
    """Upstream never reports has_more at limit=100; we fetch limit+1 without a second clamp."""
    for _ in range(3):
        status, _, doc = api.post("/api/v1/tasks", {"url": "https://example.com"})
        assert status == 202
    sql("""INSERT INTO tasks (id, organization_id, name, url, schedule_type, scheduled_at)
           SELECT gen_random_uuid(), $1, 'bulk', 'https://example.com', 'once', now()
           FROM generate_series(1, 100)""", org.id)
    status, _, doc = api.get("/api/v1/tasks?limit=200")
    assert doc["limit"] == 100 and len(doc["data"]) == 100 and doc["has_more"] is True


@pytest.mark.parametrize("query,limit,offset", [
    ("limit=10abc", 10, 0), ("limit=0", 50, 0), ("limit=-5", 50, 0), ("limit=x", 50, 0), ("offset=-1", 50, 0),
])
def test_list_parameter_parsing(api, query, limit, offset):
    status, _, doc = api.get(f"/api/v1/tasks?{query}")
    assert status == 200 and doc["limit"] == limit and doc["offset"] == offset


def test_list_plan_made_on_an_empty_table_still_reads_the_index(pg_dsn):
    """The unfiltered list runs in rl_list_tasks, whose plan is made once per connection. Made
    while the table was empty it must still read tasks_org_list_idx in order once the table is
    full (a generic plan that sorted stayed in use and took 36 ms per page at 100,000 tasks).
    Checked with the session's scan counters: index scans only, no sequential scan."""
    import asyncpg

    from runlater.db.queries import Q

    database = FreshDatabase(pg_dsn)
    try:
        org = make_org(database.dsn)

        async def scans() -> tuple[str, int, int, str]:
            conn = await asyncpg.connect(database.dsn)
            other = await asyncpg.connect(database.dsn)
            try:
                await conn.execute("ANALYZE tasks")
                empty = await conn.fetchrow(Q.list_all_tasks, org.id, 20, 0)  # the plan is made here
                await other.execute(
                    """INSERT INTO tasks (id, organization_id, name, url, schedule_type, scheduled_at, inserted_at)
                       SELECT gen_random_uuid(), $1, 'task ' || i, 'https://example.com/' || i, 'once',
                              now(), now() - make_interval(secs => i)
                       FROM generate_series(1, 3000) AS i""", org.id)
                async with conn.transaction():
                    page = await conn.fetchrow(Q.list_all_tasks, org.id, 20, 0)
                    seq = await conn.fetchval("SELECT pg_stat_get_xact_numscans('tasks'::regclass)")
                    idx = await conn.fetchval("SELECT pg_stat_get_xact_numscans('tasks_org_list_idx'::regclass)")
                return empty["data"], seq, idx, page["data"]
            finally:
                await other.close()
                await conn.close()

        empty, seq, idx, page = run(scans())
        assert empty == "[]"
        names = [t["name"] for t in json.loads(page)]
        assert names == [f"task {i}" for i in range(1, 21)]  # newest first
        # The counters include the first (empty) call, not yet flushed: no sequential scan at
        # all, and the index read.
        assert seq == 0 and idx >= 1, (seq, idx)
    finally:
        database.drop()


def test_list_queue_filter(api):
    _create(api, queue="payments", name="p")
    _create(api, name="plain")
    _, _, doc = api.get("/api/v1/tasks?queue=payments")
    assert [t["name"] for t in doc["data"]] == ["p"]
    _, _, doc = api.get("/api/v1/tasks?queue=none")
    assert [t["name"] for t in doc["data"]] == ["plain"]
    _, _, doc = api.get("/api/v1/tasks?queue=")
    assert doc["data"] == []


# -- show, delete, trigger, executions ---------------------------------------------------


def test_show_task(api):
    data = _create(api, name="shown", headers={"x-a": "1"}, body="hello")
    status, _, doc = api.get(f"/api/v1/tasks/{data['task_id']}")
    assert status == 200
    task = doc["data"]
    assert task["id"] == data["task_id"] and task["name"] == "shown"
    assert task["headers"] == {"x-a": "1"} and task["body"] == "hello"
    assert task["schedule_type"] == "once" and task["scheduled_at"] == data["scheduled_for"]
    assert "callback_url" not in task and "organization_id" not in task


def test_show_accepts_32_hex_ids_and_rejects_garbage(api):
    data = _create(api)
    assert api.get(f"/api/v1/tasks/{uuid.UUID(data['task_id']).hex}")[0] == 200
    status, _, doc = api.get("/api/v1/tasks/not-a-uuid")
    assert status == 400 and doc == {"errors": {"detail": "Bad Request"}}


def test_missing_task_is_404(api):
    status, _, doc = api.get(f"/api/v1/tasks/{uuid.uuid4()}")
    assert status == 404
    assert doc == {"error": {"code": "not_found", "message": "Resource not found"}}


def test_tenant_isolation(server, api, other_org):
    data = _create(api, name="mine")
    intruder = server.client().with_key(other_org.key)
    task = data["task_id"]
    for method, path in (("GET", f"/api/v1/tasks/{task}"), ("DELETE", f"/api/v1/tasks/{task}"),
                         ("POST", f"/api/v1/tasks/{task}/trigger"), ("GET", f"/api/v1/tasks/{task}/executions")):
        status, _, doc = intruder.request(method, path)
        assert status == 404, (method, path)
        assert doc["error"]["code"] == "not_found"
    _, _, listing = intruder.get("/api/v1/tasks")
    assert all(t["id"] != task for t in listing["data"])
    assert api.get(f"/api/v1/tasks/{task}")[0] == 200  # untouched


def test_delete_is_soft_and_drops_pending_executions(api, sql):
    data = _create(api)
    task_id = uuid.UUID(data["task_id"])
    status, headers, body = api.delete(f"/api/v1/tasks/{task_id}")
    assert status == 204 and body is None
    assert api.get(f"/api/v1/tasks/{task_id}")[0] == 404
    assert api.delete(f"/api/v1/tasks/{task_id}")[0] == 404
    row = sql("SELECT deleted_at, enabled FROM tasks WHERE id = $1", task_id)[0]
    assert row["deleted_at"] is not None and row["enabled"] is False
    assert sql("SELECT count(*) FROM executions WHERE task_id = $1", task_id)[0][0] == 0


def test_trigger_and_history(api, sql):
    data = _create(api, delay="1h")
    task_id = data["task_id"]
    status, _, doc = api.post(f"/api/v1/tasks/{task_id}/trigger")
    assert status == 202
    assert doc["message"] == "Task triggered successfully"
    assert doc["data"]["status"] == "pending"
    triggered = doc["data"]["execution_id"]
    status, _, doc = api.get(f"/api/v1/tasks/{task_id}/executions")
    assert status == 200
    assert [e["id"] for e in doc["data"]] == [data["execution_id"], triggered]  # newest scheduled first
    assert list(doc["data"][0]) == ["id", "status", "scheduled_for", "started_at", "finished_at", "status_code",
                                    "duration_ms", "error_message", "attempt"]
    status, _, doc = api.get(f"/api/v1/tasks/{task_id}/executions?limit=1")
    assert len(doc["data"]) == 1
    assert api.post(f"/api/v1/tasks/{uuid.uuid4()}/trigger")[0] == 404
    assert api.get(f"/api/v1/tasks/{uuid.uuid4()}/executions")[0] == 404


def test_last_used_at_is_recorded(api, sql, org):
    assert api.get("/api/v1/tasks")[0] == 200
    wait_until(lambda: sql("SELECT last_used_at FROM api_keys WHERE key_id = $1", org.key_id)[0][0] is not None)
