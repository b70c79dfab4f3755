//! Request-count limits per key and per client IP: requests per minute and per day.
//!
//! Minutes are sliding-window estimates (the previous minute weighted by how much of it still
//! overlaps the last 60 s, plus the current minute); days are reckoned in the organisation's
//! time zone. Two modes, chosen at start:
//!
//! - **Local** (SQLite, one instance): counted in memory, nothing else.
//! - **Shared** (Postgres, several instances): the counts are global. Each instance claims
//!   allowance from the window's count in the database in chunks ([`shared`]) and admits from
//!   it in memory, so that a request waits for the database only when its instance's chunk
//!   is used up. Across instances a key is never admitted past its limit; it may be refused
//!   slightly early while another instance holds unused allowance (see docs/accounts.md).
//!
//! Counters live in a sharded map ([`table`]): no process-wide lock on the request path.

mod shared;
mod table;

use std::net::IpAddr;
use std::sync::Arc;

use marga_store::RateRepo;

use crate::accounts::timezone::UtcOffset;
use crate::accounts::Principal;
use table::{Table, Touched};

const MINUTE_MS: i64 = 60_000;
const DAY_MS: i64 = 86_400_000;

pub use shared::spawn_pruner;

/// What the gateway allows when a key sets nothing.
#[derive(Clone, Copy, Debug)]
pub struct LimitDefaults {
    /// Requests per minute for any key without its own `rpm_limit` (0 = none).
    pub key_rpm: u32,
    /// Requests per minute per client IP (0 = none).
    pub ip_rpm: u32,
    /// Trial keys: per minute and per day.
    pub trial_rpm: u32,
    pub trial_daily: u32,
}

/// A refusal: which limit, and when to come back.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `rate_limit_exceeded`.
    PerMinute { limit: u32, retry_after_s: u64 },
    /// `daily_limit_reached`.
    PerDay { limit: u32, retry_after_s: u64 },
    /// Shared mode only: the instance's allowance is used up and the database cannot be asked
    /// for more. Fails closed (503), never counted per instance.
    Unavailable,
}

/// The `X-RateLimit-*` headers of an admitted request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Quota {
    pub limit: u32,
    pub remaining: u32,
    /// Unix seconds when the window resets.
    pub reset_s: i64,
}

/// The limits that apply to one scope (a key or an IP).
#[derive(Clone, Copy, Debug, Default)]
struct Limits {
    rpm: Option<u32>,
    daily: Option<u32>,
}

/// The counters of one key or IP.
#[derive(Default)]
struct Entry {
    local: Window,
    shared: shared::Allowances,
}

impl Touched for Entry {
    fn touched_ms(&self) -> i64 {
        self.local.touched_ms.max(self.shared.touched_ms)
    }
}

pub struct Limiter {
    keys: Table<Entry>,
    ips: Table<Entry>,
    /// Shared mode: where the global counts live.
    shared: Option<Arc<dyn RateRepo>>,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter::local()
    }
}

impl Limiter {
    /// Counts in memory only (one instance).
    pub fn local() -> Limiter {
        Limiter { keys: Table::default(), ips: Table::default(), shared: None }
    }

    /// Counts globally, claiming allowance from `repo` in chunks (several instances).
    pub fn shared(repo: Arc<dyn RateRepo>) -> Limiter {
        Limiter { keys: Table::default(), ips: Table::default(), shared: Some(repo) }
    }

