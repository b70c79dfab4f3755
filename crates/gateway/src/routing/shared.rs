//! Route health shared between instances through the database: every second each instance
//! publishes its view of the routes it used (breaker open until when, failure rate, latency)
//! and adopts the others': a breaker another instance opened opens here too, and another
//! instance's statistics stand in for routes this one has not used yet. One instance's
//! knowledge protects the others within about a second. With SQLite (one instance) it is a
//! harmless no-op.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use marga_store::{HealthRepo, RouteHealthRecord};

use crate::pipeline::unix_now_ms;
use crate::registry::{Registry, Route};

const SYNC_EVERY: Duration = Duration::from_secs(1);
/// Look back this far past the newest view seen, for late commits.
const OVERLAP_MS: i64 = 3_000;

pub struct HealthSync {
    repo: Arc<dyn HealthRepo>,
    instance: String,
    routes: HashMap<String, Arc<Route>>,
    /// What was last published per route: (successes + failures, open).
    published: HashMap<String, (u64, bool)>,
    cursor: i64,
}

impl HealthSync {
    pub fn new(repo: Arc<dyn HealthRepo>, registry: &Registry) -> HealthSync {
        let routes = registry.routes().map(|(m, r)| (format!("{}|{}", m.id, r.label()), r.clone())).collect();
        let instance = format!("marga-{}", uuid::Uuid::new_v4().simple());
        HealthSync { repo, instance, routes, published: HashMap::new(), cursor: 0 }
    }

    pub fn spawn(mut self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SYNC_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = self.sync().await {
                    tracing::warn!(error = %e, "route health sync failed");
                }
            }
        })
    }

    /// Publishes what changed here, then adopts what other instances published.
    pub async fn sync(&mut self) -> Result<(), marga_store::StoreError> {
        let now = unix_now_ms();
        let changed = self.changes(now);
        self.repo.put_route_health(&changed).await?;
        let seen = self.repo.route_health_since(self.cursor.saturating_sub(OVERLAP_MS)).await?;
        for record in seen {
            self.cursor = self.cursor.max(record.updated_at_ms);
            if record.instance != self.instance {
                self.adopt(&record, now);
            }
        }
        Ok(())
    }

    fn changes(&mut self, now: i64) -> Vec<RouteHealthRecord> {
        let mut changed = Vec::new();
        for (key, route) in &self.routes {
            let view = route.health.view();
            let attempts = view.successes + view.failures;
            let open_for = route.health.open_for();
            let before = self.published.get(key).copied().unwrap_or((0, false));
            if attempts == before.0 && open_for.is_some() == before.1 {
                continue;
            }
            self.published.insert(key.clone(), (attempts, open_for.is_some()));
            changed.push(RouteHealthRecord {
                route: key.clone(),
                instance: self.instance.clone(),
                open_until_ms: open_for.map_or(0, |d| now + i64::try_from(d.as_millis()).unwrap_or(0)),
                failure_ppm: (view.failure_rate * 1_000_000.0).round() as i64,
                latency_us: view.latency_ms.map(|ms| (ms * 1000.0).round() as i64),
                updated_at_ms: now,
            });
        }
        changed
    }

    fn adopt(&self, record: &RouteHealthRecord, now: i64) {
        let Some(route) = self.routes.get(&record.route) else { return };
        if record.open_until_ms > now {
            route.health.adopt_remote_open(Duration::from_millis(u64::try_from(record.open_until_ms - now).unwrap_or(0)));
        }
        let latency = record.latency_us.map(|us| us as f64 / 1000.0);
        route.health.adopt_remote_stats(record.failure_ppm as f64 / 1_000_000.0, latency);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::config::{Config, Overrides};
    use crate::routing::BreakerState;

    fn registry() -> Registry {
        let overrides = Overrides { listen: Some("127.0.0.1:0".parse().unwrap()), ..Overrides::default() };
        Registry::build(&Config::load_with_env(overrides, &|_| None).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn a_breaker_opened_on_one_instance_opens_on_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let store = marga_store::open(None, dir.path()).await.unwrap();
        let (a, b) = (registry(), registry());
        let mut sync_a = HealthSync::new(store.clone(), &a);
        let mut sync_b = HealthSync::new(store.clone(), &b);
        let route = |r: &Registry| r.model("sandbox/echo").unwrap().routes[0].clone();
        for _ in 0..5 {
            route(&a).health.record_fault();
        }
        assert_eq!(route(&a).health.view().breaker, BreakerState::Open);
        assert_eq!(route(&b).health.view().breaker, BreakerState::Closed);
        sync_a.sync().await.unwrap();
        sync_b.sync().await.unwrap();
        assert_eq!(route(&b).health.view().breaker, BreakerState::Open, "instance B adopted A's open breaker");
        assert!(route(&b).health.view().failure_rate > 0.0, "and its statistics, having none of its own");
        let other = b.model("sandbox/embed").unwrap().routes[0].clone();
        assert_eq!(other.health.view().breaker, BreakerState::Closed, "other routes untouched");
    }
}
