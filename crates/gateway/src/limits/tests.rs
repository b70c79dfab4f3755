//! The limiter with a stepped clock: every call takes the time as an argument, so windows are
//! tested at exact instants. Shared mode runs against a real SQLite store in a temp dir (the
//! same `RateRepo` contract as Postgres), two limiters on one store standing for two instances.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use super::*;
use marga_store::RateClaim;
use crate::accounts::{KeyInfo, KeyKind, OrgInfo};
use crate::money::Currency;

fn principal(rpm: Option<i64>, daily: Option<i64>) -> Principal {
    let mut key = KeyInfo::master();
    key.kind = KeyKind::Inference;
    key.id = "k".into();
    key.rpm_limit = rpm;
    key.daily_limit = daily;
    let org = OrgInfo { id: "o".into(), name: "o".into(), currency: Currency::Inr, timezone: UtcOffset::IST };
    Principal { org: Arc::new(org), key: Arc::new(key), role: None }
}

const NONE: LimitDefaults = LimitDefaults { key_rpm: 0, ip_rpm: 0, trial_rpm: 60, trial_daily: 200 };
/// A minute boundary (2026-11-22T12:00:00Z).
const T0: i64 = 1_795_377_600_000;

async fn shared_store() -> (tempfile::TempDir, Arc<dyn RateRepo>) {
    let dir = tempfile::tempdir().unwrap();
    let repos = marga_store::open(None, dir.path()).await.unwrap();
    (dir, repos)
}

async fn admitted(limiter: &Limiter, p: &Principal, times: impl IntoIterator<Item = i64>) -> usize {
    let mut n = 0;
    for t in times {
        if limiter.admit(p, None, &NONE, t).await.is_ok() {
            n += 1;
        }
    }
    n
}

#[tokio::test]
async fn per_minute_limit_refuses_the_extra_request_and_recovers() {
    let limiter = Limiter::local();
    let p = principal(Some(3), None);
    for i in 0..3 {
        let quota = limiter.admit(&p, None, &NONE, T0 + i).await.unwrap();
        assert_eq!(quota.remaining, 2 - i as u32);
    }
    let refusal = limiter.admit(&p, None, &NONE, T0 + 10).await.unwrap_err();
    assert!(matches!(refusal, Refusal::PerMinute { limit: 3, retry_after_s } if retry_after_s >= 1));
    assert!(limiter.admit(&p, None, &NONE, T0 + 2 * MINUTE_MS).await.is_ok(), "two minutes later");
}

#[tokio::test]
async fn daily_limit_resets_at_local_midnight() {
    let limiter = Limiter::local();
    let p = principal(None, Some(2));
    let midnight_ist = UtcOffset::IST.day_start(T0) + DAY_MS;
    limiter.admit(&p, None, &NONE, midnight_ist - 5_000).await.unwrap();
    limiter.admit(&p, None, &NONE, midnight_ist - 4_000).await.unwrap();
    let refusal = limiter.admit(&p, None, &NONE, midnight_ist - 3_000).await.unwrap_err();
    assert_eq!(refusal, Refusal::PerDay { limit: 2, retry_after_s: 3 });
    assert!(limiter.admit(&p, None, &NONE, midnight_ist).await.is_ok());
}

#[tokio::test]
async fn the_previous_minute_weighs_by_how_much_of_it_still_overlaps() {
    for limiter in [Limiter::local(), Limiter::shared(shared_store().await.1)] {
        let p = principal(Some(10), None);
        assert_eq!(admitted(&limiter, &p, (0..10).map(|i| T0 + 50_000 + i)).await, 10);
        // 15 s into the next minute, 75 % of the last one's 10 still count: room for 2.
        assert_eq!(admitted(&limiter, &p, (0..5).map(|i| T0 + 75_000 + i)).await, 2);
        // 45 s in: 25 % of 10 → 3 carried, 2 already counted: room for 5 more.
        assert_eq!(admitted(&limiter, &p, (0..9).map(|i| T0 + 105_000 + i)).await, 5);
    }
}

#[tokio::test]
async fn two_instances_on_one_store_share_a_per_minute_limit() {
    let (_dir, store) = shared_store().await;
    let (a, b) = (Limiter::shared(store.clone()), Limiter::shared(store));
    let p = principal(Some(40), None);
    let mut served = 0;
    for i in 0..60 {
        let instance = if i % 3 == 0 { &a } else { &b };
        if instance.admit(&p, None, &NONE, T0 + 1_000 + i).await.is_ok() {
            served += 1;
        }
    }
    assert_eq!(served, 40, "never more than the limit, and nothing stranded while both keep asking");
    let refusal = a.admit(&p, None, &NONE, T0 + 2_000).await.unwrap_err();
    assert!(matches!(refusal, Refusal::PerMinute { limit: 40, retry_after_s: 58 }), "{refusal:?}");
    // Two minutes later the window is new on both.
    assert!(a.admit(&p, None, &NONE, T0 + 2 * MINUTE_MS).await.is_ok());
    assert!(b.admit(&p, None, &NONE, T0 + 2 * MINUTE_MS).await.is_ok());
}

