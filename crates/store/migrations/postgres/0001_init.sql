-- Marga's first schema: operator settings and the request log (mirrors sqlite/0001_init.sql).

CREATE TABLE settings (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);

CREATE TABLE generations (
    id                TEXT PRIMARY KEY NOT NULL,
    created_at_ms     BIGINT NOT NULL,
    org_id            TEXT,
    key_id            TEXT,
    endpoint          TEXT NOT NULL,
    model             TEXT NOT NULL,
    provider          TEXT,
    upstream_model    TEXT,
    streamed          BOOLEAN NOT NULL,
    status            TEXT NOT NULL,
    http_status       BIGINT NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cached_tokens     BIGINT NOT NULL,
    reasoning_tokens  BIGINT NOT NULL,
    usage_estimated   BOOLEAN NOT NULL,
    cost              TEXT NOT NULL,
    currency          TEXT NOT NULL,
    latency_ms        BIGINT NOT NULL,
    ttft_ms           BIGINT,
    finish_reason     TEXT,
    attempts          TEXT NOT NULL,
    error             TEXT,
    user_agent        TEXT,
    referer           TEXT,
    end_user          TEXT
);

CREATE INDEX generations_org_created ON generations (org_id, created_at_ms);
CREATE INDEX generations_model_created ON generations (model, created_at_ms);
