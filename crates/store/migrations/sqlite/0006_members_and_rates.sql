-- Members own keys, guardrails are assigned to members, and request counts are shared
-- between instances.
--
-- `api_keys.member_id`: the member a key belongs to (management keys act with that member's
-- role; a guardrail assigned to the member applies to the key). Not a foreign key: removing
-- a member revokes their management keys in the same transaction, and inference keys keep
-- the id as history.
ALTER TABLE api_keys ADD COLUMN member_id TEXT;

-- Organisations that already have management keys get an owner member holding them (the
-- default organisation's is the operator, whom the master key acts as).
INSERT INTO members (org_id, user_id, email, role, created_at_ms)
SELECT DISTINCT k.org_id, CASE WHEN k.org_id = 'default' THEN 'operator' ELSE 'owner' END, '', 'owner', 0
FROM api_keys k
WHERE k.kind = 'management'
  AND NOT EXISTS (SELECT 1 FROM members m WHERE m.org_id = k.org_id AND m.role = 'owner');

UPDATE api_keys
SET member_id = (SELECT m.user_id FROM members m WHERE m.org_id = api_keys.org_id AND m.role = 'owner'
                 ORDER BY m.created_at_ms, m.user_id LIMIT 1)
WHERE kind = 'management' AND member_id IS NULL;

CREATE INDEX api_keys_member ON api_keys (org_id, member_id);

-- A member holds at most one guardrail (assigning replaces).
CREATE TABLE guardrail_members (
    guardrail_id  TEXT NOT NULL REFERENCES guardrails (id) ON DELETE CASCADE,
    org_id        TEXT NOT NULL REFERENCES orgs (id),
    user_id       TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (org_id, user_id)
) STRICT;

CREATE INDEX guardrail_members_guardrail ON guardrail_members (guardrail_id);

-- Request counts per scope (`k:<key id>:m` per minute, `k:<key id>:d` per day, `ip:<addr>:m`)
-- and window, claimed by instances in chunks. Old windows are pruned.
CREATE TABLE rate_windows (
    scope           TEXT NOT NULL,
    window_start_ms INTEGER NOT NULL,
    count           INTEGER NOT NULL,
    -- What the last claim granted (Postgres returns it from its one-statement claim).
    last_granted    INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (scope, window_start_ms)
) STRICT;

CREATE INDEX rate_windows_start ON rate_windows (window_start_ms);
