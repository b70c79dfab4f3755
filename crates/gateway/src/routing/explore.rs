//! Exploration for the `latency` and `throughput` strategies, which rank by what Marga has
//! measured: without it, a route that was never used (or not for a long time) would never be
//! tried while another route has numbers, so its numbers would never exist.
//!
//! A route is **cold** for such a strategy when it has fewer than [`MIN_RECENT_SAMPLES`]
//! recent samples of the statistic the strategy ranks by (see
//! [`super::health::STATS_STALE_AFTER`]). Every `explore_every`-th request ranked by one of
//! these strategies (a deterministic share, counted by one atomic) moves one cold route to the
//! front of each step, taking the cold routes in turn. Routes that are deferred (open breaker,
//! parked by a 429) are never explored, and filters have already run, so exploration never
//! widens what a request allows.
//!
//! Why a fixed share rather than ranking cold routes optimistically (first): optimism sends
//! *every* request to a cold route until its first answer completes, so a burst at start-up or
//! after a long pause would all land on an unmeasured, possibly slow route; a share bounds the
//! cost of measuring to `1 / explore_every` of those requests whatever the concurrency, and
//! counting instead of drawing random numbers keeps it exact and testable.

use std::sync::atomic::{AtomicU64, Ordering};

use super::health::HealthView;
use super::Strategy;

/// Recent samples a route needs before its statistic is trusted without exploring it.
pub const MIN_RECENT_SAMPLES: u32 = 3;

/// The share of measured-strategy requests that explore, and the counter that picks them.
pub struct Exploration {
    every: u64,
    requests: AtomicU64,
}

impl Exploration {
    /// One request in `every` explores (`0`: never).
    pub fn new(every: u64) -> Self {
        Exploration { every, requests: AtomicU64::new(0) }
    }

    /// Counts a request ranked by `strategy`. `Some(turn)` when this request explores: the
    /// `every`-th, `2 × every`-th… such request, with `turn` = 0, 1, … numbering those.
    pub fn turn(&self, strategy: Strategy) -> Option<u64> {
        if self.every == 0 || !measured(strategy) {
            return None;
        }
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        n.is_multiple_of(self.every).then(|| n / self.every - 1)
    }
}

/// Strategies that rank by measured statistics.
fn measured(strategy: Strategy) -> bool {
    matches!(strategy, Strategy::Latency | Strategy::Throughput)
}

/// Whether `strategy` lacks recent numbers for a route with this health.
pub fn is_cold(strategy: Strategy, health: &HealthView) -> bool {
    match strategy {
        Strategy::Latency => health.recent_latency_samples < MIN_RECENT_SAMPLES,
        Strategy::Throughput => health.recent_throughput_samples < MIN_RECENT_SAMPLES,
        _ => false,
    }
}

