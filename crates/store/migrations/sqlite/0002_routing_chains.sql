-- Saved fallback chains: per organisation, per public model, an ordered list of steps.
CREATE TABLE routing_chains (
    org_id        TEXT NOT NULL,
    model         TEXT NOT NULL,
    steps         TEXT NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (org_id, model)
);
