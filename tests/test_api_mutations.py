"""Update, batch create, cancel by queue, queues and sync over a real socket and PostgreSQL.

Upstream's test-pinned cases are named by their number in upstream-api §6; DECISIONS
items by theirs. Cron tasks are inserted with SQL where a test is about the update or
sync path rather than about cron creation, so those tests do not depend on the cron
create endpoint.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import asyncpg
import pytest
from conftest import ServerProcess, make_org, run

try:
    from runlater.core import cron  # noqa: F401

    HAVE_CRON = True
except ImportError:  # pragma: no cover - depends on the checkout
    HAVE_CRON = False

needs_cron = pytest.mark.skipif(not HAVE_CRON, reason="runlater.core.cron is not there yet")

NOT_FOUND = {"error": {"code": "not_found", "message": "Resource not found"}}
BAD_REQUEST = {"errors": {"detail": "Bad Request"}}
TIER_MESSAGE = ("Free plan only allows hourly or less frequent schedules. "
                "Upgrade to Pro for per-minute scheduling.")


def _ts(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def _now() -> datetime:
    return datetime.now(UTC)


def _create(api, **body):
    body.setdefault("url", "https://example.com/hook")
    status, _, doc = api.post("/api/v1/tasks", body)
    assert status == 202, doc
    return doc["data"]


def _cron_task(sql, org_id, *, name="nightly", expression="0 * * * *", queue=None, minutes_ahead=30,
               inserted_at=None, enabled=True):
    """A live cron task straight in the table, as the cron create would leave it."""
    task_id = uuid.uuid4()
    next_run = (_now() + timedelta(minutes=minutes_ahead)).replace(second=0, microsecond=0) if enabled else None
    sql("""INSERT INTO tasks (id, organization_id, name, url, method, schedule_type, cron_expression,
                              interval_minutes, next_run_at, queue, enabled, inserted_at)
           VALUES ($1, $2, $3, 'https://example.com/cron', 'GET', 'cron', $4, 60, $5, $6, $7,
                   coalesce($8, now()))""",
        task_id, org_id, name, expression, next_run, queue, enabled, inserted_at)
    return task_id


def _executions(sql, task_id):
    return sql("SELECT status, attempt, scheduled_for, queue, callback_url FROM executions "
               "WHERE task_id = $1 ORDER BY scheduled_for", uuid.UUID(str(task_id)))


def _put(api, task_id, body, method="PUT"):
    return api.request(method, f"/api/v1/tasks/{task_id}", body)


@pytest.fixture
def free_api(server, pg_dsn):
    return server.client().with_key(make_org(pg_dsn, "free").key)


@pytest.fixture
def free_org_api(server, pg_dsn):
    org = make_org(pg_dsn, "free")
    return org, server.client().with_key(org.key)


# -- PUT|PATCH /api/v1/tasks/{id} ------------------------------------------------------


def test_update_name_and_unknown_id(api):
    """§6 21."""
    task = _create(api, name="before", delay="1h")["task_id"]
    status, _, doc = _put(api, task, {"name": "after"})
    assert status == 200, doc
    assert set(doc) == {"data"}
    assert doc["data"]["id"] == task and doc["data"]["name"] == "after"
    assert api.get(f"/api/v1/tasks/{task}")[2]["data"]["name"] == "after"
    status, _, doc = _put(api, uuid.uuid4(), {"name": "x"})
    assert status == 404 and doc == NOT_FOUND


def test_update_returns_the_full_task_json(api):
    task = _create(api, delay="1h")["task_id"]
    status, _, doc = _put(api, task, {"retry_attempts": 2})
    assert status == 200
    assert list(doc["data"]) == [
        "id", "name", "url", "method", "headers", "body", "schedule_type", "cron_expression", "scheduled_at",
        "enabled", "timeout_ms", "retry_attempts", "expected_status_codes", "expected_body_pattern", "queue",
        "notify_on_failure", "notify_on_recovery", "on_failure_url", "on_recovery_url", "next_run_at",
        "inserted_at", "updated_at",
    ]
    assert doc["data"]["retry_attempts"] == 2


def test_patch_wrapped_partial_update_ignores_id_and_shorthands(api):
    data = _create(api, name="keep", body="b", headers={"x-a": "1"}, delay="1h")
    task = data["task_id"]
    status, _, doc = _put(api, task, {"task": {"id": str(uuid.uuid4()), "method": "PUT", "timeout_ms": "5000",
                                               "delay": "5m", "cron": "* * * * *"}}, method="PATCH")
    assert status == 200, doc
    t = doc["data"]
    assert t["id"] == task and t["method"] == "PUT" and t["timeout_ms"] == 5000
    assert t["name"] == "keep" and t["body"] == "b" and t["headers"] == {"x-a": "1"}
    assert t["schedule_type"] == "once" and t["scheduled_at"] == data["scheduled_for"]


def test_update_all_fields(api):
    task = _create(api, delay="1h")["task_id"]
    body = {
        "url": "https://example.org/new", "method": "DELETE", "headers": {"a": "b"}, "body": "payload",
        "enabled": "false", "timeout_ms": 1000, "retry_attempts": 0, "callback_url": "https://cb.example.com",
        "expected_status_codes": "200, 201, 204", "expected_body_pattern": "ok", "queue": "q1",
        "notify_on_failure": False, "notify_on_recovery": "true", "on_failure_url": "https://f.example.com",
        "on_recovery_url": "https://r.example.com",
    }
    status, _, doc = _put(api, task, body)
    assert status == 200, doc
    t = doc["data"]
    for key, value in body.items():
        if key in ("callback_url",):
            continue
        expected = {"enabled": False, "notify_on_recovery": True}.get(key, value)
        assert t[key] == expected, key
    assert "callback_url" not in t


@pytest.mark.parametrize("body,field,message", [
    ({"url": "bad-url"}, "url", "must be a valid HTTP or HTTPS URL"),
    ({"url": ""}, "url", "can't be blank"),
    ({"url": None}, "url", "can't be blank"),
    ({"method": "get"}, "method", "is invalid"),
    ({"method": ""}, "method", "can't be blank"),
    ({"enabled": None}, "enabled", "can't be blank"),
    ({"timeout_ms": 999}, "timeout_ms", "must be greater than or equal to 1000"),
    ({"retry_attempts": 11}, "retry_attempts", "must be less than or equal to 10"),
    ({"headers": "x"}, "headers", "is invalid"),
    ({"body": {"a": 1}}, "body", "is invalid"),
    ({"callback_url": "nope"}, "callback_url", "must be a valid HTTP or HTTPS URL"),
    ({"on_failure_url": "ftp://x"}, "on_failure_url", "must be a valid HTTP or HTTPS URL"),
    ({"expected_status_codes": "abc"}, "expected_status_codes",
     "must be comma-separated HTTP status codes (100-599)"),
    ({"schedule_type": "weekly"}, "schedule_type", "is invalid"),
    ({"scheduled_at": "soon"}, "scheduled_at", "is invalid"),
    ({"scheduled_at": None}, "scheduled_at", "can't be blank"),
    ({"name": "a\u0000b"}, "name", "must not contain null characters"),
    ({"queue": "q" * 256}, "queue", "should be at most 255 character(s)"),
    ({"timezone": "Mars/Olympus"}, "timezone", "is not a valid timezone"),
    ({"schedule_type": "cron"}, "cron_expression", "can't be blank"),
])
def test_invalid_update_is_422_and_changes_nothing(api, body, field, message):
    """§6 42 and the §2.1 rules on update."""
    task = _create(api, name="orig", delay="1h")["task_id"]
    before = api.get(f"/api/v1/tasks/{task}")[2]["data"]
    status, _, doc = _put(api, task, body)
    assert status == 422, doc
    assert doc["error"]["code"] == "validation_error"
    assert message in doc["error"]["details"][field]
    assert api.get(f"/api/v1/tasks/{task}")[2]["data"] == before


def test_blank_name_becomes_the_url_host(api):
    task = _create(api, name="named", url="https://host.example.com:8443/p", delay="1h")["task_id"]
    status, _, doc = _put(api, task, {"name": "  "})
    assert status == 200 and doc["data"]["name"] == "host.example.com"


def test_scheduled_at_future_check_only_when_it_changes(api, sql, org):
    old = (_now() - timedelta(hours=1)).replace(microsecond=0)
    task_id = uuid.uuid4()
    sql("""INSERT INTO tasks (id, organization_id, name, url, schedule_type, scheduled_at)
           VALUES ($1, $2, 'past', 'https://example.com', 'once', $3)""", task_id, org.id, old)
    status, _, doc = _put(api, task_id, {"name": "renamed", "scheduled_at": _iso(old)})
    assert status == 200, doc
    status, _, doc = _put(api, task_id, {"scheduled_at": _iso(old + timedelta(minutes=1))})
    assert status == 422 and doc["error"]["details"] == {"scheduled_at": ["must be in the future"]}
    # Within the five-minute tolerance is accepted, as on create.
    status, _, doc = _put(api, task_id, {"scheduled_at": _iso(_now() - timedelta(minutes=2))})
    assert status == 200, doc


def test_editing_a_one_time_task_does_not_run_it_twice(api, sql):
    """DECISIONS 10: a name change leaves the single pending run as it is."""
    data = _create(api, delay="1h")
    task = data["task_id"]
    before = _executions(sql, task)
    for body in ({"name": "x"}, {"enabled": False}, {"enabled": True}, {"body": "new"}):
        status, _, doc = _put(api, task, body)
        assert status == 200, doc
        assert doc["data"]["next_run_at"] is None
    assert _executions(sql, task) == before
    assert sql("SELECT next_run_at FROM tasks WHERE id = $1", uuid.UUID(task))[0][0] is None


def test_changing_scheduled_at_moves_the_pending_run(api, sql):
    """DECISIONS 10: the not-yet-started first run moves; no second run appears."""
    data = _create(api, delay="1h")
    task = data["task_id"]
    new_time = (_now() + timedelta(hours=3)).replace(microsecond=0)
    status, _, doc = _put(api, task, {"scheduled_at": new_time.isoformat()})
    assert status == 200, doc
    assert doc["data"]["scheduled_at"] == _iso(new_time)
    rows = _executions(sql, task)
    assert len(rows) == 1
    assert rows[0]["status"] == "pending" and rows[0]["attempt"] == 1 and rows[0]["scheduled_for"] == new_time
    assert api.get(f"/api/v1/tasks/{task}/executions")[2]["data"][0]["id"] == data["execution_id"]


def test_changing_scheduled_at_after_the_run_started_schedules_nothing(api, sql):
    data = _create(api, delay="1h")
    task = data["task_id"]
    sql("UPDATE executions SET status = 'success', finished_at = now() WHERE id = $1",
        uuid.UUID(data["execution_id"]))
    new_time = (_now() + timedelta(hours=3)).replace(microsecond=0)
    status, _, doc = _put(api, task, {"scheduled_at": _iso(new_time)})
    assert status == 200 and doc["data"]["scheduled_at"] == _iso(new_time)
    rows = _executions(sql, task)
    assert [(r["status"], r["scheduled_for"]) for r in rows] == [("success", _ts(data["scheduled_for"]))]


def test_pending_runs_follow_queue_and_callback_changes(api, sql, org):
    data = _create(api, delay="1h", queue="old")
    task = data["task_id"]
    status, _, _ = _put(api, task, {"queue": "new", "callback_url": "https://cb.example.com/x"})
    assert status == 200
    rows = _executions(sql, task)
    assert [(r["queue"], r["callback_url"]) for r in rows] == [("new", "https://cb.example.com/x")]
    status, _, doc = api.delete("/api/v1/tasks?queue=new")
    assert doc["data"]["cancelled"] == 1
    assert _executions(sql, task) == []


def test_switching_a_one_time_task_to_cron_drops_its_pending_run(api, sql):
    if not HAVE_CRON:
        pytest.skip("needs runlater.core.cron")
    task = _create(api, delay="1h")["task_id"]
    status, _, doc = _put(api, task, {"schedule_type": "cron", "cron_expression": "0 * * * *"})
    assert status == 200, doc
    assert doc["data"]["schedule_type"] == "cron" and doc["data"]["next_run_at"] is not None
    assert _executions(sql, task) == []


def test_switching_a_cron_task_to_one_time_queues_one_run(api, sql, org):
    task = _cron_task(sql, org.id)
    at = (_now() + timedelta(hours=2)).replace(microsecond=0)
    status, _, doc = _put(api, task, {"schedule_type": "once", "scheduled_at": _iso(at)})
    assert status == 200, doc
    assert doc["data"]["next_run_at"] is None
    rows = _executions(sql, task)
    assert [(r["status"], r["attempt"], r["scheduled_for"]) for r in rows] == [("pending", 1, at)]
    assert sql("SELECT interval_minutes FROM tasks WHERE id = $1", task)[0][0] is None


def test_cron_update_keeps_next_run_when_the_schedule_is_unchanged(api, sql, org):
    """§6 25 (update part): on_failure_url set on a cron task; the next run stays."""
    task = _cron_task(sql, org.id)
    before = sql("SELECT next_run_at FROM tasks WHERE id = $1", task)[0][0]
    status, _, doc = _put(api, task, {"on_failure_url": "https://alerts.example.com/f", "name": "renamed"})
    assert status == 200, doc
    assert doc["data"]["on_failure_url"] == "https://alerts.example.com/f"
    assert api.get(f"/api/v1/tasks/{task}")[2]["data"]["on_failure_url"] == "https://alerts.example.com/f"
    assert sql("SELECT next_run_at FROM tasks WHERE id = $1", task)[0][0] == before


@needs_cron
def test_cron_schedule_change_recomputes_next_run_and_interval(api, sql, org):
    task = _cron_task(sql, org.id, minutes_ahead=600)
    status, _, doc = _put(api, task, {"cron_expression": "*/5 * * * *"})
    assert status == 200, doc
    next_run = _ts(doc["data"]["next_run_at"])
    assert _now() < next_run <= _now() + timedelta(minutes=5, seconds=1)
    assert next_run.minute % 5 == 0
    assert sql("SELECT interval_minutes FROM tasks WHERE id = $1", task)[0][0] == 5
    status, _, doc = _put(api, task, {"enabled": False})
    assert doc["data"]["next_run_at"] is None
    status, _, doc = _put(api, task, {"enabled": True})
    assert doc["data"]["next_run_at"] is not None


@needs_cron
def test_cron_reschedule_skips_a_slot_already_queued(api, sql, org):
    task = _cron_task(sql, org.id, expression="*/5 * * * *")
    queued = (_now() + timedelta(minutes=5)).replace(second=0, microsecond=0)
    queued -= timedelta(minutes=queued.minute % 5)
    if queued <= _now():
        queued += timedelta(minutes=5)
    sql("""INSERT INTO executions (id, task_id, organization_id, scheduled_for)
           SELECT gen_random_uuid(), id, organization_id, $2 FROM tasks WHERE id = $1""", task, queued)
    status, _, doc = _put(api, task, {"cron_expression": "* * * * *"})
    assert status == 200, doc
    assert _ts(doc["data"]["next_run_at"]) > queued


@needs_cron
def test_cron_schedule_change_wakes_the_scheduler(api, sql, org, pg_dsn):
    task = _cron_task(sql, org.id, minutes_ahead=600)
    payloads = _notifications(pg_dsn, "runlater_scheduler",
                              lambda: _put(api, task, {"cron_expression": "*/10 * * * *"}))
    next_run = sql("SELECT next_run_at FROM tasks WHERE id = $1", task)[0][0]
    assert str(int(next_run.timestamp())) in payloads


@needs_cron
def test_free_tier_cannot_update_to_per_minute(free_org_api, sql):
    """§6 41: rejected, stored task unchanged."""
    org, client = free_org_api
    task = _cron_task(sql, org.id)
    before = sql("SELECT cron_expression, next_run_at, interval_minutes FROM tasks WHERE id = $1", task)[0]
    status, _, doc = _put(client, task, {"cron_expression": "* * * * *"})
    assert status == 422
    assert doc["error"]["details"] == {"cron_expression": [TIER_MESSAGE]}
    assert sql("SELECT cron_expression, next_run_at, interval_minutes FROM tasks WHERE id = $1", task)[0] == before
    status, _, doc = _put(client, task, {"cron_expression": "0 */2 * * *"})
    assert status == 200, doc


@needs_cron
def test_invalid_cron_expression_on_update(api, sql, org):
    task = _cron_task(sql, org.id)
    status, _, doc = _put(api, task, {"cron_expression": "not cron"})
    assert status == 422 and doc["error"]["details"] == {"cron_expression": ["is not a valid cron expression"]}


@needs_cron
def test_cron_timezone_update(api, sql, org):
    task = _cron_task(sql, org.id)
    status, _, doc = _put(api, task, {"cron_expression": "0 9 * * *", "timezone": "Europe/Amsterdam"})
    assert status == 200, doc
    assert sql("SELECT timezone FROM tasks WHERE id = $1", task)[0][0] == "Europe/Amsterdam"
    assert _ts(doc["data"]["next_run_at"]).hour in (7, 8)  # 09:00 CET/CEST in UTC


def test_update_is_tenant_isolated(server, api, other_org, sql):
    task = _create(api, name="mine", delay="1h")["task_id"]
    intruder = server.client().with_key(other_org.key)
    for method in ("PUT", "PATCH"):
        status, _, doc = _put(intruder, task, {"name": "stolen"}, method=method)
        assert status == 404 and doc == NOT_FOUND
    assert api.get(f"/api/v1/tasks/{task}")[2]["data"]["name"] == "mine"


def test_update_of_deleted_task_is_404_and_bad_id_is_400(api):
    task = _create(api, delay="1h")["task_id"]
    assert api.delete(f"/api/v1/tasks/{task}")[0] == 204
    assert _put(api, task, {"name": "x"})[0] == 404
    status, _, doc = _put(api, "not-a-uuid", {"name": "x"})
    assert status == 400 and doc == BAD_REQUEST


def test_update_needs_a_key(server, api):
    task = _create(api, delay="1h")["task_id"]
    status, _, doc = server.client().request("PUT", f"/api/v1/tasks/{task}", {"name": "x"})
    assert status == 401 and doc["error"]["code"] == "unauthorized"


@pytest.fixture(scope="module")
def guarded_server(pg_dsn):
    """A server that applies the save-time SSRF check (private targets not allowed)."""
    srv = ServerProcess(pg_dsn, http_workers=1, executors=0, env={"RUNLATER_ALLOW_PRIVATE_TARGETS": "0"})
    srv.wait_ready()
    yield srv
    srv.stop()


def test_update_checks_ssrf_only_when_the_url_changes(guarded_server, pg_dsn, sql):
    org = make_org(pg_dsn)
    client = guarded_server.client().with_key(org.key)
    # One-time creates skip the save-time check (§7.2), so this one stores a private URL.
    task = _create(client, url="http://127.0.0.1/hook", delay="1h")["task_id"]
    status, _, doc = _put(client, task, {"name": "same url"})
    assert status == 200, doc
    for url in ("http://10.0.0.5/x", "http://localhost:8080/", "http://metadata.internal/"):
        status, _, doc = _put(client, task, {"url": url})
        assert status == 422, url
        assert doc["error"]["details"] == {"url": ["cannot target private or internal addresses"]}
    status, _, doc = _put(client, task, {"url": "https://example.com/public"})
    assert status == 200


def test_sync_create_checks_ssrf(guarded_server, pg_dsn):
    org = make_org(pg_dsn)
    client = guarded_server.client().with_key(org.key)
    status, _, doc = client.request("PUT", "/api/v1/sync", {"tasks": [
        {"name": "private", "url": "http://192.168.1.1/", "schedule_type": "once",
         "scheduled_at": _iso(_now() + timedelta(hours=1))}]})
    assert status == 422
    assert doc["error"]["details"] == [{"name": "private", "error": "url: cannot target private or internal addresses"}]


# -- POST /api/v1/tasks/batch ------------------------------------------------------------


def _batch(api, **body):
    body.setdefault("url", "https://example.com/batch")
    body.setdefault("queue", "bq")
    body.setdefault("items", [{"n": 1}])
    return api.post("/api/v1/tasks/batch", body)


def test_batch_creates_tasks_with_one_pending_run_each(api, sql, org):
    """§6 26 and 47."""
    before = _now().replace(microsecond=0)
    status, _, doc = _batch(api, queue="emails", items=[{"to": "a"}, {"to": "b"}, "raw text"])
    assert status == 201, doc
    assert doc["message"] == "3 tasks created"
    assert list(doc["data"]) == ["queue", "created", "scheduled_for"]
    assert doc["data"]["queue"] == "emails" and doc["data"]["created"] == 3
    scheduled = _ts(doc["data"]["scheduled_for"])
    assert before <= scheduled <= before + timedelta(seconds=3)
    tasks = sql("""SELECT id, name, url, method, headers::text, body, schedule_type, scheduled_at, enabled,
                          timeout_ms, retry_attempts, queue, next_run_at
                   FROM tasks WHERE organization_id = $1 ORDER BY body""", org.id)
    assert sorted(t["body"] for t in tasks) == sorted(['{"to":"a"}', '{"to":"b"}', "raw text"])
    for t in tasks:
        assert t["url"] == "https://example.com/batch" and t["method"] == "POST" and t["headers"] == "{}"
        assert t["schedule_type"] == "once" and t["scheduled_at"] == scheduled and t["enabled"] is True
        assert (t["timeout_ms"], t["retry_attempts"], t["queue"]) == (30000, 5, "emails")
        assert t["next_run_at"] is None
        assert t["name"] == "https://example.com/batch \u00b7 " + scheduled.strftime("%d %b, %H:%M")
        rows = _executions(sql, t["id"])
        assert [(r["status"], r["attempt"], r["scheduled_for"], r["queue"]) for r in rows] == [
            ("pending", 1, scheduled, "emails")]


def test_batch_shared_attributes_are_stored(api, sql, org):
    status, _, doc = _batch(api, method="PUT", headers={"x-k": "v"}, timeout_ms=2000, retry_attempts=0,
                            callback_url="https://cb.example.com/done", items=[1, None, [1, 2]])
    assert status == 201, doc
    rows = sql("SELECT method, headers, timeout_ms, retry_attempts, callback_url, body FROM tasks "
               "WHERE organization_id = $1", org.id)
    assert sorted(r["body"] for r in rows) == ["1", "[1,2]", "null"]
    for r in rows:
        assert (r["method"], json.loads(r["headers"]), r["timeout_ms"], r["retry_attempts"], r["callback_url"]) == (
            "PUT", {"x-k": "v"}, 2000, 0, "https://cb.example.com/done")
    execs = sql("SELECT callback_url FROM executions WHERE organization_id = $1", org.id)
    assert {e["callback_url"] for e in execs} == {"https://cb.example.com/done"}


def test_batch_run_at(api):
    """§6 27."""
    at = (_now() + timedelta(hours=1)).replace(microsecond=0)
    status, _, doc = _batch(api, run_at=at.isoformat())
    assert status == 201 and _ts(doc["data"]["scheduled_for"]) == at


def test_batch_delay(api):
    """§6 28."""
    now = _now()
    status, _, doc = _batch(api, delay="10m")
    assert status == 201
    assert 590 <= (_ts(doc["data"]["scheduled_for"]) - now).total_seconds() <= 610


def test_batch_without_timing_is_now(api):
    """§6 29."""
    status, _, doc = _batch(api)
    assert status == 201
    assert abs((_ts(doc["data"]["scheduled_for"]) - _now()).total_seconds()) <= 10


@pytest.mark.parametrize("timing,offset", [
    ({"run_at": "2030-01-01T00:00:00Z", "delay": "10m"}, None),  # run_at wins (opposite of single create)
    ({"run_at": "tomorrow", "delay": "10m"}, 1),  # unparsable run_at: now + 1 s, delay ignored
    ({"run_at": 12345}, 1),
    ({"run_at": "2030-01-01T00:00:00"}, 1),  # no offset: unparsable
    ({"delay": "abc"}, 1),
    ({"delay": 1.5}, 1),
    ({"delay": 120}, 120),
    ({"delay": -30}, -30),  # integers ≤ 0 are accepted as they are
    ({"delay": "0s"}, 0),
    ({"delay": "2h"}, 7200),
])
def test_batch_lenient_timing(api, timing, offset):
    start = _now().replace(microsecond=0)
    status, _, doc = _batch(api, **timing)
    assert status == 201, doc
    scheduled = _ts(doc["data"]["scheduled_for"])
    if offset is None:
        assert scheduled == datetime(2030, 1, 1, tzinfo=UTC)
    else:
        assert abs((scheduled - start).total_seconds() - offset) <= 2


def test_batch_past_run_at_is_accepted(api):
    at = (_now() - timedelta(days=2)).replace(microsecond=0)
    status, _, doc = _batch(api, run_at=_iso(at))
    assert status == 201 and _ts(doc["data"]["scheduled_for"]) == at


@pytest.mark.parametrize("body,message", [
    ({"url": "https://x.io", "queue": "q"}, "items must be a list"),  # §6 32
    ({"url": "https://x.io", "queue": "q", "items": {"a": 1}}, "items must be a list"),
    ({"url": "https://x.io", "queue": "q", "items": []}, "items must not be empty"),  # §6 33
    ({"url": "https://x.io", "queue": "q", "items": [1] * 1001}, "items must not exceed 1000 elements"),  # §6 34
    ({"queue": "q", "items": [1]}, "url is required"),  # §6 30
    ({"url": "", "queue": "q", "items": [1]}, "url is required"),
    ({"url": "https://x.io", "items": [1]}, "queue is required"),  # §6 31
    ({"url": "https://x.io", "queue": "", "items": [1]}, "queue is required"),
    ({"url": "https://x.io", "queue": "  ", "items": [1]}, "queue is required"),
    ({"url": "not-a-url", "queue": "q", "items": [1]}, "url must be a valid HTTP or HTTPS URL"),  # §6 35
    ({"url": "ftp://x.io", "queue": "q", "items": [1]}, "url must be a valid HTTP or HTTPS URL"),
    ({"url": 42, "queue": "q", "items": [1]}, "url must be a valid HTTP or HTTPS URL"),
    # The order of the checks: items first, then url, then queue.
    ({"items": []}, "items must not be empty"),
    ({"items": [1]}, "url is required"),
    ({"url": "nope", "items": [1]}, "queue is required"),
])
def test_batch_errors(api, sql, org, body, message):
    status, _, doc = api.post("/api/v1/tasks/batch", body)
    assert status == 400
    assert doc == {"error": {"code": "invalid_params", "message": message}}
    assert sql("SELECT count(*) FROM tasks WHERE organization_id = $1", org.id)[0][0] == 0


@pytest.mark.parametrize("shared,message", [
    ({"method": "FETCH"}, "method is invalid"),
    ({"method": ""}, "method can't be blank"),
    ({"headers": ["x"]}, "headers is invalid"),
    ({"headers": {"bad name": "v"}}, "headers contains an invalid header name"),
    ({"timeout_ms": 10}, "timeout_ms must be greater than or equal to 1000"),
    ({"timeout_ms": 300001}, "timeout_ms must be less than or equal to 300000"),
    ({"retry_attempts": 11}, "retry_attempts must be less than or equal to 10"),
    ({"retry_attempts": "x"}, "retry_attempts is invalid"),
    ({"callback_url": "nope"}, "callback_url must be a valid HTTP or HTTPS URL"),
    ({"url": "https://example.com/" + "a" * 300}, "url should be at most 255 character(s)"),
    ({"url": "https://example.com/\u0000"}, "url must not contain null characters"),
    ({"queue": "q\u0000"}, "queue must not contain null characters"),
    ({"queue": 7}, "queue is invalid"),
    ({"method": "FETCH", "timeout_ms": 10}, "method is invalid; timeout_ms must be greater than or equal to 1000"),
])
def test_batch_shared_attributes_are_validated(api, sql, org, shared, message):
    """DECISIONS 6: upstream skips these checks; we report them like its batch errors."""
    status, _, doc = _batch(api, **shared)
    assert status == 400, doc
    assert doc == {"error": {"code": "invalid_params", "message": message}}
    assert sql("SELECT count(*) FROM tasks WHERE organization_id = $1", org.id)[0][0] == 0


@pytest.mark.parametrize("items,message", [
    (["ok", "bad\u0000"], "items[1] must not contain null characters"),
    (["x" * 262145], "items[0] must be less than 256KB"),
])
def test_batch_item_bodies_are_checked(api, items, message):
    status, _, doc = _batch(api, items=items)
    assert status == 400 and doc == {"error": {"code": "invalid_params", "message": message}}


def test_batch_of_1000_and_huge_delay(api, sql, org):
    status, _, doc = _batch(api, items=list(range(1000)))
    assert status == 201 and doc["data"]["created"] == 1000
    assert sql("SELECT count(*) FROM executions WHERE organization_id = $1", org.id)[0][0] == 1000
    status, _, doc = _batch(api, delay="9" * 18 + "d")
    assert status == 400 and doc["error"]["code"] == "invalid_params"
    status, _, doc = _batch(api, delay=10**15)
    assert status == 400 and doc["error"]["code"] == "invalid_params"


def test_batch_wakes_executors(api, pg_dsn):
    payloads = _notifications(pg_dsn, "runlater_executions", lambda: _batch(api, delay="1m"))
    assert payloads


def test_wake_up_payload_is_the_exact_due_time(api, pg_dsn, sql):
    """Executors arm their timer from the NOTIFY payload, so it must be the due time itself,
    to the microsecond. Rounded to whole seconds, a row due at 12.6 s was announced as 13 s
    and an idle executor started it up to half a second late."""
    from runlater.db.queries import Q

    task_id = uuid.UUID(_create(api, delay="1h")["task_id"])
    org_id = sql("SELECT organization_id FROM tasks WHERE id = $1", task_id)[0][0]
    due = (_now() + timedelta(seconds=30)).replace(microsecond=654321)

    async def go() -> list[str]:
        got: list[str] = []
        arrived = asyncio.Event()
        listener = await asyncpg.connect(pg_dsn)
        conn = await asyncpg.connect(pg_dsn)
        try:
            await listener.add_listener("runlater_executions", lambda *a: (got.append(a[3]), arrived.set()))
            await conn.fetch(Q.add_once_execution, uuid.uuid4(), task_id, org_id, due, None, None)
            await asyncio.wait_for(arrived.wait(), 5)
        finally:
            await conn.close()
            await listener.close()
        return got

    payloads = run(go())
    assert len(payloads) == 1 and abs(float(payloads[0]) - due.timestamp()) < 1e-5, (payloads, due)


def test_batch_path_is_not_a_task_id(api):
    """GET (or any other method) on /tasks/batch is /tasks/{id} with a bad UUID: 400."""
    for method, path in (("GET", "/api/v1/tasks/batch"), ("PUT", "/api/v1/tasks/batch"),
                         ("PATCH", "/api/v1/tasks/batch"), ("DELETE", "/api/v1/tasks/batch"),
                         ("POST", "/api/v1/tasks/batch/trigger"), ("GET", "/api/v1/tasks/batch/executions")):
        status, _, doc = api.request(method, path)
        assert status == 400 and doc == BAD_REQUEST, (method, path)


def test_batch_needs_a_key(server):
    status, _, doc = server.client().post("/api/v1/tasks/batch", {"url": "https://x.io", "queue": "q", "items": [1]})
    assert status == 401 and doc["error"]["code"] == "unauthorized"


# -- DELETE /api/v1/tasks?queue= -----------------------------------------------------------


def test_cancel_queue(api, sql, org):
    """§6 36 and 50."""
    status, _, doc = _batch(api, queue="cancel-me", items=[1, 2], delay="1h")
    assert status == 201
    keep = _create(api, queue="other", delay="1h")["task_id"]
    status, _, doc = api.delete("/api/v1/tasks?queue=cancel-me")
    assert status == 200
    assert doc == {"data": {"cancelled": 2}, "message": "2 tasks cancelled"}
    listed = api.get("/api/v1/tasks")[2]["data"]
    assert [t["id"] for t in listed] == [keep]
    rows = sql("SELECT deleted_at, enabled, next_run_at FROM tasks WHERE organization_id = $1 AND queue = 'cancel-me'",
               org.id)
    assert len(rows) == 2 and all(r["deleted_at"] is not None and r["enabled"] is False for r in rows)
    assert sql("SELECT count(*) FROM executions WHERE organization_id = $1 AND queue = 'cancel-me'", org.id)[0][0] == 0
    assert len(_executions(sql, keep)) == 1
    assert api.get("/api/v1/queues")[2]["data"] == [{"name": "other", "paused": False}]
    # Again: nothing left to cancel.
    assert api.delete("/api/v1/tasks?queue=cancel-me")[2] == {"data": {"cancelled": 0}, "message": "0 tasks cancelled"}


def test_cancel_unknown_queue_is_zero(api):
    """§6 37."""
    status, _, doc = api.delete("/api/v1/tasks?queue=nothing-here")
    assert status == 200 and doc == {"data": {"cancelled": 0}, "message": "0 tasks cancelled"}


@pytest.mark.parametrize("query", ["", "?queue=", "?queue[a]=b", "?other=1"])
def test_cancel_without_queue_is_400(api, query):
    """§6 38."""
    status, _, doc = api.delete(f"/api/v1/tasks{query}")
    assert status == 400
    assert doc == {"error": {"code": "invalid_params", "message": "queue parameter is required"}}


def test_cancel_includes_cron_tasks_and_percent_encoded_names(api, sql, org):
    cron_task = _cron_task(sql, org.id, queue="team a/b")
    status, _, doc = api.delete("/api/v1/tasks?queue=" + quote("team a/b", safe=""))
    assert status == 200 and doc["data"]["cancelled"] == 1
    assert api.get(f"/api/v1/tasks/{cron_task}")[0] == 404


def test_cancel_leaves_other_queues_and_other_orgs_alone(server, api, sql, org, other_org):
    """§6 49."""
    intruder = server.client().with_key(other_org.key)
    theirs = _create(intruder, queue="shared", delay="1h")["task_id"]
    mine = _create(api, queue="shared", delay="1h")["task_id"]
    untouched = _create(api, queue="shared-2", delay="1h")["task_id"]
    status, _, doc = api.delete("/api/v1/tasks?queue=shared")
    assert status == 200 and doc["data"]["cancelled"] == 1
    assert api.get(f"/api/v1/tasks/{mine}")[0] == 404
    assert api.get(f"/api/v1/tasks/{untouched}")[0] == 200
    assert intruder.get(f"/api/v1/tasks/{theirs}")[0] == 200
    assert len(_executions(sql, theirs)) == 1 and len(_executions(sql, untouched)) == 1


def test_cancel_nul_queue_is_400(api):
    status, _, doc = api.delete("/api/v1/tasks?queue=a%00b")
    assert status == 400 and doc["error"]["code"] == "invalid_params"


# -- queues ---------------------------------------------------------------------------------


def test_queue_list_empty(api):
    """§6 56."""
    _create(api)  # no queue
    status, _, doc = api.get("/api/v1/queues")
    assert status == 200 and doc == {"data": []}


def test_queue_list_pause_resume(api):
    """§6 56: paused flag, idempotent pause, messages."""
    for q in ("zeta", "alpha", "Beta", "alpha"):
        _create(api, queue=q, delay="1h")
    status, _, doc = api.get("/api/v1/queues")
    assert doc == {"data": [{"name": "Beta", "paused": False}, {"name": "alpha", "paused": False},
                            {"name": "zeta", "paused": False}]}
    for _ in range(2):
        status, _, doc = api.post("/api/v1/queues/alpha/pause")
        assert status == 200
        assert doc == {"data": {"name": "alpha", "paused": True}, "message": 'Queue "alpha" paused'}
    assert {q["name"]: q["paused"] for q in api.get("/api/v1/queues")[2]["data"]} == {
        "Beta": False, "alpha": True, "zeta": False}
    status, _, doc = api.post("/api/v1/queues/alpha/resume")
    assert status == 200
    assert doc == {"data": {"name": "alpha", "paused": False}, "message": 'Queue "alpha" resumed'}
    assert all(not q["paused"] for q in api.get("/api/v1/queues")[2]["data"])


def test_pause_without_tasks_and_resume_unknown(api, sql, org):
    status, _, doc = api.post("/api/v1/queues/" + quote("night jobs") + "/pause")
    assert status == 200 and doc["data"] == {"name": "night jobs", "paused": True}
    assert doc["message"] == 'Queue "night jobs" paused'
    assert sql("SELECT paused FROM queues WHERE organization_id = $1 AND name = 'night jobs'", org.id)[0][0] is True
    assert api.get("/api/v1/queues")[2] == {"data": []}  # paused but unused: not listed
    status, _, doc = api.post("/api/v1/queues/never-seen/resume")
    assert status == 200
    assert doc == {"data": {"name": "never-seen", "paused": False}, "message": 'Queue "never-seen" resumed'}
    assert sql("SELECT count(*) FROM queues WHERE organization_id = $1 AND name = 'never-seen'", org.id)[0][0] == 0


def test_queue_list_ignores_deleted_tasks_and_other_orgs(server, api, other_org):
    """§6 50 (queue list) and tenant isolation."""
    gone = _create(api, queue="gone", delay="1h")["task_id"]
    _create(api, queue="live", delay="1h")
    api.delete(f"/api/v1/tasks/{gone}")
    intruder = server.client().with_key(other_org.key)
    _create(intruder, queue="theirs", delay="1h")
    intruder.post("/api/v1/queues/live/pause")
    assert api.get("/api/v1/queues")[2] == {"data": [{"name": "live", "paused": False}]}
    assert intruder.get("/api/v1/queues")[2] == {"data": [{"name": "theirs", "paused": False}]}


def test_resume_wakes_executors(api, pg_dsn):
    api.post("/api/v1/queues/wake/pause")
    payloads = _notifications(pg_dsn, "runlater_executions", lambda: api.post("/api/v1/queues/wake/resume"))
    assert payloads and abs(float(payloads[0]) - _now().timestamp()) < 10


def test_queue_name_with_nul_is_400(api):
    status, _, _ = api.post("/api/v1/queues/a%00b/pause")
    assert status == 400


def test_queues_need_a_key(server):
    client = server.client()
    for method, path in (("GET", "/api/v1/queues"), ("POST", "/api/v1/queues/x/pause"),
                         ("POST", "/api/v1/queues/x/resume")):
        assert client.request(method, path)[0] == 401


# -- PUT /api/v1/sync ----------------------------------------------------------------------


def _sync(api, body):
    return api.request("PUT", "/api/v1/sync", body)


def _once(name, hours=1, **extra):
    return {"name": name, "url": "https://example.com/s", "schedule_type": "once",
            "scheduled_at": _iso(_now() + timedelta(hours=hours)), **extra}


EMPTY = {"created": [], "updated": [], "deleted": [], "created_count": 0, "updated_count": 0, "deleted_count": 0}


def test_sync_empty_tasks_is_no_changes(api):
    """§6 57."""
    status, _, doc = _sync(api, {"tasks": []})
    assert status == 200
    assert doc == {"data": {**EMPTY, "tasks": EMPTY, "monitors": EMPTY, "endpoints": EMPTY},
                   "message": "No changes"}


@pytest.mark.parametrize("body", [{}, {"tasks": {"a": 1}}, {"delete_removed": True}, {"tasks": "x"}])
def test_sync_without_arrays_is_400(api, body):
    """§6 57: `{}` → 400 bad_request."""
    status, _, doc = _sync(api, body)
    assert status == 400
    assert doc == {"error": {"code": "bad_request",
                             "message": "Request body must include 'tasks', 'monitors', and/or 'endpoints' array"}}


def test_sync_creates_one_time_tasks(api, sql, org):
    """§6 57: combined message; legacy top-level counts."""
    items = [_once("first"), _once("second", hours=2, queue="sq")]
    status, _, doc = _sync(api, {"tasks": items})
    assert status == 200, doc
    assert doc["message"] == "Sync complete: 2 created"
    data = doc["data"]
    assert data["created"] == ["first", "second"] and data["created_count"] == 2
    assert data["tasks"]["created"] == ["first", "second"]
    assert data["monitors"] == EMPTY and data["endpoints"] == EMPTY
    rows = sql("SELECT id, name, scheduled_at, next_run_at, method FROM tasks WHERE organization_id = $1 ORDER BY name",
               org.id)
    assert [r["name"] for r in rows] == ["first", "second"]
    for r, item in zip(rows, items):
        assert r["next_run_at"] is None and r["method"] == "GET"
        execs = _executions(sql, r["id"])
        assert [(e["status"], e["attempt"], e["scheduled_for"]) for e in execs] == [
            ("pending", 1, _ts(item["scheduled_at"]))]


def test_sync_disabled_one_time_task_gets_no_run(api, sql, org):
    status, _, doc = _sync(api, {"tasks": [_once("off", enabled=False)]})
    assert status == 200, doc
    task_id = sql("SELECT id FROM tasks WHERE organization_id = $1", org.id)[0][0]
    assert _executions(sql, task_id) == []


def test_sync_updates_cron_tasks_by_name_and_keeps_undeclared(api, sql, org):
    """§6 57: update by name; without delete_removed nothing is deleted."""
    a = _cron_task(sql, org.id, name="A")
    b = _cron_task(sql, org.id, name="B")
    status, _, doc = _sync(api, {"tasks": [{"name": "A", "url": "https://example.com/new-a", "queue": "qa"}]})
    assert status == 200, doc
    assert doc["message"] == "Sync complete: 1 updated"
    assert doc["data"]["updated"] == ["A"] and doc["data"]["tasks"]["updated_count"] == 1
    assert api.get(f"/api/v1/tasks/{a}")[2]["data"]["url"] == "https://example.com/new-a"
    assert api.get(f"/api/v1/tasks/{b}")[0] == 200


def test_sync_delete_removed(api, sql, org):
    """§6 57: delete_removed:true deletes undeclared cron tasks (soft), one-time tasks untouched."""
    _cron_task(sql, org.id, name="keep")
    gone = _cron_task(sql, org.id, name="gone")
    once = _create(api, name="gone-too", delay="1h")["task_id"]
    status, _, doc = _sync(api, {"tasks": [{"name": "keep", "enabled": True}], "delete_removed": True})
    assert status == 200, doc
    assert doc["data"]["deleted"] == ["gone"] and doc["data"]["updated"] == ["keep"]
    assert doc["message"] == "Sync complete: 1 updated, 1 deleted"
    assert api.get(f"/api/v1/tasks/{gone}")[0] == 404
    assert sql("SELECT deleted_at IS NOT NULL FROM tasks WHERE id = $1", gone)[0][0] is True
    assert api.get(f"/api/v1/tasks/{once}")[0] == 200
    # Only the literal true deletes.
    _cron_task(sql, org.id, name="stays")
    status, _, doc = _sync(api, {"tasks": [], "delete_removed": "true"})
    assert doc["data"]["deleted"] == []


def test_sync_duplicate_names_match_the_oldest(api, sql, org):
    old = _cron_task(sql, org.id, name="dup", inserted_at=_now() - timedelta(days=1))
    new = _cron_task(sql, org.id, name="dup")
    status, _, doc = _sync(api, {"tasks": [{"name": "dup", "queue": "matched"}]})
    assert status == 200, doc
    assert api.get(f"/api/v1/tasks/{old}")[2]["data"]["queue"] == "matched"
    assert api.get(f"/api/v1/tasks/{new}")[2]["data"]["queue"] is None


def test_sync_invalid_item_rolls_everything_back(api, sql, org):
    """§6 57: invalid item → 422 validation_error with list-shaped details; nothing written."""
    a = _cron_task(sql, org.id, name="A")
    status, _, doc = _sync(api, {"tasks": [
        _once("fine"),
        {"name": "A", "url": "https://example.com/changed"},
        {"name": "broken", "url": "bad", "schedule_type": "once", "timeout_ms": 5},
        {"url": "https://example.com/no-name"},
        {"name": "", "url": "https://example.com"},
        {"name": "no type", "url": "https://example.com"},
        "not an object",
    ], "delete_removed": True})
    assert status == 422
    assert doc == {"error": {"code": "validation_error", "details": [
        {"name": "broken", "error": "scheduled_at: can't be blank; timeout_ms: must be greater than or equal to 1000; "
                                    "url: must be a valid HTTP or HTTPS URL"},
        {"name": None, "error": "name is required"},
        {"name": "", "error": "name is required"},
        {"name": "no type", "error": "schedule_type: can't be blank"},
        {"name": None, "error": "base: is invalid"},
    ]}}
    assert sql("SELECT count(*) FROM tasks WHERE organization_id = $1", org.id)[0][0] == 1
    assert api.get(f"/api/v1/tasks/{a}")[2]["data"]["url"] == "https://example.com/cron"


def test_sync_past_scheduled_at_is_an_item_error(api):
    status, _, doc = _sync(api, {"tasks": [_once("late", hours=-1)]})
    assert status == 422
    assert doc["error"]["details"] == [{"name": "late", "error": "scheduled_at: must be in the future"}]


def test_sync_monitors_and_endpoints(api, sql, org):
    """Empty monitor/endpoint lists are accepted; declaring any is refused (no such resources here)."""
    status, _, doc = _sync(api, {"tasks": [_once("t")], "monitors": [], "endpoints": []})
    assert status == 200 and doc["message"] == "Sync complete: 1 created"
    status, _, doc = _sync(api, {"monitors": [], "endpoints": []})
    assert status == 200 and doc["message"] == "No changes"
    status, _, doc = _sync(api, {"tasks": [_once("u")], "monitors": [{"name": "Heartbeat"}],
                                 "endpoints": [{"name": "Stripe", "forward_url": "https://x.io"}]})
    assert status == 422
    assert doc["error"] == {"code": "validation_error", "details": [
        {"name": "Heartbeat", "error": "base: monitors are not supported by this server"}]}
    assert sql("SELECT count(*) FROM tasks WHERE organization_id = $1", org.id)[0][0] == 1  # "u" rolled back
    status, _, doc = _sync(api, {"endpoints": [{"name": "Stripe", "forward_url": "https://x.io"}]})
    assert status == 422
    assert doc["error"]["details"] == [{"name": "Stripe", "error": "base: endpoints are not supported by this server"}]


@needs_cron
def test_sync_creates_and_updates_cron_tasks(api, sql, org):
    status, _, doc = _sync(api, {"tasks": [
        {"name": "hourly", "url": "https://example.com/h", "schedule_type": "cron", "cron_expression": "0 * * * *"},
        {"name": "daily", "url": "https://example.com/d", "schedule_type": "cron", "cron_expression": "0 9 * * *"},
    ]})
    assert status == 200, doc
    assert doc["message"] == "Sync complete: 2 created"
    rows = sql("SELECT name, interval_minutes, next_run_at FROM tasks WHERE organization_id = $1 ORDER BY name",
               org.id)
    assert [(r["name"], r["interval_minutes"]) for r in rows] == [("daily", 1440), ("hourly", 60)]
    assert all(r["next_run_at"] is not None and r["next_run_at"] > _now() for r in rows)
    assert sql("SELECT count(*) FROM executions WHERE organization_id = $1", org.id)[0][0] == 0
    status, _, doc = _sync(api, {"tasks": [
        {"name": "hourly", "cron_expression": "30 * * * *"},
        {"name": "new", "url": "https://example.com/n", "schedule_type": "cron", "cron_expression": "@daily"},
    ], "delete_removed": True})
    assert status == 200, doc
    assert doc["message"] == "Sync complete: 1 created, 1 updated, 1 deleted"
    assert doc["data"]["tasks"] == {"created": ["new"], "updated": ["hourly"], "deleted": ["daily"],
                                    "created_count": 1, "updated_count": 1, "deleted_count": 1}
    next_run = sql("SELECT next_run_at FROM tasks WHERE organization_id = $1 AND name = 'hourly' "
                   "AND deleted_at IS NULL", org.id)[0][0]
    assert next_run.minute == 30


@needs_cron
def test_sync_free_tier_interval(free_api):
    status, _, doc = _sync(free_api, {"tasks": [
        {"name": "fast", "url": "https://example.com", "schedule_type": "cron", "cron_expression": "* * * * *"}]})
    assert status == 422
    assert doc["error"]["details"] == [{"name": "fast", "error": "cron_expression: " + TIER_MESSAGE}]


def test_sync_is_tenant_isolated(server, api, sql, org, other_org):
    theirs = _cron_task(sql, other_org.id, name="shared-name")
    status, _, doc = _sync(api, {"tasks": [_once("shared-name")], "delete_removed": True})
    assert status == 200 and doc["data"]["created"] == ["shared-name"] and doc["data"]["deleted"] == []
    intruder = server.client().with_key(other_org.key)
    assert intruder.get(f"/api/v1/tasks/{theirs}")[2]["data"]["url"] == "https://example.com/cron"


# -- bad input never yields a 5xx ------------------------------------------------------------

_GARBAGE = [
    None, True, 0, -1, 10**20, 1.5, "", " ", "\u0000", "x" * 300, [], [None], {}, {"a": {"b": [1]}},
    "2026-13-45T99:99:99Z", "@reboot", "* * * * * * *",
]
_FIELDS = ["name", "url", "method", "headers", "body", "schedule_type", "cron_expression", "scheduled_at",
           "enabled", "timeout_ms", "retry_attempts", "callback_url", "expected_status_codes", "queue",
           "notify_on_failure", "on_failure_url", "timezone", "items", "run_at", "delay", "tasks"]


def test_bad_input_never_gives_a_5xx(api, sql, org):
    task = _create(api, delay="1h")["task_id"]
    cron_task = _cron_task(sql, org.id, name="c")
    for field in _FIELDS:
        for value in _GARBAGE:
            body = {field: value}
            checks = [
                ("PUT", f"/api/v1/tasks/{task}", body),
                ("PATCH", f"/api/v1/tasks/{cron_task}", body),
                ("POST", "/api/v1/tasks/batch", {"url": "https://x.io", "queue": "q", "items": [1], **body}),
                ("PUT", "/api/v1/sync", {"tasks": [{"name": "c", **body}, {"name": "n", "schedule_type": "once",
                                                                         "url": "https://x.io", **body}]}),
                ("PUT", "/api/v1/sync", {"tasks": [value], "monitors": value}),
            ]
            for method, path, payload in checks:
                status, _, doc = api.request(method, path, payload)
                assert status < 500, (method, path, payload, status, doc)
    for raw in (b"[]", b"null", b'"x"', b"{", b"\xff"):
        for method, path in (("PUT", f"/api/v1/tasks/{task}"), ("POST", "/api/v1/tasks/batch"),
                             ("PUT", "/api/v1/sync"), ("DELETE", "/api/v1/tasks?queue=q")):
            status, _, _ = api.request(method, path, raw=raw)
            assert status < 500, (method, path, raw)


# -- helpers -----------------------------------------------------------------------------------


def _notifications(dsn: str, channel: str, action) -> list[str]:
    """Payloads NOTIFY'd on ``channel`` while ``action`` (a blocking HTTP call) runs."""

    async def go() -> list[str]:
        got: list[str] = []
        arrived = asyncio.Event()
        conn = await asyncpg.connect(dsn)
        try:
            def on_notify(_conn, _pid, _channel, payload):
                got.append(payload)
                arrived.set()

            await conn.add_listener(channel, on_notify)
            await asyncio.to_thread(action)
            try:
                await asyncio.wait_for(arrived.wait(), 5)
            except TimeoutError:
                pass
        finally:
            await conn.close()
        return got

    return run(go())
