-- Accounts and money: organisations, API keys, workspaces, members, guardrails, the
-- append-only credit ledger and credit leases.
--
-- Money is INTEGER nano-units of the org currency, never REAL or TEXT. The tables are STRICT,
-- so SQLite refuses a value of the wrong type instead of silently storing it.

CREATE TABLE orgs (
    id            TEXT PRIMARY KEY NOT NULL,
    name          TEXT NOT NULL,
    currency      TEXT NOT NULL,
    timezone      TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
) STRICT;

-- `id` is the hex SHA-256 of the key. Keys are revoked (`revoked_at_ms`), never deleted.
-- `workspace_id` is not a foreign key: deleting a workspace detaches its keys in the same
-- transaction and bumps their `updated_at_ms`, so that caches see the change.
CREATE TABLE api_keys (
    id            TEXT PRIMARY KEY NOT NULL,
    org_id        TEXT NOT NULL REFERENCES orgs (id),
    workspace_id  TEXT,
    kind          TEXT NOT NULL,
    name          TEXT NOT NULL,
    label         TEXT NOT NULL,
    limit_nanos   INTEGER,
    limit_reset   TEXT,
    rpm_limit     INTEGER,
    daily_limit   INTEGER,
    budget_nanos  INTEGER,
    trial         INTEGER NOT NULL CHECK (trial IN (0, 1)),
    disabled      INTEGER NOT NULL CHECK (disabled IN (0, 1)),
    expires_at_ms INTEGER,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    revoked_at_ms INTEGER
) STRICT;

CREATE INDEX api_keys_updated ON api_keys (updated_at_ms);
CREATE INDEX api_keys_org_created ON api_keys (org_id, created_at_ms);

CREATE TABLE workspaces (
    id                   TEXT PRIMARY KEY NOT NULL,
    org_id               TEXT NOT NULL REFERENCES orgs (id),
    name                 TEXT NOT NULL,
    monthly_budget_nanos INTEGER,
    created_at_ms        INTEGER NOT NULL
) STRICT;

CREATE INDEX workspaces_org ON workspaces (org_id, created_at_ms);

CREATE TABLE members (
    org_id        TEXT NOT NULL REFERENCES orgs (id),
    user_id       TEXT NOT NULL,
    email         TEXT NOT NULL,
    role          TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (org_id, user_id)
) STRICT;

CREATE TABLE guardrails (
    id                      TEXT PRIMARY KEY NOT NULL,
    org_id                  TEXT NOT NULL REFERENCES orgs (id),
    name                    TEXT NOT NULL,
    max_daily_spend_nanos   INTEGER,
    max_weekly_spend_nanos  INTEGER,
    max_monthly_spend_nanos INTEGER,
    allowed_models          TEXT NOT NULL,
    blocked_models          TEXT NOT NULL,
    require_zdr             INTEGER NOT NULL CHECK (require_zdr IN (0, 1)),
    created_at_ms           INTEGER NOT NULL,
    updated_at_ms           INTEGER NOT NULL
) STRICT;

CREATE INDEX guardrails_org ON guardrails (org_id, created_at_ms);

CREATE TABLE guardrail_keys (
    guardrail_id TEXT NOT NULL REFERENCES guardrails (id) ON DELETE CASCADE,
    key_id       TEXT NOT NULL REFERENCES api_keys (id),
    PRIMARY KEY (guardrail_id, key_id)
) STRICT;

-- Append-only. `(org_id, kind, reference)` is unique: appending a line twice is a no-op.
-- `key_id` and `workspace_id` are history, not foreign keys.
CREATE TABLE ledger_entries (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    org_id        TEXT NOT NULL REFERENCES orgs (id),
    amount_nanos  INTEGER NOT NULL,
    currency      TEXT NOT NULL,
    kind          TEXT NOT NULL,
    reference     TEXT NOT NULL,
    key_id        TEXT,
    workspace_id  TEXT,
    note          TEXT,
    created_at_ms INTEGER NOT NULL,
    UNIQUE (org_id, kind, reference)
) STRICT;

CREATE INDEX ledger_entries_org_created ON ledger_entries (org_id, created_at_ms);
CREATE INDEX ledger_entries_key_created ON ledger_entries (key_id, created_at_ms);

CREATE TABLE credit_leases (
    id            TEXT PRIMARY KEY NOT NULL,
    org_id        TEXT NOT NULL REFERENCES orgs (id),
    amount_nanos  INTEGER NOT NULL,
    used_nanos    INTEGER NOT NULL,
    holder        TEXT NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    closed        INTEGER NOT NULL CHECK (closed IN (0, 1)),
    created_at_ms INTEGER NOT NULL
) STRICT;

-- The live leases of an org are read on every `available` and `open_lease`.
CREATE INDEX credit_leases_open ON credit_leases (org_id, expires_at_ms) WHERE closed = 0;
