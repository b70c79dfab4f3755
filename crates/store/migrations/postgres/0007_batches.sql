-- Files and batches. A file's bytes live on disk under the data directory; its metadata here.
-- A batch's items are rows of `batch_items`, claimed by workers with a lease (owner + expiry)
-- and completed exactly once: the result is written and the item marked done in one
-- transaction that checks the claim is still the caller's.

CREATE TABLE files (
    id            TEXT PRIMARY KEY NOT NULL,
    org_id        TEXT NOT NULL,
    purpose       TEXT NOT NULL,
    filename      TEXT NOT NULL,
    bytes         BIGINT NOT NULL,
    lines         BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL
);

CREATE INDEX files_org_created ON files (org_id, created_at_ms);

CREATE TABLE batches (
    id                TEXT PRIMARY KEY NOT NULL,
    org_id            TEXT NOT NULL,
    key_id            TEXT NOT NULL,
    endpoint          TEXT NOT NULL,
    input_file_id     TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    metadata          TEXT,
    status            TEXT NOT NULL,
    total             BIGINT NOT NULL,
    completed         BIGINT NOT NULL DEFAULT 0,
    failed            BIGINT NOT NULL DEFAULT 0,
    output_file_id    TEXT,
    error_file_id     TEXT,
    created_at_ms     BIGINT NOT NULL,
    in_progress_at_ms BIGINT,
    finalizing_at_ms  BIGINT,
    completed_at_ms   BIGINT,
    cancelling_at_ms  BIGINT,
    cancelled_at_ms   BIGINT,
    expires_at_ms     BIGINT NOT NULL,
    -- Native batches: the client's Idempotency-Key and the SHA-256 of the request it came with.
    idempotency_key   TEXT,
    request_hash      TEXT,
    -- Where the terminal event is delivered (a per-batch webhook overrides the org default).
    webhook_url       TEXT,
    webhook_secret    TEXT,
    -- The credit lease that holds the batch's reservation until it ends.
    credit_lease_id   TEXT
);

CREATE INDEX batches_org_created ON batches (org_id, created_at_ms);
CREATE INDEX batches_status ON batches (status);
CREATE UNIQUE INDEX batches_idempotency ON batches (org_id, idempotency_key);

-- `state`: pending → running (claimed: owner, lease_until_ms) → done | cancelled.
CREATE TABLE batch_items (
    batch_id       TEXT NOT NULL REFERENCES batches (id),
    idx            BIGINT NOT NULL,
    custom_id      TEXT NOT NULL,
    body           TEXT NOT NULL,
    state          TEXT NOT NULL,
    owner          TEXT,
    lease_until_ms BIGINT NOT NULL DEFAULT 0,
    attempts       BIGINT NOT NULL DEFAULT 0,
    result         TEXT,
    is_error       BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, idx)
);

CREATE INDEX batch_items_claimable ON batch_items (state, lease_until_ms);

-- Webhook events waiting to be delivered (or retried): claimed like items, so that a restart
-- or another instance carries on with the retries.
CREATE TABLE webhook_deliveries (
    id             TEXT PRIMARY KEY NOT NULL,
    batch_id       TEXT NOT NULL,
    url            TEXT NOT NULL,
    secret         TEXT NOT NULL,
    body           TEXT NOT NULL,
    attempts       BIGINT NOT NULL DEFAULT 0,
    max_attempts   BIGINT NOT NULL,
    next_at_ms     BIGINT NOT NULL,
    owner          TEXT,
    lease_until_ms BIGINT NOT NULL DEFAULT 0,
    -- pending → delivered | failed
    state          TEXT NOT NULL
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (state, next_at_ms);
