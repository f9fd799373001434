-- name: lock_task
-- A live task of the organisation with every column an update needs, locked for the
-- rest of the transaction so concurrent updates of the same task (and the scheduler's
-- advance of its next run) apply one after the other.
SELECT t.id, t.name, t.url, t.method, t.headers::text AS headers, t.body, t.schedule_type,
       t.cron_expression, t.timezone, t.interval_minutes, t.scheduled_at, t.enabled,
       t.retry_attempts, t.timeout_ms, t.next_run_at, t.callback_url, t.expected_status_codes,
       t.expected_body_pattern, t.queue, t.notify_on_failure, t.notify_on_recovery,
       t.on_failure_url, t.on_recovery_url
FROM tasks t
WHERE t.id = $1 AND t.organization_id = $2 AND t.deleted_at IS NULL
FOR UPDATE OF t;

-- name: lock_cron_tasks
-- The set PUT /sync matches declared tasks against: the organisation's live cron
-- tasks, newest first (with duplicate names the caller keeps the oldest, as upstream
-- does), locked so a concurrent sync or update cannot interleave with this one.
-- Columns as lock_task.
SELECT t.id, t.name, t.url, t.method, t.headers::text AS headers, t.body, t.schedule_type,
       t.cron_expression, t.timezone, t.interval_minutes, t.scheduled_at, t.enabled,
       t.retry_attempts, t.timeout_ms, t.next_run_at, t.callback_url, t.expected_status_codes,
       t.expected_body_pattern, t.queue, t.notify_on_failure, t.notify_on_recovery,
       t.on_failure_url, t.on_recovery_url
FROM tasks t
WHERE t.organization_id = $1 AND t.deleted_at IS NULL AND t.schedule_type = 'cron'
ORDER BY t.inserted_at DESC, t.id DESC
FOR UPDATE OF t;

-- name: pending_until
-- The latest due time of each given task's pending executions (tasks without any are
-- absent). A cron re-schedule starts after it, so a slot the scheduler has already
-- queued is not queued again. A statement of its own, run after the tasks are locked:
-- it then sees what a scheduler tick that held the lock committed, which a sub-select
-- of the locking statement (evaluated on that statement's older snapshot) would not.
SELECT task_id, max(scheduled_for) AS pending_until
FROM executions
WHERE organization_id = $1 AND task_id = ANY($2::uuid[]) AND status = 'pending'
GROUP BY task_id;

-- name: update_task
-- Write every column of a task as the caller computed it (a partial update is merged
-- with the locked row in Python, so one statement serves every combination of fields)
-- and return the task as API JSON.
UPDATE tasks
SET name = $3, url = $4, method = $5, headers = $6::text::jsonb, body = $7,
    schedule_type = $8, cron_expression = $9, timezone = $10, interval_minutes = $11,
    scheduled_at = $12, enabled = $13, retry_attempts = $14, timeout_ms = $15,
    next_run_at = $16, callback_url = $17, expected_status_codes = $18,
    expected_body_pattern = $19, queue = $20, notify_on_failure = $21,
    notify_on_recovery = $22, on_failure_url = $23, on_recovery_url = $24,
    updated_at = now()
WHERE id = $1 AND organization_id = $2
RETURNING rl_task_json(tasks)::text;

-- name: insert_task
-- One task of any schedule type (PUT /sync creates), columns in update_task's order.
-- A one-time task's first execution is added by add_once_execution in the same
-- transaction.
INSERT INTO tasks (id, organization_id, name, url, method, headers, body, schedule_type,
                   cron_expression, timezone, interval_minutes, scheduled_at, enabled,
                   retry_attempts, timeout_ms, next_run_at, callback_url,
                   expected_status_codes, expected_body_pattern, queue, notify_on_failure,
                   notify_on_recovery, on_failure_url, on_recovery_url)
VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
        $17, $18, $19, $20, $21, $22, $23, $24);

-- name: add_once_execution
-- The first (pending, attempt 1) execution of a one-time task: for a sync-created task,
-- or a cron task switched to one-time. Executors are woken at commit with its due time.
WITH created AS (
    INSERT INTO executions (id, task_id, organization_id, status, scheduled_for, attempt,
                            callback_url, queue)
    VALUES ($1, $2, $3, 'pending', $4, 1, $5, $6)
    RETURNING scheduled_for
)
SELECT pg_notify('runlater_executions', extract(epoch FROM scheduled_for)::text)
FROM created;

