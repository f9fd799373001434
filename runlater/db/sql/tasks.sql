-- name: create_once_batch
-- Insert one-time tasks and their first pending executions, one row pair per element
-- of the arrays, in a single statement (one round trip, one commit, one WAL flush for
-- the whole batch). The work is in rl_create_once_batch (migration 0005), so its plan is
-- made once per connection instead of for every batch. pg_notify is delivered at commit,
-- so executors only wake for committed rows; its payload is the earliest due time (epoch
-- seconds, to the microsecond) so they can arm a timer instead of polling. It must not be
-- rounded: a row due at 12.6 s announced as 13 s made an idle executor wait until 13 s.
SELECT rl_create_once_batch(
    $1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[],
    $7::text[], $8::text[], $9::timestamptz[], $10::int[], $11::int[],
    $12::text[], $13::text[], $14::text[], $15::text[], $16::bool[], $17::bool[],
    $18::text[], $19::text[]);

-- name: list_tasks
-- One page of an organisation's live tasks, rendered to JSON by PostgreSQL. Fetches
-- limit+1 rows through tasks_org_list_idx (same ORDER BY, so no sort) and reports
-- whether the extra row existed instead of counting. $3 is the queue filter and $4
-- says whether to apply it; the literal 'none' selects tasks without a queue.
-- The page is chosen on whole rows first and rendered afterwards, so JSON is built for
-- limit+1 rows only, whatever plan is chosen (a top-N sort over rendered documents
-- cost ~22 µs per row of the organisation). row_number() OVER () numbers rows in the
-- order the sorted subquery yields them.
SELECT count(*) > $2 AS has_more,
       coalesce(json_agg(page.doc) FILTER (WHERE page.n <= $2), '[]')::text AS data
FROM (
    SELECT row_number() OVER () AS n, rl_task_json(s.t) AS doc
    FROM (
        SELECT t
        FROM tasks t
        WHERE t.organization_id = $1
          AND t.deleted_at IS NULL
          AND (NOT $4::bool
               OR ($3::text = 'none' AND t.queue IS NULL)
               OR ($3::text <> 'none' AND t.queue = $3::text))
        ORDER BY t.last_execution_at DESC NULLS LAST, t.inserted_at DESC, t.id DESC
        LIMIT $2 + 1 OFFSET $5
    ) s
) page;

-- name: list_all_tasks
-- list_tasks without a queue filter, through rl_list_tasks (migration 0006): the same
-- page, planned once per connection.
SELECT has_more, data FROM rl_list_tasks($1::uuid, $2::int, $3::bigint);

-- name: get_task
-- A live task of the organisation as API JSON, or no row.
SELECT rl_task_json(t)::text FROM tasks t
WHERE id = $1 AND organization_id = $2 AND deleted_at IS NULL;

-- name: delete_task
-- Soft-delete a live task and hard-delete its pending executions; running and
-- finished executions stay as history. Returns the task id when something was deleted.
WITH deleted AS (
    UPDATE tasks SET deleted_at = now(), enabled = false, next_run_at = NULL, updated_at = now()
    WHERE id = $1 AND organization_id = $2 AND deleted_at IS NULL
    RETURNING id
), dropped AS (
    DELETE FROM executions e USING deleted d
    WHERE e.task_id = d.id AND e.status = 'pending'
)
SELECT id FROM deleted;

-- name: trigger_task
-- Create a pending execution of a live task due now (whole second), copying its queue
-- and callback; wake executors at commit.
WITH task AS (
    SELECT id, organization_id, queue, callback_url FROM tasks
    WHERE id = $1 AND organization_id = $2 AND deleted_at IS NULL
), created AS (
    INSERT INTO executions (id, task_id, organization_id, status, scheduled_for, attempt, callback_url, queue)
    SELECT $3, id, organization_id, 'pending', date_trunc('second', now()), 1, callback_url, queue FROM task
    RETURNING id, scheduled_for
)
SELECT c.id, rl_ts(c.scheduled_for) AS scheduled_for,
       pg_notify('runlater_executions', extract(epoch FROM c.scheduled_for)::text) AS notified
FROM created c;

-- name: list_executions
-- A task's execution history, newest first, as API JSON. NULL when the task is not a
-- live task of the organisation (→ 404).
SELECT CASE WHEN EXISTS (SELECT 1 FROM tasks WHERE id = $1 AND organization_id = $2 AND deleted_at IS NULL)
       THEN coalesce((
           SELECT json_agg(s.doc)
           FROM (SELECT rl_execution_json(e) AS doc
                 FROM executions e WHERE e.task_id = $1
                 ORDER BY e.scheduled_for DESC, e.id DESC LIMIT $3) s
       ), '[]')::text
       END;
