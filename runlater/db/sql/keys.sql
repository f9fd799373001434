-- name: lookup_key
-- Everything authentication needs for one public key id, in one indexed probe.
SELECT k.id, k.organization_id, k.key_hash, o.tier, k.revoked_at IS NOT NULL AS revoked
FROM api_keys k JOIN organizations o ON o.id = k.organization_id
WHERE k.key_id = $1;

-- name: ensure_organization
-- Create the organisation when missing; an explicit tier ($3 not null) is applied to
-- an existing one too. Returns its id.
WITH created AS (
    INSERT INTO organizations (id, name, tier, webhook_secret)
    VALUES ($1, $2, coalesce($3, 'unlimited'), $4)
    ON CONFLICT (name) DO UPDATE SET tier = coalesce($3, organizations.tier), updated_at = now()
    RETURNING id
)
SELECT id FROM created;

-- name: create_key
INSERT INTO api_keys (id, organization_id, name, key_id, key_hash) VALUES ($1, $2, $3, $4, $5);

-- name: revoke_key
-- Revoke a key and tell every server process at commit, so each drops it from its
-- shared-memory cache at once (the 60 s cache TTL is only the backstop).
WITH revoked AS (
    UPDATE api_keys SET revoked_at = now(), updated_at = now()
    WHERE key_id = $1 AND revoked_at IS NULL
    RETURNING key_id
)
SELECT key_id, pg_notify('runlater_keys', key_id) FROM revoked;

-- name: touch_key
-- Record use of a key at most every five minutes. Each process also debounces its own
-- calls; the condition makes the limit hold across processes and machines.
UPDATE api_keys SET last_used_at = now()
WHERE id = $1 AND (last_used_at IS NULL OR last_used_at < now() - interval '5 minutes');
