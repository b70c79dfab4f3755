//! Shared mode: global counts claimed in chunks.
//!
//! For each key (or IP) and window — the current minute, the current day — an instance holds
//! an *allowance*: how many requests it claimed from the window's global count in the
//! database (`rate_windows`, through [`RateRepo::claim_rate`], atomic across instances) and
//! how many of them it used. A request takes one from the allowance in memory; only when the
//! allowance is used up does the request claim more (one database round trip per chunk, one
//! claim at a time per key and instance, later requests waiting for it). The database never
//! grants past the limit, minus what the previous minute still weighs (the same sliding
//! estimate as local mode, over the global counts).
//!
//! Chunks start at a tenth of the limit (at most 100) and shrink to a quarter of the room the
//! instance last saw, so that allowance left unused on another instance at the end of a window
//! stays small. Nothing is admitted without allowance: when the database cannot be reached (or
//! does not answer within 2 s) and the allowance is used up, the request is refused with 503
//! (fail closed).

use std::sync::Arc;
use std::time::Duration;

use marga_store::{RateClaim, RateGrant, RateRepo};

use super::table::Table;
use super::{minute_start, seconds_until, Entry, Limits, Quota, Refusal, DAY_MS, MINUTE_MS};

/// The largest chunk an instance claims at once.
const MAX_CHUNK: i64 = 100;
/// How long a claim may take before the request is refused (503) rather than left waiting
/// behind a database that does not answer.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(2);

/// When a request is counted, in the scope's terms.
pub(super) struct At {
    pub now: i64,
    pub day_start: i64,
    /// `k:<key id>` or `ip:<addr>`.
    pub scope: String,
}

/// What an instance holds of one window.
#[derive(Clone, Copy, Debug, Default)]
struct Allowance {
    start: i64,
    granted: i64,
    used: i64,
    /// The window's global count and the previous window's weight, as of the last claim.
    count: i64,
    carried: i64,
}

impl Allowance {
    /// Moves to the window that begins at `start` if it is a later one; a request stamped
    /// before the current window began counts in the current one (rolling back would throw
    /// away what this instance holds of the current window).
    fn roll(&mut self, start: i64) {
        if start > self.start {
            *self = Allowance { start, ..Allowance::default() };
        }
    }

    fn left(&self) -> i64 {
        self.granted - self.used
    }

    /// How much to claim next: a tenth of the limit (≤ [`MAX_CHUNK`]), at most a quarter of
    /// the room last seen, at least one.
    fn want(&self, limit: u32) -> i64 {
        let limit = i64::from(limit);
        let room = (limit - self.carried - self.count).max(0);
        (limit / 10).clamp(1, MAX_CHUNK).min(room / 4).max(1)
    }

    fn add(&mut self, grant: RateGrant) {
        self.granted += grant.granted;
        self.count = grant.count;
        self.carried = grant.carried;
    }

    /// What is left of `limit` across every instance, as far as this one knows.
    fn remaining(&self, limit: u32) -> u32 {
        let global = (i64::from(limit) - self.carried - self.count).max(0) + self.left();
        u32::try_from(global.min(i64::from(limit))).unwrap_or(0)
    }
}

/// The allowances of one key or IP, and the lock that keeps its claims one at a time.
#[derive(Default)]
pub(super) struct Allowances {
    minute: Allowance,
    day: Allowance,
    claiming: Arc<tokio::sync::Mutex<()>>,
    pub(super) touched_ms: i64,
}

/// What is missing to admit a request.
#[derive(Clone, Copy, Debug, Default)]
struct Missing {
    minute: bool,
    day: bool,
}

/// Takes one request from the allowances, or says which are used up.
fn take(a: &mut Allowances, limits: Limits, at: &At) -> Result<Quota, Missing> {
    let minute = minute_start(at.now);
    a.minute.roll(minute);
    a.day.roll(at.day_start);
    let missing = Missing {
        minute: limits.rpm.is_some() && a.minute.left() <= 0,
        day: limits.daily.is_some() && a.day.left() <= 0,
    };
    if missing.minute || missing.day {
        return Err(missing);
    }
    if limits.rpm.is_some() {
        a.minute.used += 1;
    }
    if limits.daily.is_some() {
        a.day.used += 1;
    }
    a.touched_ms = at.now;
    Ok(match (limits.rpm, limits.daily) {
        (Some(limit), _) => Quota { limit, remaining: a.minute.remaining(limit), reset_s: (a.minute.start + MINUTE_MS) / 1000 },
        (None, Some(limit)) => Quota { limit, remaining: a.day.remaining(limit), reset_s: (a.day.start + DAY_MS) / 1000 },
        (None, None) => Quota::default(),
    })
}

/// How many times a request claims again because its window ended while it claimed.
const CLAIM_ROUNDS: usize = 3;

