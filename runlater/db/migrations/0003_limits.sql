-- Monthly execution quotas: executions created through the API, per organization and month.
--
-- organizations.monthly_execution_count counts first attempts the executors *finished*
-- (upstream's usage figure); it lags behind creation by as long as tasks wait to run, so a
-- quota checked against it alone lets an organization queue any number of far-future tasks.
-- This table counts first attempts when they are *admitted* (created); the quota check uses
-- whichever of the two is larger. HTTP workers keep the running count in shared memory and
-- add it here in one statement per refresh interval (runlater/db/sql/limits.sql,
-- quota_refresh), so creating a task never costs an extra write.
CREATE TABLE execution_usage (
    organization_id  uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    month            date NOT NULL,           -- first day of the month, UTC
    created          bigint NOT NULL DEFAULT 0,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, month)
);
