//! The retry budget: retries may add at most `ratio` of the traffic on top of first attempts
//! (plus a small floor for quiet periods), so that a full outage does not multiply the load on
//! upstreams. Counted in fixed windows with atomics: no lock on the hot path.
//!
//! Written here rather than taken from `tower::retry::budget` because the window must follow
//! `tokio::time` (paused-clock tests) and the accounting is a dozen lines.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

pub struct RetryBudget {
    /// Retries allowed per first attempt, in percent.
    percent: u64,
    /// Retries always allowed per window, however quiet.
    floor: u64,
    window: Duration,
    origin: Instant,
    epoch: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

impl RetryBudget {
    pub fn new(percent: u64, floor_per_second: u64, window: Duration) -> Self {
        RetryBudget {
            percent,
            floor: floor_per_second.saturating_mul(window.as_secs().max(1)),
            window,
            origin: Instant::now(),
            epoch: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        }
    }

    /// Starts a new window when the current one has passed.
    fn roll(&self) {
        let elapsed = Instant::now().saturating_duration_since(self.origin);
        let epoch = (elapsed.as_millis() / self.window.as_millis().max(1)) as u64;
        let seen = self.epoch.load(Ordering::Relaxed);
        if epoch != seen && self.epoch.compare_exchange(seen, epoch, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            self.requests.store(0, Ordering::Relaxed);
            self.retries.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a request's first attempt.
    pub fn deposit(&self) {
        self.roll();
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn withdraw(&self) -> bool {
        self.roll();
        let allowed = self.floor + self.requests.load(Ordering::Relaxed) * self.percent / 100;
        let taken = self.retries.fetch_add(1, Ordering::Relaxed);
        if taken < allowed {
            true
        } else {
            self.retries.fetch_sub(1, Ordering::Relaxed);
            metrics::counter!("marga_retry_budget_exhausted_total").increment(1);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_are_capped_at_the_ratio_plus_the_floor_and_refill_per_window() {
        let budget = RetryBudget::new(20, 1, Duration::from_secs(10));
        for _ in 0..100 {
            budget.deposit();
        }
        let granted = (0..100).filter(|_| budget.withdraw()).count();
        assert_eq!(granted, 20 + 10);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(budget.withdraw(), "a new window brings the floor back");
    }
}
