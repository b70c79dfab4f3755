-- Route health shared between instances: the newest breaker state and statistics each
-- instance published for each route.
CREATE TABLE route_health (
    route          TEXT NOT NULL,
    instance       TEXT NOT NULL,
    open_until_ms  BIGINT NOT NULL,
    failure_ppm    BIGINT NOT NULL,
    latency_us     BIGINT,
    updated_at_ms  BIGINT NOT NULL,
    PRIMARY KEY (route, instance)
);

CREATE INDEX route_health_updated ON route_health (updated_at_ms);
