//! Spend caps: a key's credit `limit` (over its `limit_reset` window), its monthly `budget`,
//! its workspace's monthly budget, and the daily/weekly/monthly caps of its guardrails (a
//! guardrail assigned to a member caps the spend of the member's keys together).
//!
//! A cap holds when `spent + in flight + this request's reservation ≤ cap`. `spent` comes from
//! the ledger (charges since the window started, read at most every [`STALE_AFTER`] per
//! scope, so a busy key costs one query per interval, not per request) plus what this instance
//! charged since; `in flight` is what this instance has reserved and not yet settled.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use marga_store::LedgerRepo;

use crate::accounts::timezone::UtcOffset;
use crate::pipeline::unix_now_ms;

/// How old a scope's ledger figure may get before it is read again.
const STALE_AFTER_MS: i64 = 2_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Period {
    Day,
    Week,
    Month,
    Lifetime,
}

impl Period {
    pub fn parse(s: Option<&str>) -> Period {
        match s {
            Some("daily") => Period::Day,
            Some("weekly") => Period::Week,
            Some("monthly") => Period::Month,
            _ => Period::Lifetime,
        }
    }

    fn start(self, tz: UtcOffset, now: i64) -> i64 {
        match self {
            Period::Day => tz.day_start(now),
            Period::Week => tz.week_start(now),
            Period::Month => tz.month_start(now),
            Period::Lifetime => 0,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "daily",
            Period::Week => "weekly",
            Period::Month => "monthly",
            Period::Lifetime => "lifetime",
        }
    }
}

/// Whose spend a cap limits.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    Key(String),
    Workspace(String),
    /// A member's keys together (a guardrail assigned to the member).
    Member(String),
}

/// One cap to check: whose spend, over which period, and how much.
#[derive(Clone, Debug)]
pub struct Cap {
    pub org_id: String,
    pub scope: Scope,
    pub period: Period,
    pub cap_nanos: i64,
    /// What to call it in the refusal (`key limit`, `key budget`, `guardrail "x" daily`).
    pub label: String,
}

#[derive(Default)]
struct Spend {
    window_start: i64,
    spent: i64,
    in_flight: i64,
    loaded_at: i64,
}

/// Admitted spend against some caps; settle or drop it.
pub struct Hold {
    tracker: Arc<SpendTracker>,
    scopes: Vec<(Scope, Period)>,
    amount: i64,
    done: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("{label} of {cap} would be exceeded")]
pub struct OverCap {
    pub label: String,
    pub cap: String,
}

pub struct SpendTracker {
    ledger: Arc<dyn LedgerRepo>,
    scopes: Mutex<HashMap<(Scope, Period), Spend>>,
}

impl SpendTracker {
    pub fn new(ledger: Arc<dyn LedgerRepo>) -> Arc<SpendTracker> {
        Arc::new(SpendTracker { ledger, scopes: Mutex::new(HashMap::new()) })
    }

    fn scopes(&self) -> std::sync::MutexGuard<'_, HashMap<(Scope, Period), Spend>> {
        self.scopes.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Holds `amount` against every cap, or names the first that would be exceeded.
    pub async fn hold(self: &Arc<Self>, caps: &[Cap], tz: UtcOffset, amount: i64) -> Result<Hold, OverCap> {
        if caps.is_empty() {
            // Most keys have no cap: no lock, nothing to settle.
            return Ok(Hold { tracker: Arc::clone(self), scopes: Vec::new(), amount, done: true });
        }
        let now = unix_now_ms();
        for cap in caps {
            self.refresh_if_stale(cap, tz, now).await;
        }
        let mut scopes = self.scopes();
        for cap in caps {
            let scope = scopes.entry((cap.scope.clone(), cap.period)).or_default();
            if scope.spent + scope.in_flight + amount > cap.cap_nanos {
                return Err(OverCap { label: cap.label.clone(), cap: crate::money::nanos_to_decimal(cap.cap_nanos).to_string() });
            }
        }
        let mut held = Vec::with_capacity(caps.len());
        for cap in caps {
            let key = (cap.scope.clone(), cap.period);
            if held.contains(&key) {
                continue;
            }
            if let Some(scope) = scopes.get_mut(&key) {
                scope.in_flight += amount;
            }
            held.push(key);
        }
        Ok(Hold { tracker: Arc::clone(self), scopes: held, amount, done: false })
    }

    async fn refresh_if_stale(&self, cap: &Cap, tz: UtcOffset, now: i64) {
        let start = cap.period.start(tz, now);
        let key = (cap.scope.clone(), cap.period);
        let fresh = self.scopes().get(&key).is_some_and(|s| s.window_start == start && now - s.loaded_at < STALE_AFTER_MS);
        if fresh {
            return;
        }
        let spent = match &cap.scope {
            Scope::Key(id) => self.ledger.spend_since(&cap.org_id, Some(id), start).await,
            Scope::Workspace(id) => self.ledger.workspace_spend_since(&cap.org_id, id, start).await,
            Scope::Member(id) => self.ledger.member_spend_since(&cap.org_id, id, start).await,
        };
        match spent {
            Ok(spent) => {
                let mut scopes = self.scopes();
                let scope = scopes.entry(key).or_default();
                scope.window_start = start;
                scope.spent = spent;
                scope.loaded_at = now;
            }
            Err(e) => tracing::warn!(error = %e, "could not read spend; using the last known figure"),
        }
    }
}

impl Hold {
    /// Turns the hold into spend of `actual` nanos.
    pub fn settle(mut self, actual: i64) {
        self.finish(actual);
    }

    fn finish(&mut self, actual: i64) {
        if self.done {
            return;
        }
        self.done = true;
        let mut scopes = self.tracker.scopes();
        for key in &self.scopes {
            if let Some(scope) = scopes.get_mut(key) {
                scope.in_flight -= self.amount;
                scope.spent += actual;
            }
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.finish(0);
    }
}
