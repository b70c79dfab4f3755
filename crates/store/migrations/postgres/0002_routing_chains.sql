-- Saved fallback chains: per organisation, per public model, an ordered list of steps
-- (mirrors sqlite/0002_routing_chains.sql).
CREATE TABLE routing_chains (
    org_id        TEXT NOT NULL,
    model         TEXT NOT NULL,
    steps         TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    PRIMARY KEY (org_id, model)
);
