-- The running sums of each organisation's ledger lines, added to in the transaction that
-- inserts the lines, so that reading a balance (at every credit-lease opening, and for
-- `/v1/credits`) no longer sums the whole ledger. The ledger stays the record: these rows are
-- derived from it, and the store's tests check that they always equal its sums.
-- Each instance adds to its own `shard` row (chosen at start), so instances charging the
-- same organisation at the same time do not queue on one row; a balance is the sum of its
-- rows.
CREATE TABLE org_balances (
    org_id        TEXT NOT NULL REFERENCES orgs (id),
    shard         INTEGER NOT NULL,
    balance_nanos BIGINT NOT NULL,
    usage_nanos   BIGINT NOT NULL,
    PRIMARY KEY (org_id, shard)
);

INSERT INTO org_balances (org_id, shard, balance_nanos, usage_nanos)
SELECT org_id, 0, SUM(amount_nanos)::BIGINT, SUM(CASE WHEN kind = 'charge' THEN -amount_nanos ELSE 0 END)::BIGINT
FROM ledger_entries
GROUP BY org_id;
