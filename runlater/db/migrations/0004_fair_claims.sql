-- Per-organization due scan for the fair claim: each organization's oldest pending
-- executions, so one organization's backlog never hides another's due rows.
CREATE INDEX executions_org_pending_idx ON executions (organization_id, scheduled_for)
    WHERE status = 'pending';
