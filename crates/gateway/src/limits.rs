//! Request-count limits per key and per client IP: requests per minute and per day.
//!
//! Counted in memory with sliding-window estimates (the previous minute weighted by how much
//! of it still overlaps the last 60 s, plus the current minute), one short lock per check.
//! Days are reckoned in the organisation's time zone. With several instances each counts what
//! it serves; the documented tolerance is therefore "limit × instances" at worst for bursts
//! shorter than a refresh (see docs/accounts.md).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::accounts::timezone::UtcOffset;
use crate::accounts::Principal;

const MINUTE_MS: i64 = 60_000;

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

#[derive(Default)]
struct Window {
    minute_start: i64,
    current: u32,
    previous: u32,
    day_start: i64,
    today: u32,
}

impl Window {
    fn roll(&mut self, now: i64, day_start: i64) {
        let minute = now - now.rem_euclid(MINUTE_MS);
        if minute != self.minute_start {
            self.previous = if minute - self.minute_start == MINUTE_MS { self.current } else { 0 };
            self.current = 0;
            self.minute_start = minute;
        }
        if day_start != self.day_start {
            self.day_start = day_start;
            self.today = 0;
        }
    }

    /// Requests in the last 60 s, estimated.
    fn last_minute(&self, now: i64) -> u32 {
        let into = (now - self.minute_start) as f64 / MINUTE_MS as f64;
        (f64::from(self.previous) * (1.0 - into)).ceil() as u32 + self.current
    }
}

/// A refusal: which limit, and when to come back.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `rate_limit_exceeded`.
    PerMinute { limit: u32, retry_after_s: u64 },
    /// `daily_limit_reached`.
    PerDay { limit: u32, retry_after_s: u64 },
}

/// The `X-RateLimit-*` headers of an admitted request.
#[derive(Clone, Copy, Debug, Default)]
pub struct Quota {
    pub limit: u32,
    pub remaining: u32,
    /// Unix seconds when the window resets.
    pub reset_s: i64,
}

#[derive(Default)]
pub struct Limiter {
    keys: Mutex<HashMap<String, Window>>,
    ips: Mutex<HashMap<String, Window>>,
}

impl Limiter {
    /// Counts one request of `principal` from `ip` at `now_ms`, or refuses it.
    pub fn admit(&self, principal: &Principal, ip: Option<&str>, defaults: &LimitDefaults, now_ms: i64) -> Result<Quota, Refusal> {
        let key = &principal.key;
        if principal.is_master() {
            return Ok(Quota::default());
        }
        let tz = principal.org.timezone;
        let (rpm, daily) = if key.trial {
            (Some(defaults.trial_rpm), Some(defaults.trial_daily))
        } else {
            let rpm = key.rpm_limit.map(clamp_u32).or((defaults.key_rpm > 0).then_some(defaults.key_rpm));
            (rpm, key.daily_limit.map(clamp_u32))
        };
        if let (Some(ip), true) = (ip, defaults.ip_rpm > 0) {
            check(&self.ips, ip, Some(defaults.ip_rpm), None, tz, now_ms)?;
        }
        check(&self.keys, &key.id, rpm, daily, tz, now_ms)
    }
}

fn clamp_u32(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

fn check(
    table: &Mutex<HashMap<String, Window>>,
    id: &str,
    rpm: Option<u32>,
    daily: Option<u32>,
    tz: UtcOffset,
    now: i64,
) -> Result<Quota, Refusal> {
    let day_start = tz.day_start(now);
    let mut table = table.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if !table.contains_key(id) {
        table.insert(id.to_owned(), Window::default());
    }
    let Some(window) = table.get_mut(id) else { return Ok(Quota::default()) };
    window.roll(now, day_start);
    let minute_reset = window.minute_start + MINUTE_MS;
    if let Some(limit) = rpm {
        if window.last_minute(now) >= limit {
            return Err(Refusal::PerMinute { limit, retry_after_s: seconds_until(now, minute_reset) });
        }
    }
    let day_reset = day_start + 24 * 3_600_000;
    if let Some(limit) = daily {
        if window.today >= limit {
            return Err(Refusal::PerDay { limit, retry_after_s: seconds_until(now, day_reset) });
        }
    }
    window.current += 1;
    window.today += 1;
    Ok(match (rpm, daily) {
        (Some(limit), _) => Quota { limit, remaining: limit.saturating_sub(window.last_minute(now)), reset_s: minute_reset / 1000 },
        (None, Some(limit)) => Quota { limit, remaining: limit.saturating_sub(window.today), reset_s: day_reset / 1000 },
        (None, None) => Quota::default(),
    })
}

fn seconds_until(now: i64, at: i64) -> u64 {
    u64::try_from(((at - now) + 999) / 1000).unwrap_or(1).max(1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;

    use super::*;
    use crate::accounts::{KeyInfo, OrgInfo};
    use crate::money::Currency;

    fn principal(rpm: Option<i64>, daily: Option<i64>) -> Principal {
        let mut key = KeyInfo::master();
        key.kind = crate::accounts::KeyKind::Inference;
        key.id = "k".into();
        key.rpm_limit = rpm;
        key.daily_limit = daily;
        let org = OrgInfo { id: "o".into(), name: "o".into(), currency: Currency::Inr, timezone: UtcOffset::IST };
        Principal { org: Arc::new(org), key: Arc::new(key) }
    }

    const NONE: LimitDefaults = LimitDefaults { key_rpm: 0, ip_rpm: 0, trial_rpm: 60, trial_daily: 200 };
    const T0: i64 = 1_795_377_600_000;

    #[test]
    fn per_minute_limit_refuses_the_extra_request_and_recovers() {
        let limiter = Limiter::default();
        let p = principal(Some(3), None);
        for i in 0..3 {
            let quota = limiter.admit(&p, None, &NONE, T0 + i).unwrap();
            assert_eq!(quota.remaining, 2 - i as u32);
        }
        let refusal = limiter.admit(&p, None, &NONE, T0 + 10).unwrap_err();
        assert!(matches!(refusal, Refusal::PerMinute { limit: 3, retry_after_s } if retry_after_s >= 1));
        assert!(limiter.admit(&p, None, &NONE, T0 + 2 * MINUTE_MS).is_ok(), "two minutes later");
    }

    #[test]
    fn daily_limit_resets_at_local_midnight() {
        let limiter = Limiter::default();
        let p = principal(None, Some(2));
        let midnight_ist = UtcOffset::IST.day_start(T0) + 86_400_000;
        limiter.admit(&p, None, &NONE, midnight_ist - 5_000).unwrap();
        limiter.admit(&p, None, &NONE, midnight_ist - 4_000).unwrap();
        let refusal = limiter.admit(&p, None, &NONE, midnight_ist - 3_000).unwrap_err();
        assert_eq!(refusal, Refusal::PerDay { limit: 2, retry_after_s: 3 });
        assert!(limiter.admit(&p, None, &NONE, midnight_ist).is_ok());
    }
}
