//! Request counts shared between instances: each instance claims allowance from a window's
//! global count in chunks, so that a per-minute or per-day limit holds across every instance
//! without a database round trip per request.

use crate::{BoxFuture, StoreError};

/// A request for allowance in one window of one scope.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RateClaim {
    /// `k:<key id>:m`, `k:<key id>:d`, `ip:<addr>:m`, …
    pub scope: String,
    pub window_start_ms: i64,
    /// The window before, whose count is carried into this one (sliding minute), if any.
    pub previous_start_ms: Option<i64>,
    /// How much of the previous window's count still weighs, in millionths (0 to 1,000,000).
    pub carry_ppm: i64,
    /// The limit: `carried + count` never passes it.
    pub limit: i64,
    /// How much to claim; less (or nothing) is granted when the window has less room.
    pub want: i64,
}

/// What a claim got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateGrant {
    pub granted: i64,
    /// The window's count after the claim (every instance's claims).
    pub count: i64,
    /// What the previous window weighs: `ceil(previous count × carry_ppm / 10⁶)`.
    pub carried: i64,
}

impl RateGrant {
    /// Grants `min(want, limit − carried − count)` (never negative).
    pub fn compute(claim: &RateClaim, count: i64, previous: i64) -> RateGrant {
        let weight = claim.carry_ppm.clamp(0, 1_000_000);
        let carried = (previous.saturating_mul(weight) + 999_999) / 1_000_000;
        let room = claim.limit.saturating_sub(carried).saturating_sub(count).max(0);
        let granted = claim.want.max(0).min(room);
        RateGrant { granted, count: count + granted, carried }
    }
}

pub trait RateRepo: Send + Sync {
    /// Claims allowance atomically with respect to every other claim of the same window.
    fn claim_rate<'a>(&'a self, claim: &'a RateClaim) -> BoxFuture<'a, Result<RateGrant, StoreError>>;
    /// Deletes windows that started before `before_ms`; returns how many.
    fn prune_rate_windows(&self, before_ms: i64) -> BoxFuture<'_, Result<u64, StoreError>>;
}
