-- The running sums of each organisation's ledger lines, added to in the transaction that
-- inserts the lines, so that reading a balance (at every credit-lease opening, and for
-- `/v1/credits`) no longer sums the whole ledger. The ledger stays the record: these rows are
-- derived from it, and the store's tests check that they always equal its sums.
-- `shard` lets writers that run at the same time (instances on Postgres) add to different
-- rows; SQLite has one writer at a time and uses shard 0.
CREATE TABLE org_balances (
    org_id        TEXT NOT NULL REFERENCES orgs (id),
    shard         INTEGER NOT NULL,
    balance_nanos INTEGER NOT NULL,
    usage_nanos   INTEGER NOT NULL,
    PRIMARY KEY (org_id, shard)
) STRICT, WITHOUT ROWID;

INSERT INTO org_balances (org_id, shard, balance_nanos, usage_nanos)
SELECT org_id, 0, SUM(amount_nanos), SUM(CASE WHEN kind = 'charge' THEN -amount_nanos ELSE 0 END)
FROM ledger_entries
GROUP BY org_id;