-- name: reschedule_pending
-- Keep a task's pending executions in step with an update (DECISIONS 10):
-- * $3 not null: the one-time run that has not started yet — attempt 1, still pending,
--   due at the old scheduled_at $4 — moves to $3. A run that already started or
--   finished is left alone, so an update never causes a second run.
-- * queue and callback_url are copies of the task's taken when an execution is
--   created; pending ones follow the task, so cancelling the task's new queue also
--   cancels them and the callback goes where the task now says.
-- Status 'pending' is re-checked on the latest row version, so a row an executor
-- claims concurrently is not moved. Executors are woken with the earliest due time.
WITH changed AS (
    UPDATE executions e
    SET scheduled_for = CASE WHEN $3::timestamptz IS NOT NULL AND e.attempt = 1
                                  AND e.scheduled_for = $4::timestamptz
                             THEN $3::timestamptz ELSE e.scheduled_for END,
        queue = $5, callback_url = $6, updated_at = now()
    WHERE e.task_id = $1 AND e.organization_id = $2 AND e.status = 'pending'
    RETURNING e.scheduled_for
)
SELECT pg_notify('runlater_executions', extract(epoch FROM min(scheduled_for))::text)
FROM changed
HAVING count(*) > 0;

-- name: drop_once_execution
-- A one-time task switched to cron: its run that has not started yet is superseded by
-- the cron schedule.
DELETE FROM executions
WHERE task_id = $1 AND organization_id = $2 AND status = 'pending' AND attempt = 1
  AND scheduled_for = $3;

-- name: notify_scheduler
-- Wake the cron scheduler at commit: a task's next run changed (payload: its epoch
-- seconds), so it need not wait for its next poll.
SELECT pg_notify('runlater_scheduler', extract(epoch FROM $1::timestamptz)::bigint::text);

-- name: cancel_queue
-- DELETE /api/v1/tasks?queue=: soft-delete every live task of the organisation in the
-- queue (cron tasks included) and hard-delete the organisation's pending executions
-- of that queue, plus any other pending execution of the cancelled tasks, in one
-- statement. Returns the number of tasks cancelled. Both predicates lead with the
-- organisation, so another tenant's queue of the same name is never touched.
WITH cancelled AS (
    UPDATE tasks
    SET deleted_at = now(), enabled = false, next_run_at = NULL, updated_at = now()
    WHERE organization_id = $1 AND queue = $2 AND deleted_at IS NULL
    RETURNING id
), dropped AS (
    DELETE FROM executions e
    WHERE e.organization_id = $1 AND e.status = 'pending'
      AND (e.queue = $2 OR e.task_id IN (SELECT id FROM cancelled))
)
SELECT count(*) FROM cancelled;

-- name: list_queues
-- GET /api/v1/queues: the distinct queue names of the organisation's live tasks
-- (tasks_org_queue_idx), byte-wise sorted like upstream's string sort, each with its
-- paused flag; queue rows without live tasks are not listed.
SELECT coalesce(json_agg(json_build_object('name', n.queue, 'paused', coalesce(q.paused, false))
                         ORDER BY n.queue COLLATE "C"), '[]')::text
FROM (SELECT DISTINCT queue FROM tasks
      WHERE organization_id = $1 AND deleted_at IS NULL AND queue IS NOT NULL) n
LEFT JOIN queues q ON q.organization_id = $1 AND q.name = n.queue;

-- name: pause_queue
-- Get-or-create the queue row and mark it paused; idempotent.
INSERT INTO queues (organization_id, name, paused) VALUES ($1, $2, true)
ON CONFLICT (organization_id, name) DO UPDATE SET paused = true, updated_at = now();

-- name: resume_queue
-- Unpause the queue if it has a row (resuming an unknown queue is a no-op), then wake
-- executors at commit so the queue's due executions are claimed at once rather than
-- at their next timer.
WITH resumed AS (
    UPDATE queues SET paused = false, updated_at = now()
    WHERE organization_id = $1 AND name = $2 AND paused
)
SELECT pg_notify('runlater_executions', extract(epoch FROM now())::text);

-- name: soft_delete_tasks
-- PUT /sync with delete_removed: soft-delete the given live tasks of the organisation
-- (as delete_task does for one) and hard-delete their pending executions. Returns the
-- names of the tasks deleted.
WITH deleted AS (
    UPDATE tasks
    SET deleted_at = now(), enabled = false, next_run_at = NULL, updated_at = now()
    WHERE organization_id = $1 AND id = ANY($2::uuid[]) AND deleted_at IS NULL
    RETURNING id, name
), dropped AS (
    DELETE FROM executions e USING deleted d
    WHERE e.task_id = d.id AND e.status = 'pending'
)
SELECT name FROM deleted;
