-- Cron scheduler: the due-scan index it pages through.

-- The scheduler reads due tasks in chunks ordered by (next_run_at, id) and continues
-- each chunk after the last row of the previous one (keyset paging). With only
-- next_run_at in the index, a minute in which 100,000 tasks share one next_run_at would
-- make every chunk re-read and re-sort all the rows before it. Same name and predicate
-- as before, so nothing else changes.
DROP INDEX tasks_next_run_idx;
CREATE INDEX tasks_next_run_idx ON tasks (next_run_at, id)
    WHERE enabled AND deleted_at IS NULL AND next_run_at IS NOT NULL;
