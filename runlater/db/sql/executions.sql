-- name: claim_due
-- Claim up to $1 due executions for one executor, in one statement.
--
-- Rules, all enforced here so they hold under any number of executors:
-- * only pending rows due now, oldest first (executions_pending_idx);
-- * an organisation never exceeds its max_concurrency running executions: rows of an
--   organisation at its cap are skipped in the scan, so its backlog cannot hold back
--   another organisation's due rows; within one claim, org_rank counts the rows this
--   statement itself takes;
-- * a named queue runs strictly one execution at a time per organisation: a queue with
--   a running row is skipped, and only the oldest due row of a queue (queue_rank = 1)
--   may be taken. If a concurrent executor holds the lock on that row, SKIP LOCKED
--   skips it and the queue's next row is not eligible (its rank is 2), so two
--   executors can never start the same queue at once. The unique index
--   executions_queue_running_uniq is the last line of defence;
-- * paused queues are not claimed;
-- * the lease (timeout + $2 seconds) bounds how long a crashed executor can hold a row.
-- Rows are re-checked after locking (status = 'pending'); READ COMMITTED re-evaluates
-- the predicate on the latest row version. Task and organisation fields the delivery
-- needs come back with the claim, so no further query is made per execution. A
-- missing task (hard-deleted) still returns the row, with NULL task fields.
WITH running AS (
    SELECT organization_id, count(*) AS n
    FROM executions WHERE status = 'running'
    GROUP BY organization_id
), candidates AS (
    SELECT c.id, c.organization_id, c.queue,
           row_number() OVER (PARTITION BY c.organization_id, c.queue ORDER BY c.scheduled_for, c.id) AS queue_rank,
           row_number() OVER (PARTITION BY c.organization_id ORDER BY c.scheduled_for, c.id) AS org_rank,
           c.headroom
    FROM (
        SELECT e.id, e.organization_id, e.queue, e.scheduled_for,
               o.max_concurrency - coalesce(r.n, 0) AS headroom
        FROM executions e
        JOIN organizations o ON o.id = e.organization_id
        LEFT JOIN running r ON r.organization_id = e.organization_id
        WHERE e.status = 'pending'
          AND e.scheduled_for <= now()
          AND coalesce(r.n, 0) < o.max_concurrency
          AND (e.queue IS NULL OR NOT EXISTS (
                SELECT 1 FROM executions x
                WHERE x.organization_id = e.organization_id AND x.queue = e.queue AND x.status = 'running'))
          AND (e.queue IS NULL OR NOT EXISTS (
                SELECT 1 FROM queues q
                WHERE q.organization_id = e.organization_id AND q.name = e.queue AND q.paused))
        ORDER BY e.scheduled_for
        LIMIT $1 * 2
    ) c
), locked AS (
    SELECT e.id
    FROM executions e
    JOIN candidates c ON c.id = e.id
    WHERE e.status = 'pending'
      AND (c.queue IS NULL OR c.queue_rank = 1)
      AND c.org_rank <= c.headroom
    ORDER BY e.scheduled_for
    LIMIT $1
    FOR UPDATE OF e SKIP LOCKED
), claimed AS (
    SELECT l.id, t.url, t.method, t.headers, t.body, t.timeout_ms, t.retry_attempts,
           t.schedule_type, t.expected_status_codes, t.expected_body_pattern, t.name,
           t.callback_url AS task_callback_url, t.last_execution_status,
           t.notify_on_failure, t.notify_on_recovery, t.on_failure_url, t.on_recovery_url,
           o.webhook_secret, o.webhook_secret_previous
    FROM locked l
    JOIN executions x ON x.id = l.id
    JOIN organizations o ON o.id = x.organization_id
    LEFT JOIN tasks t ON t.id = x.task_id
)
UPDATE executions e
SET status = 'running',
    started_at = clock_timestamp(),
    updated_at = now(),
    lease_expires_at = clock_timestamp() + make_interval(secs => coalesce(c.timeout_ms, 30000) / 1000.0 + $2)
FROM claimed c
WHERE e.id = c.id
RETURNING e.id, e.task_id, e.organization_id, e.attempt, e.scheduled_for, e.started_at,
          e.callback_url, e.queue, c.url, c.method, c.headers::text AS headers, c.body,
          c.timeout_ms, c.retry_attempts, c.schedule_type, c.expected_status_codes,
          c.expected_body_pattern, c.name, c.task_callback_url, c.last_execution_status,
          c.notify_on_failure, c.notify_on_recovery, c.on_failure_url, c.on_recovery_url,
          c.webhook_secret, c.webhook_secret_previous;