    /// Counts one request of `principal` from `ip` at `now_ms`, or refuses it.
    pub async fn admit(
        &self,
        principal: &Principal,
        ip: Option<IpAddr>,
        defaults: &LimitDefaults,
        now_ms: i64,
    ) -> Result<Quota, Refusal> {
        let key = &principal.key;
        if principal.is_master() {
            return Ok(Quota::default());
        }
        let tz = principal.org.timezone;
        let limits = if key.trial {
            Limits { rpm: Some(defaults.trial_rpm), daily: Some(defaults.trial_daily) }
        } else {
            let rpm = key.rpm_limit.map(clamp_u32).or((defaults.key_rpm > 0).then_some(defaults.key_rpm));
            Limits { rpm, daily: key.daily_limit.map(clamp_u32) }
        };
        if let (Some(ip), true) = (ip, defaults.ip_rpm > 0) {
            let ip_limits = Limits { rpm: Some(defaults.ip_rpm), daily: None };
            // Printed only here: most gateways have no per-IP limit.
            self.check(&self.ips, "ip", &ip.to_string(), ip_limits, tz, now_ms).await?;
        }
        self.check(&self.keys, "k", &key.id, limits, tz, now_ms).await
    }

    async fn check(
        &self,
        table: &Table<Entry>,
        kind: &str,
        id: &str,
        limits: Limits,
        tz: UtcOffset,
        now: i64,
    ) -> Result<Quota, Refusal> {
        if limits.rpm.is_none() && limits.daily.is_none() {
            return Ok(Quota::default());
        }
        let day_start = tz.day_start(now);
        match &self.shared {
            None => table.with(id, now, |e| e.local.admit(limits, day_start, now)),
            Some(repo) => {
                let at = shared::At { now, day_start, scope: format!("{kind}:{id}") };
                shared::admit(repo.as_ref(), table, id, limits, &at).await
            }
        }
    }
}

fn clamp_u32(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

fn seconds_until(now: i64, at: i64) -> u64 {
    u64::try_from(((at - now) + 999) / 1000).unwrap_or(1).max(1)
}

fn minute_start(now: i64) -> i64 {
    now - now.rem_euclid(MINUTE_MS)
}

/// Local mode: this instance's counts.
#[derive(Default)]
struct Window {
    minute_start: i64,
    current: u32,
    previous: u32,
    day_start: i64,
    today: u32,
    touched_ms: i64,
}

impl Window {
    /// Moves the windows forward to those of `now`, never back: a request stamped before the
    /// current window began (its thread read the clock before another thread counted) counts in
    /// the current one rather than resetting it.
    fn roll(&mut self, now: i64, day_start: i64) {
        let minute = minute_start(now);
        if minute > self.minute_start {
            self.previous = if minute - self.minute_start == MINUTE_MS { self.current } else { 0 };
            self.current = 0;
            self.minute_start = minute;
        }
        if day_start > self.day_start {
            self.day_start = day_start;
            self.today = 0;
        }
    }

    /// Requests in the last 60 s, estimated.
    fn last_minute(&self, now: i64) -> u32 {
        let into = (now - self.minute_start) as f64 / MINUTE_MS as f64;
        (f64::from(self.previous) * (1.0 - into)).ceil() as u32 + self.current
    }

    fn admit(&mut self, limits: Limits, day_start: i64, now: i64) -> Result<Quota, Refusal> {
        self.roll(now, day_start);
        let (now, day_start) = (now.max(self.minute_start), self.day_start);
        let minute_reset = self.minute_start + MINUTE_MS;
        if let Some(limit) = limits.rpm {
            if self.last_minute(now) >= limit {
                return Err(Refusal::PerMinute { limit, retry_after_s: seconds_until(now, minute_reset) });
            }
        }
        let day_reset = day_start + DAY_MS;
        if let Some(limit) = limits.daily {
            if self.today >= limit {
                return Err(Refusal::PerDay { limit, retry_after_s: seconds_until(now, day_reset) });
            }
        }
        self.current += 1;
        self.today += 1;
        self.touched_ms = now;
        Ok(match (limits.rpm, limits.daily) {
            (Some(limit), _) => {
                Quota { limit, remaining: limit.saturating_sub(self.last_minute(now)), reset_s: minute_reset / 1000 }
            }
            (None, Some(limit)) => Quota { limit, remaining: limit.saturating_sub(self.today), reset_s: day_reset / 1000 },
            (None, None) => Quota::default(),
        })
    }
}

#[cfg(test)]
mod tests;
