//! Route health shared between instances: each instance publishes its view of a route (breaker
//! open until when, failure rate, latency) and reads the others'.

use crate::{BoxFuture, StoreError};

/// One instance's view of one route.
#[derive(Clone, Debug, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct RouteHealthRecord {
    /// `<model>|<provider>/<upstream model>`.
    pub route: String,
    pub instance: String,
    /// The breaker is open until then (0 = closed).
    pub open_until_ms: i64,
    /// Failure rate in parts per million.
    pub failure_ppm: i64,
    /// Moving-average latency in microseconds, when observed.
    pub latency_us: Option<i64>,
    pub updated_at_ms: i64,
}

pub trait HealthRepo: Send + Sync {
    /// Inserts or replaces each `(route, instance)` view.
    fn put_route_health<'a>(&'a self, records: &'a [RouteHealthRecord]) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Every view updated after `since_ms`.
    fn route_health_since(&self, since_ms: i64) -> BoxFuture<'_, Result<Vec<RouteHealthRecord>, StoreError>>;
}
