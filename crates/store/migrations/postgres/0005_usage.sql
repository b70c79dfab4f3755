-- Usage analytics (mirrors sqlite/0005_usage.sql): the generation record's remaining fields,
-- a daily rollup that the activity and usage endpoints read, and indexes.

ALTER TABLE generations ADD COLUMN cost_nanos BIGINT NOT NULL DEFAULT 0;
ALTER TABLE generations ADD COLUMN generation_time_ms BIGINT;
ALTER TABLE generations ADD COLUMN cancelled BOOLEAN NOT NULL DEFAULT FALSE;
ALTER TABLE generations ADD COLUMN byok BOOLEAN NOT NULL DEFAULT FALSE;
-- The organisation's local day of the request (days since 1970-01-01 in its zone then).
ALTER TABLE generations ADD COLUMN local_day BIGINT NOT NULL DEFAULT 0;

UPDATE generations SET
    cost_nanos = CEIL(cost::numeric * 1000000000)::bigint,
    cancelled = (status = 'cancelled'),
    local_day = created_at_ms / 86400000;

CREATE TABLE usage_daily (
    org_id            TEXT NOT NULL,
    day               BIGINT NOT NULL,
    key_id            TEXT NOT NULL,
    model             TEXT NOT NULL,
    provider          TEXT NOT NULL,
    requests          BIGINT NOT NULL,
    errors            BIGINT NOT NULL,
    cancelled         BIGINT NOT NULL,
    byok_requests     BIGINT NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    reasoning_tokens  BIGINT NOT NULL,
    cached_tokens     BIGINT NOT NULL,
    byok_tokens       BIGINT NOT NULL,
    cost_nanos        BIGINT NOT NULL,
    PRIMARY KEY (org_id, day, key_id, model, provider)
);

-- One row per public model, provider and UTC day: what the public statistics read.
-- `attempts`/`failures` count every attempt on the route (from each record's `attempts`: a
-- failed-over attempt is in another route's record); the other columns count the records the
-- provider served or failed last ('' = none tried). `ranked_*` leave BYOK requests out;
-- `gen_tokens`/`gen_ms` are completion tokens and generation time of successes that measured
-- one (tokens per second). Attempts of older rows are not backfilled.
CREATE TABLE route_daily (
    model          TEXT NOT NULL,
    provider       TEXT NOT NULL,
    day            BIGINT NOT NULL,
    attempts       BIGINT NOT NULL,
    failures       BIGINT NOT NULL,
    requests       BIGINT NOT NULL,
    successes      BIGINT NOT NULL,
    errors         BIGINT NOT NULL,
    ranked_requests BIGINT NOT NULL,
    ranked_tokens  BIGINT NOT NULL,
    gen_tokens     BIGINT NOT NULL,
    gen_ms         BIGINT NOT NULL,
    PRIMARY KEY (model, provider, day)
);

CREATE INDEX route_daily_day ON route_daily (day);

INSERT INTO usage_daily
SELECT COALESCE(org_id, ''), local_day, COALESCE(key_id, ''), model, COALESCE(provider, ''),
       COUNT(*),
       SUM(CASE WHEN status IN ('error', 'error_midstream') THEN 1 ELSE 0 END),
       SUM(CASE WHEN cancelled THEN 1 ELSE 0 END), SUM(CASE WHEN byok THEN 1 ELSE 0 END),
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