-- name: next_due_at
-- When the next pending execution falls due (for the executor's sleep timer).
SELECT min(scheduled_for) FROM executions WHERE status = 'pending';

-- name: release_expired_leases
-- Put executions whose lease ran out (their executor died) back to pending without
-- consuming an attempt. Bounded per call; SKIP LOCKED lets several executors share it.
UPDATE executions e
SET status = 'pending', started_at = NULL, lease_expires_at = NULL, updated_at = now()
WHERE e.id IN (
    SELECT id FROM executions
    WHERE status = 'running' AND lease_expires_at < now()
    ORDER BY lease_expires_at
    LIMIT 1000
    FOR UPDATE SKIP LOCKED)
RETURNING e.id;

-- name: record_results
-- Write a batch of finished deliveries and create their retries in one statement.
-- The update is fenced on started_at (the claim's own timestamp): a late result for a
-- row whose lease expired and was claimed again cannot overwrite the newer claim.
-- A retry row is inserted only for results whose update happened, so a result is
-- never applied twice. Retries copy the task's queue and callback (upstream rule).
WITH input AS (
    SELECT * FROM unnest(
        $1::uuid[], $2::timestamptz[], $3::text[], $4::int[], $5::int[], $6::text[],
        $7::text[], $8::timestamptz[], $9::uuid[], $10::timestamptz[]
    ) AS u(id, fence, status, status_code, duration_ms, response_body,
           error_message, finished_at, retry_id, retry_at)
), done AS (
    UPDATE executions e
    SET status = i.status, status_code = i.status_code, duration_ms = i.duration_ms,
        response_body = i.response_body, error_message = i.error_message,
        finished_at = i.finished_at, lease_expires_at = NULL, updated_at = now()
    FROM input i
    WHERE e.id = i.id AND e.status = 'running' AND e.started_at = i.fence
    RETURNING e.id, e.task_id, e.organization_id, e.attempt, i.retry_id, i.retry_at
), retried AS (
    INSERT INTO executions (id, task_id, organization_id, status, scheduled_for, attempt, callback_url, queue)
    SELECT d.retry_id, d.task_id, d.organization_id, 'pending', d.retry_at, d.attempt + 1,
           t.callback_url, t.queue
    FROM done d JOIN tasks t ON t.id = d.task_id
    WHERE d.retry_id IS NOT NULL AND t.deleted_at IS NULL
    RETURNING scheduled_for
)
SELECT array_agg(d.id) AS applied,
       (SELECT extract(epoch FROM min(scheduled_for)) FROM retried) AS next_retry
FROM done d;

-- name: requeue
-- Return claimed executions to pending at a later time without consuming an attempt
-- (their target host is in back-off). Fenced like record_results.
UPDATE executions e
SET status = 'pending', scheduled_for = u.at, started_at = NULL, lease_expires_at = NULL, updated_at = now()
FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[]) AS u(id, fence, at)
WHERE e.id = u.id AND e.status = 'running' AND e.started_at = u.fence;

-- name: release_claims
-- On graceful stop: give back executions this executor claimed but never started.
UPDATE executions e
SET status = 'pending', started_at = NULL, lease_expires_at = NULL, updated_at = now()
FROM unnest($1::uuid[], $2::timestamptz[]) AS u(id, fence)
WHERE e.id = u.id AND e.status = 'running' AND e.started_at = u.fence;

-- name: flush_task_outcomes
-- Buffered per-task bookkeeping: when each task last ran and, for final outcomes, how
-- its last run ended (the "previous run" that failure/recovery transitions compare to).
UPDATE tasks t
SET last_execution_at = greatest(t.last_execution_at, u.at),
    last_execution_status = coalesce(u.status, t.last_execution_status)
FROM unnest($1::uuid[], $2::timestamptz[], $3::text[]) AS u(id, at, status)
WHERE t.id = u.id;

-- name: flush_org_counts
-- Buffered monthly execution counters (first attempts only).
UPDATE organizations o
SET monthly_execution_count = o.monthly_execution_count + u.n
FROM unnest($1::uuid[], $2::bigint[]) AS u(id, n)
WHERE o.id = u.id;