/// Admits one request of `id` against its global counts.
pub(super) async fn admit(
    repo: &dyn RateRepo,
    table: &Table<Entry>,
    id: &str,
    limits: Limits,
    at: &At,
) -> Result<Quota, Refusal> {
    if let Ok(quota) = table.with(id, at.now, |e| take(&mut e.shared, limits, at)) {
        return Ok(quota);
    }
    let lock = table.with(id, at.now, |e| Arc::clone(&e.shared.claiming));
    let _claiming = lock.lock().await;
    for _ in 0..CLAIM_ROUNDS {
        // Another request may have claimed while this one waited.
        let looked = table.with(id, at.now, |e| take(&mut e.shared, limits, at).map_err(|m| (m, e.shared.minute, e.shared.day)));
        let (missing, minute, day) = match looked {
            Ok(quota) => return Ok(quota),
            Err(state) => state,
        };
        let minute_grant = match (missing.minute, limits.rpm) {
            (true, Some(limit)) => Some(claim(repo, &minute_claim(at, limit, &minute)).await?),
            _ => None,
        };
        let day_grant = match (missing.day, limits.daily) {
            (true, Some(limit)) => Some(claim(repo, &day_claim(at, limit, &day)).await?),
            _ => None,
        };
        let outcome = table.with(id, at.now, |e| {
            let a = &mut e.shared;
            // A request of a later window (which needs no lock to look) may have moved a window
            // on during the claim: the grant then belongs to a window that is over.
            let moved = a.minute.start != minute.start || a.day.start != day.start;
            if let Some(grant) = minute_grant.filter(|_| a.minute.start == minute.start) {
                a.minute.add(grant);
            }
            if let Some(grant) = day_grant.filter(|_| a.day.start == day.start) {
                a.day.add(grant);
            }
            take(a, limits, at).map_err(|still| (still, moved))
        });
        match outcome {
            Ok(quota) => return Ok(quota),
            // Claimed for a window that ended meanwhile: claim again, in the current one.
            Err((_, true)) => continue,
            Err((still, false)) => return Err(refusal(still, limits, at.now, &minute, &day)),
        }
    }
    Err(Refusal::Unavailable)
}

async fn claim(repo: &dyn RateRepo, claim: &RateClaim) -> Result<RateGrant, Refusal> {
    match tokio::time::timeout(CLAIM_TIMEOUT, repo.claim_rate(claim)).await {
        Ok(Ok(grant)) => Ok(grant),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot claim rate-limit allowance from the database; refusing (fail closed)");
            Err(Refusal::Unavailable)
        }
        Err(_) => {
            tracing::warn!("claiming rate-limit allowance took over {CLAIM_TIMEOUT:?}; refusing (fail closed)");
            Err(Refusal::Unavailable)
        }
    }
}

/// A claim in the minute `held` is in (the request's own, or a later one it counts in).
fn minute_claim(at: &At, limit: u32, held: &Allowance) -> RateClaim {
    let start = held.start;
    let elapsed = (at.now - start).clamp(0, MINUTE_MS);
    RateClaim {
        scope: format!("{}:m", at.scope),
        window_start_ms: start,
        previous_start_ms: Some(start - MINUTE_MS),
        carry_ppm: (MINUTE_MS - elapsed) * 1_000_000 / MINUTE_MS,
        limit: i64::from(limit),
        want: held.want(limit),
    }
}

/// A claim in the day `held` is in.
fn day_claim(at: &At, limit: u32, held: &Allowance) -> RateClaim {
    RateClaim {
        scope: format!("{}:d", at.scope),
        window_start_ms: held.start,
        previous_start_ms: None,
        carry_ppm: 0,
        limit: i64::from(limit),
        want: held.want(limit),
    }
}

/// The refusal for what is `missing` of the windows `minute` and `day` (those the request
/// counted in).
fn refusal(missing: Missing, limits: Limits, now: i64, minute: &Allowance, day: &Allowance) -> Refusal {
    match (missing.minute, limits.rpm, limits.daily) {
        (true, Some(limit), _) => Refusal::PerMinute { limit, retry_after_s: seconds_until(now, minute.start + MINUTE_MS) },
        (_, _, Some(limit)) => Refusal::PerDay { limit, retry_after_s: seconds_until(now, day.start + DAY_MS) },
        _ => Refusal::Unavailable,
    }
}

/// Deletes windows older than two days, every ten minutes, until aborted.
pub fn spawn_pruner(repo: Arc<dyn RateRepo>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(600));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let before = crate::pipeline::unix_now_ms() - 2 * DAY_MS;
            if let Err(e) = repo.prune_rate_windows(before).await {
                tracing::warn!(error = %e, "could not prune old rate-limit windows");
            }
        }
    })
}
