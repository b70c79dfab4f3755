//! Live health of one route: a circuit breaker and the statistics the strategies read
//! (EWMA latency, time to first token, throughput, failure rate), kept in memory and cheap to
//! read on the hot path (one uncontended lock per route).
//!
//! The breaker (after linkerd's consecutive-failures breaker):
//! - **closed**: every request may use the route; `threshold` consecutive upstream faults open it;
//! - **open** until `cooldown × ejections` (capped at 10×) has passed — a failure while open
//!   (tried as a last resort) neither shortens nor extends it; an open route is still tried, but
//!   only after every closed one;
//! - **half-open** after the cooldown: one probe at a time; success closes the breaker, failure
//!   opens it again for longer.
//!
//! A 429 is not a health fault: with `retry-after` it parks the route until then.
//!
//! Each moving average counts its recent samples (see [`STATS_STALE_AFTER`]): a sample that
//! arrives after a longer gap restarts the average, since the old one described the route as
//! it was. The count is what exploration reads to find routes worth measuring.
//! Time is `tokio::time::Instant`, so tests drive it with a paused clock.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Weight of the newest observation in the moving averages.
const EWMA_ALPHA: f64 = 0.2;
/// The longest an open breaker's cooldown grows to, in multiples of the base cooldown.
const MAX_EJECTION_MULTIPLIER: u32 = 10;
/// A statistic whose newest sample is older than this is stale: it no longer counts as recent,
/// and the next sample restarts its moving average.
pub const STATS_STALE_AFTER: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, Debug)]
pub struct BreakerSettings {
    pub threshold: u32,
    pub cooldown: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Breaker {
    Closed { consecutive_failures: u32 },
    Open { until: Instant, ejections: u32 },
    HalfOpen { probing: bool, ejections: u32 },
}

#[derive(Debug)]
struct State {
    breaker: Breaker,
    /// Parked by a 429's `retry-after` until then.
    parked_until: Option<Instant>,
    latency_ms: Option<f64>,
    ttft_ms: Option<f64>,
    tokens_per_s: Option<f64>,
    failure_rate: f64,
    successes: u64,
    failures: u64,
    /// Samples of `latency_ms` (and `ttft_ms`), and of `tokens_per_s`.
    latency_samples: Samples,
    throughput_samples: Samples,
}

/// The recent samples of one moving average: how many in a row without a stale gap, and when
/// the newest arrived.
#[derive(Clone, Copy, Debug, Default)]
struct Samples {
    run: u32,
    last: Option<Instant>,
}

impl Samples {
    /// Counts a sample taken at `now`; `false` when the previous one is missing or stale, so
    /// the average restarts from this sample.
    fn note(&mut self, now: Instant) -> bool {
        let continuing = self.is_fresh(now);
        self.run = if continuing { self.run.saturating_add(1) } else { 1 };
        self.last = Some(now);
        continuing
    }

    fn is_fresh(&self, now: Instant) -> bool {
        self.last.is_some_and(|t| now.saturating_duration_since(t) <= STATS_STALE_AFTER)
    }

    /// Recent samples: the run, or 0 once the newest is stale.
    fn recent(&self, now: Instant) -> u32 {
        if self.is_fresh(now) {
            self.run
        } else {
            0
        }
    }
}

/// What the planner reads about a route.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct HealthView {
    pub breaker: BreakerState,
    /// The route should not be tried before healthy ones (open, probing, or parked by a 429).
    pub deferred: bool,
    pub latency_ms: Option<f64>,
    pub ttft_ms: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub failure_rate: f64,
    pub successes: u64,
    pub failures: u64,
    /// Recent latency samples measured here (0 when none or stale).
    #[serde(skip)]
    pub recent_latency_samples: u32,
    /// Recent throughput samples measured here (0 when none or stale).
    #[serde(skip)]
    pub recent_throughput_samples: u32,
}

/// One successful answer, as measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct Observation {
    pub latency: Duration,
    pub ttft: Option<Duration>,
    pub completion_tokens: u64,
}

pub struct RouteHealth {
    settings: BreakerSettings,
    state: Mutex<State>,
}

fn ewma(old: Option<f64>, sample: f64) -> f64 {
    old.map_or(sample, |o| o + EWMA_ALPHA * (sample - o))
}

