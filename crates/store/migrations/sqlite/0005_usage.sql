-- Usage analytics: the generation record's remaining fields, a daily rollup that the activity
-- and usage endpoints read instead of the raw log, and indexes for the per-request queries.

ALTER TABLE generations ADD COLUMN cost_nanos INTEGER NOT NULL DEFAULT 0;
ALTER TABLE generations ADD COLUMN generation_time_ms INTEGER;
ALTER TABLE generations ADD COLUMN cancelled INTEGER NOT NULL DEFAULT 0;
ALTER TABLE generations ADD COLUMN byok INTEGER NOT NULL DEFAULT 0;
-- The organisation's local day of the request (days since 1970-01-01 in its zone then).
ALTER TABLE generations ADD COLUMN local_day INTEGER NOT NULL DEFAULT 0;

-- Older rows: cost had at most 9 decimals and stays far below 2^53 nanos, so the REAL detour
-- is exact; their day is the UTC day.
UPDATE generations SET
    cost_nanos = CAST(ROUND(CAST(cost AS REAL) * 1000000000) AS INTEGER),
    cancelled = (status = 'cancelled'),
    local_day = created_at_ms / 86400000;

-- One row per organisation, local day, key, model and provider; written in the same
-- transaction as the generations it counts. '' stands for "none" in the key columns.
-- WITHOUT ROWID: the rows are stored in key order, so a range of days is one sequential read.
CREATE TABLE usage_daily (
    org_id            TEXT NOT NULL,
    day               INTEGER NOT NULL,
    key_id            TEXT NOT NULL,
    model             TEXT NOT NULL,
    provider          TEXT NOT NULL,
    requests          INTEGER NOT NULL,
    errors            INTEGER NOT NULL,
    cancelled         INTEGER NOT NULL,
    byok_requests     INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    reasoning_tokens  INTEGER NOT NULL,
    cached_tokens     INTEGER NOT NULL,
    byok_tokens       INTEGER NOT NULL,
    cost_nanos        INTEGER NOT NULL,
    PRIMARY KEY (org_id, day, key_id, model, provider)
) STRICT, WITHOUT ROWID;

-- One row per public model, provider and UTC day: what the public statistics read.
-- `attempts`/`failures` count every attempt on the route (from each record's `attempts`: a
-- failed-over attempt is in another route's record); the other columns count the records the
-- provider served or failed last ('' = none tried). `ranked_*` leave BYOK requests out;
-- `gen_tokens`/`gen_ms` are completion tokens and generation time of successes that measured
-- one (tokens per second). Attempts of older rows are not backfilled.
CREATE TABLE route_daily (
    model          TEXT NOT NULL,
    provider       TEXT NOT NULL,
    day            INTEGER NOT NULL,
    attempts       INTEGER NOT NULL,
    failures       INTEGER NOT NULL,
    requests       INTEGER NOT NULL,
    successes      INTEGER NOT NULL,
    errors         INTEGER NOT NULL,
    ranked_requests INTEGER NOT NULL,
    ranked_tokens  INTEGER NOT NULL,
    gen_tokens     INTEGER NOT NULL,
    gen_ms         INTEGER NOT NULL,
    PRIMARY KEY (model, provider, day)
) STRICT, WITHOUT ROWID;

CREATE INDEX route_daily_day ON route_daily (day);

INSERT INTO usage_daily
SELECT COALESCE(org_id, ''), local_day, COALESCE(key_id, ''), model, COALESCE(provider, ''),
       COUNT(*),
       SUM(CASE WHEN status IN ('error', 'error_midstream') THEN 1 ELSE 0 END),
       SUM(cancelled), SUM(byok),
       SUM(prompt_tokens), SUM(completion_tokens), SUM(reasoning_tokens), SUM(cached_tokens),
       SUM(CASE WHEN byok THEN prompt_tokens + completion_tokens ELSE 0 END),
       SUM(cost_nanos)
FROM generations
GROUP BY COALESCE(org_id, ''), local_day, COALESCE(key_id, ''), model, COALESCE(provider, '');

INSERT INTO route_daily
SELECT model, COALESCE(provider, ''), created_at_ms / 86400000, 0, 0,
       COUNT(*),
       SUM(CASE WHEN status = 'success' THEN 1 ELSE 0 END),
       SUM(CASE WHEN status IN ('error', 'error_midstream') THEN 1 ELSE 0 END),
       SUM(CASE WHEN byok THEN 0 ELSE 1 END),
       SUM(CASE WHEN byok THEN 0 ELSE prompt_tokens + completion_tokens END),
       0, 0
FROM generations
GROUP BY model, COALESCE(provider, ''), created_at_ms / 86400000;

-- Events, newest first with a keyset on (created_at_ms, id).
CREATE INDEX generations_org_created_id ON generations (org_id, created_at_ms, id);
-- Its prefix: no longer needed (one index less to write per record).
DROP INDEX generations_org_created;
-- Model statistics' latency sample, read from the index alone (it replaces the index it
-- extends: still one index per record to write).
CREATE INDEX generations_model_latency ON generations (model, created_at_ms, status, provider, latency_ms);
DROP INDEX generations_model_created;
