-- name: quota_refresh
-- One round trip per refresh interval and node: add this node's executions admitted since
-- the last refresh ($3 organizations, $4 counts) to the month's created counters, and return
-- the usage of every limited-tier organization that has any this month.
-- $1: first instant of the month (timestamptz, UTC); $2: that month as a date.
-- usage = the larger of
--   * executions created this month (every node's flushed counts, including the ones just
--     added: the upsert's RETURNING shows the new totals, the plain join the old ones);
--   * organizations.monthly_execution_count, the executors' count of finished first attempts,
--     when it belongs to this month: reset for this month (monthly_execution_reset_at), or
--     never reset and the organization was created this month.
-- Deltas of organizations deleted meanwhile are dropped by the join (no FK error).
WITH delta AS (
    SELECT d.organization_id, sum(d.n) AS n
    FROM unnest($3::uuid[], $4::bigint[]) AS d(organization_id, n)
    JOIN organizations o ON o.id = d.organization_id
    GROUP BY d.organization_id
), added AS (
    INSERT INTO execution_usage AS u (organization_id, month, created)
    SELECT organization_id, $2::date, n FROM delta
    ON CONFLICT (organization_id, month)
    DO UPDATE SET created = u.created + excluded.created, updated_at = now()
    RETURNING u.organization_id, u.created
)
SELECT o.id AS organization_id,
       greatest(coalesce(a.created, u.created, 0),
                CASE WHEN o.monthly_execution_reset_at >= $1
                       OR (o.monthly_execution_reset_at IS NULL AND o.inserted_at >= $1)
                     THEN o.monthly_execution_count ELSE 0 END) AS used
FROM organizations o
LEFT JOIN added a ON a.organization_id = o.id
LEFT JOIN execution_usage u ON u.organization_id = o.id AND u.month = $2::date
WHERE o.tier <> 'unlimited'
  AND (a.created > 0 OR u.created > 0
       OR (o.monthly_execution_count > 0
           AND (o.monthly_execution_reset_at >= $1
                OR (o.monthly_execution_reset_at IS NULL AND o.inserted_at >= $1))));

-- name: quota_reset_monthly_counts
-- Start organizations.monthly_execution_count afresh for the month beginning at $1. Nothing
-- else resets it (the executors only add to it). An organization that was never reset and
-- was created this month keeps its count: all of it belongs to this month. Idempotent, so
-- every node may run it; after the first it updates nothing. A flush of last month's
-- finished executions that lands just after the reset counts toward this month (at most a
-- few seconds' worth, and in the conservative direction).
UPDATE organizations
SET monthly_execution_count = CASE
        WHEN monthly_execution_reset_at IS NULL AND inserted_at >= $1 THEN monthly_execution_count
        ELSE 0 END,
    monthly_execution_reset_at = $1
WHERE monthly_execution_reset_at IS NULL OR monthly_execution_reset_at < $1;

-- name: idempotency_lookup
-- The stored answer for (organization, key) if it is younger than $3 seconds. Older rows are
-- ignored even before the periodic cleanup deletes them, so a key lives exactly $3 seconds.
SELECT fingerprint, status_code, response_body
FROM idempotency_keys
WHERE organization_id = $1 AND key = $2
  AND inserted_at > now() - make_interval(secs => $3);

-- name: idempotency_store
-- Remember a 2xx answer. First writer wins: a live row is left alone (ON CONFLICT ... WHERE
-- only replaces a row older than $6 seconds, which lookups already treat as absent).
INSERT INTO idempotency_keys AS k (organization_id, key, fingerprint, status_code, response_body)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (organization_id, key) DO UPDATE
SET fingerprint = excluded.fingerprint, status_code = excluded.status_code,
    response_body = excluded.response_body, inserted_at = now()
WHERE k.inserted_at <= now() - make_interval(secs => $6);

-- name: idempotency_cleanup
-- Delete up to $2 stored answers older than $1 seconds, oldest first, through
-- idempotency_keys_inserted_idx. SKIP LOCKED: several nodes cleaning at once share the work
-- instead of waiting on each other. Returns the number deleted (the caller repeats while it
-- equals $2, up to a bound).
WITH old AS (
    SELECT organization_id, key FROM idempotency_keys
    WHERE inserted_at < now() - make_interval(secs => $1)
    ORDER BY inserted_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM idempotency_keys k USING old
    WHERE k.organization_id = old.organization_id AND k.key = old.key
    RETURNING 1
)
SELECT count(*) FROM gone;