#[tokio::test]
async fn two_instances_share_a_daily_limit_that_resets_at_local_midnight() {
    let (_dir, store) = shared_store().await;
    let (a, b) = (Limiter::shared(store.clone()), Limiter::shared(store));
    let p = principal(None, Some(5));
    let midnight_ist = UtcOffset::IST.day_start(T0) + DAY_MS;
    let before = midnight_ist - 10 * MINUTE_MS;
    let mut served = 0;
    for i in 0..8 {
        let instance = if i % 2 == 0 { &a } else { &b };
        if instance.admit(&p, None, &NONE, before + i * MINUTE_MS / 8).await.is_ok() {
            served += 1;
        }
    }
    assert_eq!(served, 5);
    let refusal = b.admit(&p, None, &NONE, midnight_ist - 1_000).await.unwrap_err();
    assert_eq!(refusal, Refusal::PerDay { limit: 5, retry_after_s: 1 });
    assert!(a.admit(&p, None, &NONE, midnight_ist).await.is_ok(), "a new day");
}

#[tokio::test]
async fn a_chunk_is_claimed_once_and_admits_without_the_database() {
    let (_dir, store) = shared_store().await;
    let limiter = Limiter::shared(store.clone());
    let p = principal(Some(1_000), None);
    let quota = limiter.admit(&p, None, &NONE, T0 + 1).await.unwrap();
    assert_eq!((quota.limit, quota.remaining, quota.reset_s), (1_000, 999, (T0 + MINUTE_MS) / 1000));
    // The first claim took a chunk of 100 (a tenth of the limit, at most 100): another
    // instance sees 100 gone from the window.
    let other = RateClaim {
        scope: "k:k:m".into(),
        window_start_ms: T0,
        previous_start_ms: None,
        carry_ppm: 0,
        limit: 1_000,
        want: 1_000,
    };
    assert_eq!(store.claim_rate(&other).await.unwrap().granted, 900);
    // The 99 left of the chunk are admitted from memory; the 100th request claims and finds
    // nothing left.
    assert_eq!(admitted(&limiter, &p, (0..100).map(|i| T0 + 2 + i)).await, 99);
}

#[tokio::test]
async fn concurrent_requests_on_two_instances_never_pass_the_limit() {
    let (_dir, store) = shared_store().await;
    let a = Arc::new(Limiter::shared(store.clone()));
    let b = Arc::new(Limiter::shared(store));
    let p = principal(Some(25), None);
    let tasks: Vec<_> = (0..80)
        .map(|i| {
            let limiter = Arc::clone(if i % 2 == 0 { &a } else { &b });
            let p = p.clone();
            tokio::spawn(async move { limiter.admit(&p, None, &NONE, T0 + 5_000).await.is_ok() })
        })
        .collect();
    let mut served = 0;
    for t in tasks {
        served += usize::from(t.await.unwrap());
    }
    assert_eq!(served, 25);
}

#[tokio::test]
async fn the_master_key_and_keys_without_limits_are_never_counted() {
    let (_dir, store) = shared_store().await;
    let limiter = Limiter::shared(store);
    let mut master = principal(None, None);
    master.key = Arc::new(KeyInfo::master());
    assert_eq!(limiter.admit(&master, None, &NONE, T0).await, Ok(Quota::default()));
    assert_eq!(limiter.admit(&principal(None, None), None, &NONE, T0).await, Ok(Quota::default()));
}

/// A request stamped just before a minute ends, whose claim is still in flight when a request of
/// the next minute arrives, is admitted (its grant is not thrown away with the old window), and
/// neither request resets what the other counted.
#[tokio::test]
async fn a_claim_in_flight_across_a_minute_boundary_is_not_lost() {
    let (_dir, store) = shared_store().await;
    let limiter = Limiter::shared(store);
    let p = principal(Some(100_000), None);
    let boundary = T0 + MINUTE_MS;
    let late = limiter.admit(&p, None, &NONE, boundary - 1);
    let next = limiter.admit(&p, None, &NONE, boundary + 1);
    futures::pin_mut!(late, next);
    // The first request claims allowance (a database round trip); the second, of the next
    // minute, finds none in its window and waits for the claim lock meanwhile.
    assert!(futures::poll!(late.as_mut()).is_pending());
    assert!(futures::poll!(next.as_mut()).is_pending());
    assert!(late.await.is_ok(), "the request whose claim was in flight");
    assert!(next.await.is_ok(), "the next minute's request");
    // Late stamps of either minute still find allowance.
    assert!(limiter.admit(&p, None, &NONE, boundary - 2).await.is_ok());
    assert!(limiter.admit(&p, None, &NONE, boundary + 2).await.is_ok());
}

/// In local mode, a request stamped before a window began (threads read the clock before they
/// count) counts in the current window; it neither resets the counts nor escapes them.
#[tokio::test]
async fn a_late_stamp_does_not_roll_a_local_window_back() {
    let limiter = Limiter::local();
    let p = principal(Some(3), None);
    let boundary = T0 + MINUTE_MS;
    assert!(limiter.admit(&p, None, &NONE, boundary + 1).await.is_ok());
    assert!(limiter.admit(&p, None, &NONE, boundary - 1).await.is_ok(), "a late stamp counts in the new minute");
    assert!(limiter.admit(&p, None, &NONE, boundary + 2).await.is_ok());
    assert!(limiter.admit(&p, None, &NONE, boundary + 3).await.is_err(), "three in the new minute: the late one counted");
}
