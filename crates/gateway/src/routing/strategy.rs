//! Strategies: how the routes of one model are ordered. Chosen per request by `optimize`
//! (BharatRouter), `provider.sort` (OpenRouter) or the model suffixes `:floor` and `:nitro`;
//! otherwise the operator's `[routing] default_strategy`.
//!
//! Whatever the strategy, routes whose breaker is open (or that a 429 parked) come after every
//! healthy route: tried last, never first. Ties keep the operator's order. Prices are compared
//! in one currency (USD at the configured rate); floats appear only in the ranking scores, never
//! in an amount of money.

use serde::Serialize;

use super::health::HealthView;
use crate::registry::Route;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Price weighed by observed failure rate: a route failing 10% of the time costs as if it
    /// were twice as expensive.
    #[default]
    Balanced,
    /// Cheapest input + output price first.
    Price,
    /// Lowest moving-average time to first token (or latency) first.
    Latency,
    /// Highest observed tokens per second first.
    Throughput,
    /// Lowest observed failure rate first.
    Uptime,
    /// The operator's order as written in the config.
    Ordered,
}

impl Strategy {
    /// The strategy a request names (`price`, `floor`, `latency`, `throughput`, `nitro`,
    /// `uptime`, `auto`, `balanced`, `ordered`).
    pub fn parse(name: &str) -> Option<Strategy> {
        Some(match name {
            "price" | "floor" | "cost" => Strategy::Price,
            "latency" => Strategy::Latency,
            "throughput" | "nitro" => Strategy::Throughput,
            "uptime" | "reliability" => Strategy::Uptime,
            "auto" | "balanced" | "default" => Strategy::Balanced,
            "ordered" => Strategy::Ordered,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Balanced => "balanced",
            Strategy::Price => "price",
            Strategy::Latency => "latency",
            Strategy::Throughput => "throughput",
            Strategy::Uptime => "uptime",
            Strategy::Ordered => "ordered",
        }
    }

    /// A model name without a routing suffix, and the strategy the suffix asks for.
    pub fn split_suffix(model: &str) -> (&str, Option<Strategy>) {
        match model.rsplit_once(':') {
            Some((base, "floor")) => (base, Some(Strategy::Price)),
            Some((base, "nitro")) => (base, Some(Strategy::Throughput)),
            _ => (model, None),
        }
    }

    /// The ranking score of a route: lower is tried earlier.
    fn score(self, route: &Route, health: &HealthView) -> f64 {
        let price = || route.rank_price;
        match self {
            Strategy::Ordered => 0.0,
            Strategy::Price => price(),
            Strategy::Balanced => price() * (1.0 + 10.0 * health.failure_rate),
            Strategy::Latency => health.ttft_ms.or(health.latency_ms).unwrap_or(f64::MAX),
            Strategy::Throughput => health.tokens_per_s.map_or(f64::MAX, |t| -t),
            Strategy::Uptime => health.failure_rate,
        }
    }

    /// Orders `routes` (one model's) in place: healthy before deferred, then by score; stable.
    pub fn order<T>(self, routes: &mut [T], parts: impl Fn(&T) -> (&Route, &HealthView)) {
        routes.sort_by(|a, b| {
            let (ra, ha) = parts(a);
            let (rb, hb) = parts(b);
            ha.deferred.cmp(&hb.deferred).then(self.score(ra, ha).total_cmp(&self.score(rb, hb)))
        });
    }
}