/// On an exploring `turn`, moves the `turn`-th (rotating) cold, not deferred route of
/// `routes` to the front, the others keeping their order. Returns its position before the
/// move when it moved (`None`: no cold route, or the chosen one was already first).
pub fn promote<T>(strategy: Strategy, turn: u64, routes: &mut [T], health: impl Fn(&T) -> &HealthView) -> Option<usize> {
    let eligible = |r: &T| {
        let h = health(r);
        !h.deferred && is_cold(strategy, h)
    };
    let cold = routes.iter().filter(|r| eligible(r)).count();
    if cold == 0 {
        return None;
    }
    let nth = usize::try_from(turn % cold as u64).unwrap_or(0);
    let pick = routes.iter().enumerate().filter(|(_, r)| eligible(r)).nth(nth).map(|(i, _)| i)?;
    if pick == 0 {
        return None;
    }
    routes[..=pick].rotate_right(1);
    Some(pick)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::routing::{BreakerSettings, Observation, RouteHealth};

    fn names(routes: &[(&'static str, HealthView)]) -> Vec<&'static str> {
        routes.iter().map(|(n, _)| *n).collect()
    }

    fn view(latency_samples: u32, deferred: bool) -> HealthView {
        let mut view = RouteHealth::new(BreakerSettings { threshold: 1, cooldown: Duration::from_secs(30) }).view();
        view.recent_latency_samples = latency_samples;
        view.deferred = deferred;
        view
    }

    #[test]
    fn every_nth_measured_request_explores_and_others_never_count() {
        let exploration = Exploration::new(3);
        let turns: Vec<Option<u64>> = (0..7).map(|_| exploration.turn(Strategy::Latency)).collect();
        assert_eq!(turns, [None, None, Some(0), None, None, Some(1), None]);
        assert_eq!(exploration.turn(Strategy::Price), None, "price does not explore…");
        assert_eq!(exploration.turn(Strategy::Balanced), None, "…nor balanced…");
        assert_eq!(exploration.turn(Strategy::Throughput), None, "…and neither counted: this is the 8th");
        assert_eq!(exploration.turn(Strategy::Throughput), Some(2));
        let off = Exploration::new(0);
        assert!((0..10).all(|_| off.turn(Strategy::Latency).is_none()));
    }

    #[test]
    fn a_turn_moves_the_cold_routes_forward_in_rotation_never_a_deferred_one() {
        // warm, cold, deferred cold, cold
        let base = vec![("w", view(3, false)), ("c1", view(0, false)), ("d", view(0, true)), ("c2", view(2, false))];

        let mut routes = base.clone();
        assert_eq!(promote(Strategy::Latency, 0, &mut routes, |(_, h)| h), Some(1));
        assert_eq!(names(&routes), ["c1", "w", "d", "c2"]);
        let mut routes = base.clone();
        assert_eq!(promote(Strategy::Latency, 1, &mut routes, |(_, h)| h), Some(3));
        assert_eq!(names(&routes), ["c2", "w", "c1", "d"]);
        let mut routes = base.clone();
        assert_eq!(promote(Strategy::Latency, 2, &mut routes, |(_, h)| h), Some(1), "back to the first cold one");

        let mut warm = vec![("w", view(3, false)), ("d", view(0, true))];
        assert_eq!(promote(Strategy::Latency, 0, &mut warm, |(_, h)| h), None);
        assert_eq!(names(&warm), ["w", "d"]);
        let mut price = base.clone();
        assert_eq!(promote(Strategy::Price, 0, &mut price, |(_, h)| h), None, "only measured strategies have cold routes");
    }

    #[tokio::test(start_paused = true)]
    async fn a_route_is_cold_until_it_has_recent_samples_and_again_once_they_are_stale() {
        let health = RouteHealth::new(BreakerSettings { threshold: 3, cooldown: Duration::from_secs(30) });
        let streamed = Observation { latency: Duration::from_millis(300), ttft: Some(Duration::from_millis(50)), completion_tokens: 40 };
        for _ in 0..MIN_RECENT_SAMPLES - 1 {
            health.record_success(streamed);
        }
        assert!(is_cold(Strategy::Latency, &health.view()));
        assert!(is_cold(Strategy::Throughput, &health.view()));
        health.record_success(streamed);
        assert!(!is_cold(Strategy::Latency, &health.view()));
        assert!(!is_cold(Strategy::Throughput, &health.view()));

        // Answers that were not streamed measure latency, not throughput.
        health.record_success(Observation { latency: Duration::from_millis(80), ..Observation::default() });
        tokio::time::advance(crate::routing::health::STATS_STALE_AFTER + Duration::from_secs(1)).await;
        assert!(is_cold(Strategy::Latency, &health.view()), "stale after a long pause");
        for _ in 0..MIN_RECENT_SAMPLES {
            health.record_success(Observation { latency: Duration::from_millis(80), ..Observation::default() });
        }
        assert!(!is_cold(Strategy::Latency, &health.view()));
        assert!(is_cold(Strategy::Throughput, &health.view()), "still no recent throughput sample");
    }
}
