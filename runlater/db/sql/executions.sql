-- name: claim_due
-- Claim up to $1 due executions for one executor, in one statement.
--
-- Rules, all enforced here so they hold under any number of executors:
-- * fairness: organizations take turns. Each organization below its max_concurrency
--   contributes its oldest due rows (executions_org_pending_idx, at most its headroom),
--   and rows are taken by their rank within their organization first (every
--   organization's 1st row, then every 2nd row, ...), oldest first within a rank. So a
--   backlog of one organization never delays another's due row past one claim.
-- * an organization never exceeds its max_concurrency running executions: org_rank
--   counts the rows this statement itself takes against the headroom;
-- * a named queue runs strictly one execution at a time per organization: a queue with
--   a running row is skipped, and only its oldest due row (queue_rank = 1) may be taken.
--   If a concurrent executor holds the lock on that row, SKIP LOCKED skips it and the
--   queue's next row is not eligible (rank 2), so two executors never start one queue
--   at once; the unique index executions_queue_running_uniq is the last line of defence;
-- * paused queues are not claimed;
-- * the lease (timeout + $2 seconds) bounds how long a crashed executor holds a row.
-- Rows are re-checked after locking (status = 'pending'); READ COMMITTED re-evaluates
-- the predicate on the latest row version. Task and organization fields the delivery
-- needs come back with the claim, so no further query is made per execution. A missing
-- task (hard-deleted) still returns the row, with NULL task fields.
-- Executors run this with plan_cache_mode = force_custom_plan: a cached generic plan,
-- chosen while the table was small, turned the candidate scan into a per-row loop
-- (seconds per claim with a few thousand due rows).
WITH running AS (
    SELECT organization_id, count(*) AS n
    FROM executions WHERE status = 'running'
    GROUP BY organization_id
), orgs AS (
    SELECT o.id, o.max_concurrency - coalesce(r.n, 0) AS headroom
    FROM organizations o
    LEFT JOIN running r ON r.organization_id = o.id
    WHERE coalesce(r.n, 0) < o.max_concurrency
), due AS (
    SELECT c.id, c.organization_id, c.queue, c.scheduled_for, orgs.headroom
    FROM orgs
    CROSS JOIN LATERAL (
        SELECT e.id, e.organization_id, e.queue, e.scheduled_for
        FROM executions e
        WHERE e.organization_id = orgs.id
          AND e.status = 'pending'
          AND e.scheduled_for <= now()
          AND (e.queue IS NULL OR NOT EXISTS (
                SELECT 1 FROM executions x
                WHERE x.organization_id = e.organization_id AND x.queue = e.queue AND x.status = 'running'))
          AND (e.queue IS NULL OR NOT EXISTS (
                SELECT 1 FROM queues q
                WHERE q.organization_id = e.organization_id AND q.name = e.queue AND q.paused))
        ORDER BY e.scheduled_for
        LIMIT least(orgs.headroom, $1)
    ) c
), candidates AS (
    SELECT d.id, d.queue,
           row_number() OVER (PARTITION BY d.organization_id, d.queue ORDER BY d.scheduled_for, d.id) AS queue_rank,
           row_number() OVER (PARTITION BY d.organization_id ORDER BY d.scheduled_for, d.id) AS org_rank,
           d.headroom, d.scheduled_for
    FROM due d
), locked AS (
    -- Candidates in claim order, each locked through its primary key as it is reached;
    -- the LIMIT stops the loop, so no more than $1 rows are ever locked. (A join of
    -- candidates to executions let the planner hash-join against a scan of the whole
    -- table: linear in the table's size on every claim.)
    -- The lookup is by id alone and the status is checked on the locked row, outside:
    -- with `status = 'pending'` inside, a planner holding stale statistics (a table
    -- analyzed while nearly empty) chose executions_pending_idx and filtered it by id,
    -- a scan of every pending row for each candidate (230-410 ms per claim under load).
    -- LIMIT 1 (ids are unique) keeps the planner from pushing the status test back
    -- into the lookup. The locked row is the latest version (READ COMMITTED re-reads a
    -- row updated meanwhile), so its status is current; a row that stopped being
    -- pending is locked until the claim commits but not taken.
    SELECT l.id, l.organization_id, l.task_id
    FROM (SELECT c.id FROM candidates c
          WHERE (c.queue IS NULL OR c.queue_rank = 1) AND c.org_rank <= c.headroom
          ORDER BY c.org_rank, c.scheduled_for) c
    CROSS JOIN LATERAL (
        SELECT e.id, e.organization_id, e.task_id, e.status
        FROM executions e
        WHERE e.id = c.id
        LIMIT 1
        FOR UPDATE SKIP LOCKED
    ) l
    WHERE l.status = 'pending'
    LIMIT $1
), claimed AS (
    SELECT l.id, t.url, t.method, t.headers, t.body, t.timeout_ms, t.retry_attempts,
           t.schedule_type, t.expected_status_codes, t.expected_body_pattern, t.name,
           t.callback_url AS task_callback_url, t.last_execution_status,
           t.notify_on_failure, t.notify_on_recovery, t.on_failure_url, t.on_recovery_url,
           o.webhook_secret, o.webhook_secret_previous
    FROM locked l
    JOIN organizations o ON o.id = l.organization_id
    LEFT JOIN tasks t ON t.id = l.task_id
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
-- Write a batch of finished deliveries, create their retries and record each task's
-- latest outcome, in one statement.
-- The update is fenced on started_at (the claim's own timestamp): a late result for a
-- row whose lease expired and was claimed again cannot overwrite the newer claim.
-- A retry row is inserted only for results whose update happened, so a result is
-- never applied twice. Retries copy the task's queue and callback (upstream rule).
-- The task's last_execution_status changes only on a final outcome (success, or a
-- failure with no retry left): it is "how the previous run ended", which the next
-- run's failure/recovery notification is judged against, so it is written with the
-- result and not later from a buffer.
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
    RETURNING e.id, e.task_id, e.organization_id, e.attempt, i.retry_id, i.retry_at,
              i.status, i.finished_at
), retried AS (
    INSERT INTO executions (id, task_id, organization_id, status, scheduled_for, attempt, callback_url, queue)
    SELECT d.retry_id, d.task_id, d.organization_id, 'pending', d.retry_at, d.attempt + 1,
           t.callback_url, t.queue
    FROM done d JOIN tasks t ON t.id = d.task_id
    WHERE d.retry_id IS NOT NULL AND t.deleted_at IS NULL
    RETURNING scheduled_for
), outcomes AS (
    -- One row per task (the latest result in this batch) so each task row is updated once.
    SELECT DISTINCT ON (task_id) task_id, finished_at,
           CASE WHEN retry_id IS NULL THEN status END AS final_status
    FROM done
    ORDER BY task_id, finished_at DESC
), touched AS (
    UPDATE tasks t
    SET last_execution_at = greatest(t.last_execution_at, o.finished_at),
        last_execution_status = coalesce(o.final_status, t.last_execution_status)
    FROM outcomes o
    WHERE t.id = o.task_id
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

-- name: flush_org_counts
-- Buffered monthly execution counters (first attempts only).
UPDATE organizations o
SET monthly_execution_count = o.monthly_execution_count + u.n
FROM unnest($1::uuid[], $2::bigint[]) AS u(id, n)
WHERE o.id = u.id;