impl RouteHealth {
    pub fn new(settings: BreakerSettings) -> Self {
        let state = State {
            breaker: Breaker::Closed { consecutive_failures: 0 },
            parked_until: None,
            latency_ms: None,
            ttft_ms: None,
            tokens_per_s: None,
            failure_rate: 0.0,
            successes: 0,
            failures: 0,
            latency_samples: Samples::default(),
            throughput_samples: Samples::default(),
        };
        RouteHealth { settings, state: Mutex::new(state) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The route's health now (an expired open breaker reads as half-open).
    pub fn view(&self) -> HealthView {
        let now = Instant::now();
        let mut s = self.lock();
        promote_if_cooled(&mut s.breaker, now);
        let (breaker, deferred) = match s.breaker {
            Breaker::Closed { .. } => (BreakerState::Closed, false),
            Breaker::Open { .. } => (BreakerState::Open, true),
            Breaker::HalfOpen { probing, .. } => (BreakerState::HalfOpen, probing),
        };
        let parked = s.parked_until.is_some_and(|t| t > now);
        HealthView {
            breaker,
            deferred: deferred || parked,
            latency_ms: s.latency_ms,
            ttft_ms: s.ttft_ms,
            tokens_per_s: s.tokens_per_s,
            failure_rate: s.failure_rate,
            successes: s.successes,
            failures: s.failures,
            recent_latency_samples: s.latency_samples.recent(now),
            recent_throughput_samples: s.throughput_samples.recent(now),
        }
    }

    /// Called when an attempt starts: a half-open route takes its one probe.
    pub fn begin_attempt(&self) {
        let now = Instant::now();
        let mut s = self.lock();
        promote_if_cooled(&mut s.breaker, now);
        if let Breaker::HalfOpen { probing, .. } = &mut s.breaker {
            *probing = true;
        }
    }

    pub fn record_success(&self, observation: Observation) {
        let now = Instant::now();
        let mut s = self.lock();
        s.breaker = Breaker::Closed { consecutive_failures: 0 };
        s.parked_until = None;
        s.successes += 1;
        s.failure_rate = ewma(Some(s.failure_rate), 0.0);
        if !s.latency_samples.note(now) {
            (s.latency_ms, s.ttft_ms) = (None, None);
        }
        s.latency_ms = Some(ewma(s.latency_ms, observation.latency.as_secs_f64() * 1000.0));
        if let Some(ttft) = observation.ttft {
            s.ttft_ms = Some(ewma(s.ttft_ms, ttft.as_secs_f64() * 1000.0));
            let generating = observation.latency.saturating_sub(ttft).as_secs_f64();
            if observation.completion_tokens > 0 && generating > 0.0 {
                if !s.throughput_samples.note(now) {
                    s.tokens_per_s = None;
                }
                s.tokens_per_s = Some(ewma(s.tokens_per_s, observation.completion_tokens as f64 / generating));
            }
        }
    }

    /// An upstream fault (connect, timeout, 5xx, malformed, broken stream).
    pub fn record_fault(&self) {
        let now = Instant::now();
        let settings = self.settings;
        let mut s = self.lock();
        s.failures += 1;
        s.failure_rate = ewma(Some(s.failure_rate), 1.0);
        promote_if_cooled(&mut s.breaker, now);
        s.breaker = match s.breaker {
            Breaker::Closed { consecutive_failures } if consecutive_failures + 1 >= settings.threshold => {
                open_for(now, 1, settings)
            }
            Breaker::Closed { consecutive_failures } => Breaker::Closed { consecutive_failures: consecutive_failures + 1 },
            Breaker::HalfOpen { ejections, .. } => open_for(now, ejections + 1, settings),
            // Tried as a last resort while open: the ejection stands as it is, neither shortened
            // nor extended, so the route still gets its half-open probe on time.
            Breaker::Open { until, ejections } => Breaker::Open { until, ejections },
        };
    }

    /// A 429: not a fault, but the route rests until `retry_after` has passed.
    pub fn record_rate_limited(&self, retry_after: Option<Duration>) {
        let mut s = self.lock();
        if let Some(after) = retry_after {
            let until = Instant::now() + after;
            s.parked_until = Some(s.parked_until.map_or(until, |t| t.max(until)));
        }
        if let Breaker::HalfOpen { probing, .. } = &mut s.breaker {
            *probing = false;
        }
    }
}

impl RouteHealth {
    /// How long the breaker stays open from now (`None` when it is not open).
    pub fn open_for(&self) -> Option<Duration> {
        let now = Instant::now();
        let mut s = self.lock();
        promote_if_cooled(&mut s.breaker, now);
        match s.breaker {
            Breaker::Open { until, .. } => Some(until.saturating_duration_since(now)),
            _ => None,
        }
    }

    /// Another instance saw this route fail: open the breaker until then too (never shortening
    /// a longer local ejection).
    pub fn adopt_remote_open(&self, remaining: Duration) {
        let until = Instant::now() + remaining;
        let mut s = self.lock();
        s.breaker = match s.breaker {
            Breaker::Open { until: local, ejections } => Breaker::Open { until: local.max(until), ejections },
            Breaker::HalfOpen { ejections, .. } => Breaker::Open { until, ejections: ejections + 1 },
            Breaker::Closed { .. } => Breaker::Open { until, ejections: 1 },
        };
    }

    /// Another instance's statistics, used while this instance has no observations of its own.
    pub fn adopt_remote_stats(&self, failure_rate: f64, latency_ms: Option<f64>) {
        let mut s = self.lock();
        if s.successes + s.failures == 0 {
            s.failure_rate = failure_rate.clamp(0.0, 1.0);
            if s.latency_ms.is_none() {
                s.latency_ms = latency_ms;
            }
        }
    }
}

/// An open breaker for `cooldown × ejections` (capped).
fn open_for(now: Instant, ejections: u32, settings: BreakerSettings) -> Breaker {
    Breaker::Open { until: now + settings.cooldown * ejections.clamp(1, MAX_EJECTION_MULTIPLIER), ejections }
}

fn promote_if_cooled(breaker: &mut Breaker, now: Instant) {
    if let Breaker::Open { until, ejections } = *breaker {
        if now >= until {
            *breaker = Breaker::HalfOpen { probing: false, ejections };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> RouteHealth {
        RouteHealth::new(BreakerSettings { threshold: 3, cooldown: Duration::from_secs(30) })
    }

    #[tokio::test(start_paused = true)]
    async fn opens_at_the_threshold_and_half_opens_after_the_cooldown() {
        let h = health();
        h.record_fault();
        h.record_fault();
        assert_eq!(h.view().breaker, BreakerState::Closed);
        h.record_fault();
        assert_eq!(h.view().breaker, BreakerState::Open);
        assert!(h.view().deferred);
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(h.view().breaker, BreakerState::Open);
        tokio::time::advance(Duration::from_secs(1)).await;
        let view = h.view();
        assert_eq!(view.breaker, BreakerState::HalfOpen);
        assert!(!view.deferred, "a half-open route may take one probe");
        h.begin_attempt();
        assert!(h.view().deferred, "only one probe at a time");
        h.record_success(Observation::default());
        assert_eq!(h.view().breaker, BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_longer_and_never_shorter() {
        let h = health();
        for _ in 0..3 {
            h.record_fault();
        }
        tokio::time::advance(Duration::from_secs(30)).await;
        h.begin_attempt();
        h.record_fault();
        assert_eq!(h.view().breaker, BreakerState::Open);
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(h.view().breaker, BreakerState::Open, "second ejection lasts 2 × cooldown");
        h.record_fault();
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(h.view().breaker, BreakerState::HalfOpen, "a late failure did not shorten it");
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_consecutive_count_and_rate_limits_only_park() {
        let h = health();
        h.record_fault();
        h.record_fault();
        h.record_success(Observation { latency: Duration::from_millis(100), ..Observation::default() });
        h.record_fault();
        h.record_fault();
        assert_eq!(h.view().breaker, BreakerState::Closed);
        h.record_rate_limited(Some(Duration::from_secs(7)));
        let view = h.view();
        assert_eq!(view.breaker, BreakerState::Closed);
        assert!(view.deferred);
        tokio::time::advance(Duration::from_secs(7)).await;
        assert!(!h.view().deferred);
        assert_eq!(h.view().latency_ms, Some(100.0));
    }

    fn streamed(ms: u64) -> Observation {
        Observation { latency: Duration::from_millis(ms), ttft: Some(Duration::from_millis(10)), completion_tokens: 20 }
    }

    #[tokio::test(start_paused = true)]
    async fn recent_samples_count_up_go_stale_and_a_late_sample_restarts_the_average() {
        let h = health();
        assert_eq!((h.view().recent_latency_samples, h.view().recent_throughput_samples), (0, 0));
        h.record_success(Observation { latency: Duration::from_millis(100), ..Observation::default() });
        assert_eq!((h.view().recent_latency_samples, h.view().recent_throughput_samples), (1, 0), "no ttft: no throughput");
        h.record_success(streamed(210));
        h.record_success(streamed(210));
        assert_eq!((h.view().recent_latency_samples, h.view().recent_throughput_samples), (3, 2));
        let averaged = h.view().latency_ms.unwrap_or_default();
        assert!(averaged > 100.0 && averaged < 210.0, "{averaged}");

        tokio::time::advance(STATS_STALE_AFTER).await;
        assert_eq!(h.view().recent_latency_samples, 3, "still recent at exactly the limit");
        tokio::time::advance(Duration::from_millis(1)).await;
        let stale = h.view();
        assert_eq!((stale.recent_latency_samples, stale.recent_throughput_samples), (0, 0));
        assert_eq!(stale.latency_ms, Some(averaged), "a stale average is still shown until replaced");

        h.record_success(Observation { latency: Duration::from_millis(500), ..Observation::default() });
        let restarted = h.view();
        assert_eq!(restarted.recent_latency_samples, 1);
        assert_eq!(restarted.latency_ms, Some(500.0), "the stale average was dropped, not blended");
        assert_eq!(restarted.ttft_ms, None, "the stale time to first token went with it");
    }
}
