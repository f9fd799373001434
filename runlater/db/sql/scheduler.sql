-- name: create_cron_task
-- POST /api/v1/tasks with `cron`: insert one cron task and return it as API JSON.
-- Validation, interval_minutes and next_run_at come from the caller
-- (validation.parse_cron_create). The NOTIFY, delivered at commit, tells the
-- scheduler a new cursor exists (payload: its epoch seconds) so a task whose first
-- slot is seconds away does not wait for the next poll; a disabled task has no cursor
-- and wakes nobody.
WITH created AS (
    INSERT INTO tasks AS t (id, organization_id, name, url, method, headers, body, schedule_type,
                            cron_expression, timezone, interval_minutes, enabled, timeout_ms,
                            retry_attempts, next_run_at, callback_url, expected_status_codes,
                            expected_body_pattern, queue, notify_on_failure, notify_on_recovery,
                            on_failure_url, on_recovery_url)
    VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, 'cron',
            $8, $9, $10, $11, $12,
            $13, $14, $15, $16,
            $17, $18, $19, $20,
            $21, $22)
    RETURNING rl_task_json(t)::text AS doc, t.next_run_at
)
SELECT doc,
       CASE WHEN next_run_at IS NOT NULL
            THEN pg_notify('runlater_scheduler', extract(epoch FROM next_run_at)::bigint::text)
       END AS notified
FROM created;

-- name: scheduler_try_lock
-- Scheduler leadership: a session-level advisory lock on the scheduler's own
-- connection. It is released when that session ends, however the process dies, so a
-- standby scheduler takes over on its next attempt.
SELECT pg_try_advisory_lock($1);

-- name: scheduler_unlock
-- Give leadership up on a clean stop, before the connection closes.
SELECT pg_advisory_unlock($1);

-- name: scheduler_due_tasks
-- One chunk of tasks whose cursor is due by $1 (now + lookahead), after the keyset
-- position ($2, $3) and in (next_run_at, id) order, so a tick pages through any number
-- of due tasks without re-reading rows and walks tasks_next_run_idx in index order.
-- The organisation's tier and monthly usage come with each task: the monthly-limit
-- check of a whole chunk costs no further query. Usage is the larger of the executions
-- finished (organizations.monthly_execution_count) and those created through the API
-- this month (execution_usage), the same figure the API's quota check uses. Nothing is
-- locked here: the write (scheduler_advance) re-checks each cursor, which is what makes
-- a slot happen once.
SELECT t.id, t.organization_id, t.schedule_type, t.cron_expression, t.timezone,
       t.next_run_at, t.inserted_at, o.tier,
       greatest(o.monthly_execution_count, coalesce(u.created, 0)) AS monthly_execution_count
FROM tasks t
JOIN organizations o ON o.id = t.organization_id
LEFT JOIN execution_usage u
       ON u.organization_id = t.organization_id
      AND u.month = date_trunc('month', now() AT TIME ZONE 'UTC')::date
WHERE t.enabled AND t.deleted_at IS NULL AND t.next_run_at IS NOT NULL
  AND t.next_run_at <= $1
  AND (t.next_run_at, t.id) > ($2::timestamptz, $3::uuid)
ORDER BY t.next_run_at, t.id
LIMIT $4;

-- name: scheduler_advance
-- Write one chunk of a tick in one statement: move each task's cursor and insert the
-- executions of the slots it passed.
--
-- Schedules ($4..$8, one element per distinct (cursor, expression, time zone) of the
-- chunk; element k is schedule k): the cursor as read, the new cursor (NULL: no
-- further run), the expression and time zone it was computed from, and the slot a run
-- of it is for. Tasks sharing a schedule share all of this, so the per-task arrays
-- stay small:
-- $1 task ids, $2 each task's schedule number, $3 the execution id of its run (NULL:
-- no run, e.g. over the monthly limit).
-- $9..$11, one element per missed slot: execution id, task id, slot time.
-- $12: the tick's "now".
--
-- Exactly once: a task is advanced only if its row still has the cursor, expression
-- and time zone we computed from, and is still enabled and live; executions are
-- inserted only for tasks advanced here (the join on `advanced`). A second scheduler
-- working from the same read, or an API edit that changed the schedule meanwhile,
-- finds the guard false (READ COMMITTED re-checks it on the newest row version after
-- waiting for the other writer) and writes nothing for that task.
--
-- Pending rows copy the task's queue and callback_url at this moment, as every
-- creator does; missed rows are final at once and copy neither (upstream engine §1.1).
-- One NOTIFY per chunk, at commit, with the earliest pending slot (epoch seconds) so
-- executors arm a timer for it.
WITH schedule AS (
    SELECT *
    FROM unnest($4::timestamptz[], $5::timestamptz[], $6::text[], $7::text[], $8::timestamptz[])
         WITH ORDINALITY AS s(old_next, new_next, cron_expression, timezone, run_at, n)
), task AS (
    SELECT *
    FROM unnest($1::uuid[], $2::int[], $3::uuid[]) AS u(id, schedule, run_id)
), advanced AS (
    UPDATE tasks t
    SET next_run_at = s.new_next
    FROM task u
    JOIN schedule s ON s.n = u.schedule
    WHERE t.id = u.id
      AND t.next_run_at = s.old_next
      AND t.cron_expression IS NOT DISTINCT FROM s.cron_expression
      AND t.timezone IS NOT DISTINCT FROM s.timezone
      AND t.enabled AND t.deleted_at IS NULL
    RETURNING t.id, t.organization_id, t.queue, t.callback_url, s.run_at, u.run_id
), created AS (
    INSERT INTO executions (id, task_id, organization_id, status, scheduled_for, finished_at,
                            error_message, attempt, callback_url, queue)
    SELECT a.run_id, a.id, a.organization_id, 'pending', a.run_at, NULL, NULL, 1,
           a.callback_url, a.queue
    FROM advanced a
    WHERE a.run_id IS NOT NULL
    UNION ALL
    SELECT m.id, a.id, a.organization_id, 'missed', m.scheduled_for, $12::timestamptz,
           'Scheduler was unavailable at scheduled time', 1, NULL, NULL
    FROM unnest($9::uuid[], $10::uuid[], $11::timestamptz[]) AS m(id, task_id, scheduled_for)
    JOIN advanced a ON a.id = m.task_id
    RETURNING status, scheduled_for
), counted AS (
    -- Runs created here count toward the organization's month at once, like API creates
    -- (execution_usage, migration 0003): the quota then sees cron runs when they are
    -- scheduled, not only once they have finished. Missed slots never ran and do not count.
    INSERT INTO execution_usage AS u (organization_id, month, created)
    SELECT a.organization_id, date_trunc('month', $12::timestamptz AT TIME ZONE 'UTC')::date, count(*)
    FROM advanced a
    WHERE a.run_id IS NOT NULL
    GROUP BY a.organization_id
    ON CONFLICT (organization_id, month)
    DO UPDATE SET created = u.created + excluded.created, updated_at = now()
)
SELECT (SELECT count(*) FROM advanced) AS advanced,
       count(*) FILTER (WHERE status = 'pending') AS pending,
       count(*) FILTER (WHERE status = 'missed') AS missed,
       CASE WHEN count(*) FILTER (WHERE status = 'pending') > 0
            THEN pg_notify('runlater_executions',
                           extract(epoch FROM min(scheduled_for) FILTER (WHERE status = 'pending'))::text)
       END AS notified
FROM created;
