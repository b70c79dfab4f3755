-- Marga's first schema: operator settings and the request log.

CREATE TABLE settings (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);

CREATE TABLE generations (
    id                TEXT PRIMARY KEY NOT NULL,
    created_at_ms     INTEGER NOT NULL,
    org_id            TEXT,
    key_id            TEXT,
    endpoint          TEXT NOT NULL,
    model             TEXT NOT NULL,
    provider          TEXT,
    upstream_model    TEXT,
    streamed          INTEGER NOT NULL,
    status            TEXT NOT NULL,
    http_status       INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_tokens     INTEGER NOT NULL,
    reasoning_tokens  INTEGER NOT NULL,
    usage_estimated   INTEGER NOT NULL,
    cost              TEXT NOT NULL,
    currency          TEXT NOT NULL,
    latency_ms        INTEGER NOT NULL,
    ttft_ms           INTEGER,
    finish_reason     TEXT,
    attempts          TEXT NOT NULL,
    error             TEXT,
    user_agent        TEXT,
    referer           TEXT,
    end_user          TEXT
);

CREATE INDEX generations_org_created ON generations (org_id, created_at_ms);
CREATE INDEX generations_model_created ON generations (model, created_at_ms);
