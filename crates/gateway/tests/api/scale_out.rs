//! Several gateway instances on one Postgres database ([`spawn_cluster`]): keys and their
//! revocation reach every instance through the key cache (polled every 250 ms), credit leases
//! keep hundreds of concurrent requests spread over the instances within a small balance,
//! per-minute and per-day limits hold across instances, and role changes, member removals and
//! member guardrails spread within a second. Postgres only: without it each test notes that it was
//! skipped and returns (CI runs the suite on Postgres, see the Makefile).

use std::future::Future;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use serde_json::json;

use crate::accounts::{chat, get, grant, new_key, new_org, number, post, Answer};
use crate::helpers::{decimal, note_skipped, postgres_enabled, spawn_cluster, TestApp};

/// What "within a second" means for a change to reach the other instances.
const SPREAD: Duration = Duration::from_secs(1);

/// Polls `check` every 20 ms until it holds; how long that took from `since`, or `None` after
/// `give_up` (well past [`SPREAD`], so that a slow spread is reported with its time).
async fn until<F, Fut>(since: Instant, give_up: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    loop {
        if check().await {
            return Some(since.elapsed());
        }
        if since.elapsed() > give_up {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `key` authenticates on every instance (`GET /v1/key`, which counts against no
/// limit); returns how long that took on each.
async fn known_everywhere(apps: &[TestApp], key: &str, since: Instant) -> Vec<Option<Duration>> {
    let waits = apps.iter().map(|app| until(since, 5 * SPREAD, move || async move { get(app, key, "/v1/key").await.status == 200 }));
    futures::future::join_all(waits).await
}

/// Whether a chat request with `key` answers `status`.
async fn answers(app: &TestApp, key: &str, status: u16) -> bool {
    post(app, key, "/v1/chat/completions", &chat(8)).await.status == status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_made_on_one_instance_works_on_the_others_and_its_revocation_spreads() {
    if !postgres_enabled() {
        note_skipped("scale_out::a_key_made_on_one_instance_works_on_the_others_and_its_revocation_spreads");
        return;
    }
    let apps = spawn_cluster(3).await;
    let (org, management) = new_org(&apps[0], "INR").await;
    grant(&apps[0], &org, "1").await;
    let (key, hash) = new_key(&apps[0], &management, json!({"name": "shared"})).await;
    let created = Instant::now();
    let key = key.as_str();
    let waits = apps.iter().map(|app| until(created, 5 * SPREAD, move || answers(app, key, 200)));
    let took = futures::future::join_all(waits).await;
    for (i, took) in took.iter().enumerate() {
        assert!(took.is_some_and(|t| t <= SPREAD), "instance {} served the new key after {took:?}", i + 1);
    }
    // The management key made on instance 1 manages from the others too.
    for app in &apps[1..] {
        let credits = get(app, &management, "/v1/credits").await;
        assert_eq!(credits.status, 200, "{}", credits.body);
    }

    let deleted = crate::accounts::call(&apps[0], reqwest::Method::DELETE, &management, &format!("/v1/keys/{hash}"), None).await;
    assert_eq!(deleted.body["deleted"], true, "{}", deleted.body);
    let revoked = Instant::now();
    assert!(answers(&apps[0], key, 401).await, "at once where revoked");
    let waits = apps[1..].iter().map(|app| until(revoked, 5 * SPREAD, move || answers(app, key, 401)));
    let took = futures::future::join_all(waits).await;
    for (i, took) in took.iter().enumerate() {
        assert!(took.is_some_and(|t| t <= SPREAD), "instance {} refused the revoked key after {took:?}", i + 2);
    }
}

/// `total_usage` of `GET /v1/credits`.
async fn total_usage(app: &TestApp, management: &str) -> Decimal {
    number(&get(app, management, "/v1/credits").await.body["data"]["total_usage"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_concurrent_requests_over_three_instances_never_overspend() {
    if !postgres_enabled() {
        note_skipped("scale_out::hundreds_of_concurrent_requests_over_three_instances_never_overspend");
        return;
    }
    let apps = spawn_cluster(3).await;
    let (org, management) = new_org(&apps[0], "INR").await;
    let granted = decimal("0.02");
    grant(&apps[0], &org, "0.02").await;
    let (key, _) = new_key(&apps[0], &management, json!({"name": "burst", "rpm_limit": 100_000})).await;
    let known = known_everywhere(&apps, &key, Instant::now()).await;
    assert!(known.iter().all(Option::is_some), "the key did not reach every instance: {known:?}");

    let body = chat(16);
    let requests = (0..300).map(|i| {
        let app = &apps[i % apps.len()];
        let (key, body) = (&key, &body);
        async move { (i % 3, post(app, key, "/v1/chat/completions", body).await) }
    });
    let answers: Vec<(usize, Answer)> = futures::future::join_all(requests).await;
    let statuses: Vec<u16> = answers.iter().map(|(_, a)| a.status).collect();
    let served: Vec<&Answer> = answers.iter().map(|(_, a)| a).filter(|a| a.status == 200).collect();
    let refused = statuses.iter().filter(|s| **s == 402).count();
    assert_eq!(served.len() + refused, 300, "only 200 or 402 expected: {statuses:?}");
    assert!(!served.is_empty() && refused > 0, "the balance covers some but not all: {} served", served.len());
    for instance in 0..apps.len() {
        let n = answers.iter().filter(|(i, a)| *i == instance && a.status == 200).count();
        assert!(n > 0, "instance {} served nothing", instance + 1);
    }
    let reported: Decimal = served.iter().map(|a| number(&a.body["usage"]["cost"])).sum();

    // Each charge is durable (in its instance's journal) before its response and reaches the
    // database in the next batch commit: wait for the ledger to settle, then every instance
    // reads the same.
    let settled = until(Instant::now(), 5 * SPREAD, || async { total_usage(&apps[0], &management).await == reported }).await;
    assert!(settled.is_some(), "total usage {} ≠ {reported} reported to clients", total_usage(&apps[0], &management).await);
    for app in &apps {
        let credits = get(app, &management, "/v1/credits").await;
        let balance = number(&credits.body["data"]["balance"]);
        assert!(balance >= Decimal::ZERO, "balance went negative: {balance}");
        assert_eq!(number(&credits.body["data"]["total_usage"]), reported, "ledger = sum of charges reported to clients");
        assert_eq!(balance, granted - reported);
    }
}

/// Waits until at least `margin` of the current minute is left, so that a burst stays in one
/// window (the sliding estimate keeps a boundary harmless, but exact counts are clearer).
async fn away_from_a_minute_boundary(margin: Duration) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let into = Duration::from_millis((now.as_millis() % 60_000) as u64);
    if Duration::from_secs(60) - into < margin {
        tokio::time::sleep(Duration::from_secs(60) - into + Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_minute_limit_holds_across_instances() {
    if !postgres_enabled() {
        note_skipped("scale_out::a_per_minute_limit_holds_across_instances");
        return;
    }
    let apps = spawn_cluster(3).await;
    let (org, management) = new_org(&apps[0], "INR").await;
    grant(&apps[0], &org, "5").await;
    const LIMIT: usize = 30;
    let (key, _) = new_key(&apps[0], &management, json!({"name": "paced", "rpm_limit": LIMIT})).await;
    let known = known_everywhere(&apps, &key, Instant::now()).await;
    assert!(known.iter().all(Option::is_some), "the key did not reach every instance: {known:?}");
    away_from_a_minute_boundary(Duration::from_secs(15)).await;

    // 3 × the limit, spread evenly and concurrently over the instances. Documented tolerance
    // (docs/accounts.md): never more than the limit across instances; fewer only by allowance
    // an instance claimed and never used — each instance here keeps asking, so none is left.
    let body = chat(8);
    let requests = (0..3 * LIMIT).map(|i| {
        let app = &apps[i % apps.len()];
        let (key, body) = (&key, &body);
        async move { (i % 3, post(app, key, "/v1/chat/completions", body).await) }
    });
    let answers: Vec<(usize, Answer)> = futures::future::join_all(requests).await;
    let served = answers.iter().filter(|(_, a)| a.status == 200).count();
    let limited: Vec<&Answer> = answers.iter().map(|(_, a)| a).filter(|a| a.status == 429).collect();
    assert_eq!(served + limited.len(), 3 * LIMIT, "only 200 or 429 expected");
    assert_eq!(served, LIMIT, "a key with rpm_limit={LIMIT} on 3 instances");
    for instance in 0..apps.len() {
        assert!(answers.iter().any(|(i, a)| *i == instance && a.status == 200), "instance {} served nothing", instance + 1);
    }
    for refused in limited {
        assert_eq!(refused.body["error"]["code"], "rate_limit_exceeded");
        assert!(refused.headers.contains_key("retry-after"));
    }
    // Every instance now refuses.
    for app in &apps {
        assert_eq!(post(app, &key, "/v1/chat/completions", &body).await.status, 429);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_limit_holds_across_instances() {
    if !postgres_enabled() {
        note_skipped("scale_out::a_daily_limit_holds_across_instances");
        return;
    }
    let apps = spawn_cluster(2).await;
    let (org, management) = new_org(&apps[0], "USD").await;
    grant(&apps[0], &org, "5").await;
    let (key, _) = new_key(&apps[0], &management, json!({"name": "daily", "daily_limit": 7})).await;
    let known = known_everywhere(&apps, &key, Instant::now()).await;
    assert!(known.iter().all(Option::is_some));
    let mut statuses = Vec::new();
    for i in 0..12 {
        statuses.push(post(&apps[i % 2], &key, "/v1/chat/completions", &chat(8)).await.status);
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 7, "{statuses:?}");
    assert!(statuses[7..].iter().all(|s| *s == 429), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_changes_member_removals_and_member_guardrails_reach_every_instance_within_a_second() {
    if !postgres_enabled() {
        note_skipped("scale_out::role_changes_member_removals_and_member_guardrails_reach_every_instance_within_a_second");
        return;
    }
    let apps = spawn_cluster(3).await;
    let (org, owner) = new_org(&apps[0], "USD").await;
    grant(&apps[0], &org, "5").await;
    let added = post(&apps[0], &owner, "/me/members", &json!({"email": "dev@example.com", "role": "member"})).await;
    assert_eq!(added.status, 201, "{}", added.body);
    let member_id = added.body["data"]["user_id"].as_str().expect("id").to_owned();
    let member_key = added.body["management_key"].as_str().expect("key").to_owned();
    let (app_key, _) = new_key(&apps[0], &owner, json!({"name": "dev app", "creator_user_id": member_id})).await;
    assert!(known_everywhere(&apps, &member_key, Instant::now()).await.iter().all(Option::is_some));
    assert!(known_everywhere(&apps, &app_key, Instant::now()).await.iter().all(Option::is_some));

    // A role change made on instance 1 lets the member create keys on the others.
    let promoted = crate::accounts::call(&apps[0], reqwest::Method::PATCH, &owner, &format!("/me/members/{member_id}"), Some(&json!({"role": "admin"}))).await;
    assert_eq!(promoted.status, 200, "{}", promoted.body);
    let since = Instant::now();
    let waits = apps[1..].iter().enumerate().map(|(i, app)| {
        let key = member_key.as_str();
        until(since, 5 * SPREAD, move || async move {
            let name = format!("k{i}-{}", uuid::Uuid::new_v4().simple());
            post(app, key, "/v1/keys", &json!({ "name": name })).await.status == 201
        })
    });
    let took = futures::future::join_all(waits).await;
    assert!(took.iter().all(|t| t.is_some_and(|t| t <= SPREAD)), "the role spread after {took:?}");

    // A guardrail assigned to the member on instance 1 refuses the member's key everywhere.
    let g = post(&apps[0], &owner, "/v1/guardrails", &json!({"name": "no-echo", "blocked_models": ["sandbox/echo"]})).await;
    let g = g.body["data"]["id"].as_str().expect("id").to_owned();
    let assigned = post(&apps[0], &owner, &format!("/v1/guardrails/{g}/members"), &json!({"member_user_ids": [member_id]})).await;
    assert_eq!(assigned.body["assigned_count"], 1);
    let since = Instant::now();
    let key = app_key.as_str();
    let waits = apps.iter().map(|app| until(since, 5 * SPREAD, move || answers(app, key, 403)));
    let took = futures::future::join_all(waits).await;
    assert!(took.iter().all(|t| t.is_some_and(|t| t <= SPREAD)), "the guardrail spread after {took:?}");

    // Removing the member on instance 1 revokes their management key everywhere.
    let removed = crate::accounts::call(&apps[0], reqwest::Method::DELETE, &owner, &format!("/me/members/{member_id}"), None).await;
    assert_eq!(removed.status, 200);
    let since = Instant::now();
    let key = member_key.as_str();
    let waits = apps.iter().map(|app| until(since, 5 * SPREAD, move || async move { get(app, key, "/me/members").await.status == 401 }));
    let took = futures::future::join_all(waits).await;
    assert!(took.iter().all(|t| t.is_some_and(|t| t <= SPREAD)), "the removal spread after {took:?}");
}
