//! Routing: which routes may serve a request and in what order, and what Marga knows about
//! each route's health.
//!
//! - [`health`]: per-route circuit breaker and moving-average statistics;
//! - [`strategy`]: the orderings (price, latency, throughput, uptime, balanced, ordered);
//! - [`explore`]: the share of latency/throughput requests that measure routes lacking recent
//!   numbers;
//! - [`budget`]: the retry budget that keeps an outage from multiplying traffic;
//! - [`chains`]: saved fallback chains per organisation.

pub mod budget;
pub mod chains;
pub mod explore;
pub mod health;
pub mod shared;
pub mod strategy;

pub use health::{BreakerSettings, BreakerState, HealthView, Observation, RouteHealth};
pub use strategy::Strategy;

use crate::config::RoutingSettings;

/// Routing's shared state: settings, the retry budget, exploration and the saved chains.
pub struct Routing {
    pub settings: RoutingSettings,
    pub budget: budget::RetryBudget,
    pub exploration: explore::Exploration,
    pub chains: chains::SavedChains,
}

impl Routing {
    pub fn new(settings: RoutingSettings, chains: chains::SavedChains) -> Self {
        let budget = budget::RetryBudget::new(
            settings.retry_budget_percent,
            settings.retry_budget_min_per_s,
            std::time::Duration::from_secs(10),
        );
        let exploration = explore::Exploration::new(settings.explore_every);
        Routing { settings, budget, exploration, chains }
    }
}
