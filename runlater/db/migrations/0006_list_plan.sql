-- The unfiltered task list (the list most clients call) runs in a function whose plan is
-- made once per connection instead of for every page. runlater's sessions plan every
-- statement for its parameters (plan_cache_mode = force_custom_plan), and for this one
-- planning cost about as much as running it (~80 µs of ~220 µs of database CPU per page
-- of 20).
--
-- A plan made once must be right for any size of table: made on an empty table, a generic
-- plan sorted the whole organization's tasks, and kept doing so once they were 100,000
-- (36 ms per page). With sorts disabled inside the function the only plan left is the one
-- that needs none: tasks_org_list_idx read in the ORDER BY's order, stopping after
-- limit + 1 rows, whatever the statistics say. The queue-filtered list stays a statement
-- planned per call (list_tasks): which index suits it depends on the queue.
-- Same output as list_tasks: has_more, and the page as a JSON array (text).
CREATE FUNCTION rl_list_tasks(p_organization_id uuid, p_limit int, p_offset bigint)
RETURNS TABLE (has_more boolean, data text)
LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_generic_plan
SET enable_sort = off
SET enable_incremental_sort = off
AS $$
BEGIN
    RETURN QUERY
    SELECT count(*) > p_limit,
           coalesce(json_agg(page.doc) FILTER (WHERE page.n <= p_limit), '[]')::text
    FROM (
        SELECT row_number() OVER () AS n, rl_task_json(s.t) AS doc
        FROM (
            SELECT t
            FROM tasks t
            WHERE t.organization_id = p_organization_id
              AND t.deleted_at IS NULL
            ORDER BY t.last_execution_at DESC NULLS LAST, t.inserted_at DESC, t.id DESC
            LIMIT p_limit + 1 OFFSET p_offset
        ) s
    ) page;
END
$$;
