-- Route health shared between instances: the newest breaker state and statistics each
-- instance published for each route.
CREATE TABLE route_health (
    route          TEXT NOT NULL,
    instance       TEXT NOT NULL,
    open_until_ms  INTEGER NOT NULL,
    failure_ppm    INTEGER NOT NULL,
    latency_us     INTEGER,
    updated_at_ms  INTEGER NOT NULL,
    PRIMARY KEY (route, instance)
) STRICT;

CREATE INDEX route_health_updated ON route_health (updated_at_ms);
