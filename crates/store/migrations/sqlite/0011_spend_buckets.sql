-- Charges per organisation, key and workspace in 15-minute buckets, added to in the
-- transaction that inserts the lines, so that a spend cap's figure (charges since the start of
-- its day, week, month or ever) is a sum of at most a few thousand rows rather than of every
-- line in the window. Derived from the ledger like `org_balances`; the store's tests compare
-- the two. `scope`: 'o' organisation, 'k' key, 'w' workspace. `bucket`: created_at_ms / 900000.
CREATE TABLE spend_buckets (
    org_id      TEXT NOT NULL REFERENCES orgs (id),
    scope       TEXT NOT NULL,
    scope_id    TEXT NOT NULL,
    bucket      INTEGER NOT NULL,
    shard       INTEGER NOT NULL,
    spent_nanos INTEGER NOT NULL,
    PRIMARY KEY (org_id, scope, scope_id, bucket, shard)
) STRICT, WITHOUT ROWID;

INSERT INTO spend_buckets (org_id, scope, scope_id, bucket, shard, spent_nanos)
SELECT org_id, 'o', org_id, created_at_ms / 900000, 0, -SUM(amount_nanos)
FROM ledger_entries WHERE kind = 'charge'
GROUP BY org_id, created_at_ms / 900000;

INSERT INTO spend_buckets (org_id, scope, scope_id, bucket, shard, spent_nanos)
SELECT org_id, 'k', key_id, created_at_ms / 900000, 0, -SUM(amount_nanos)
FROM ledger_entries WHERE kind = 'charge' AND key_id IS NOT NULL
GROUP BY org_id, key_id, created_at_ms / 900000;

INSERT INTO spend_buckets (org_id, scope, scope_id, bucket, shard, spent_nanos)
SELECT org_id, 'w', workspace_id, created_at_ms / 900000, 0, -SUM(amount_nanos)
FROM ledger_entries WHERE kind = 'charge' AND workspace_id IS NOT NULL
GROUP BY org_id, workspace_id, created_at_ms / 900000;
