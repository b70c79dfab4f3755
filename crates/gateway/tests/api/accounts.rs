//! Accounts and money end to end: organisations, management and inference keys, isolation,
//! limits, guardrails, the ledger and concurrency against a small balance. Uses the built-in
//! `sandbox/echo` model (priced in USD) so that costs are deterministic; organisations bill in
//! INR at the configured `[fx]` rate, proving conversion.

use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::helpers::{decimal, spawn_app, spawn_app_with, Options, TestApp};

/// A reply read as JSON with its status and headers.
pub(crate) struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

pub(crate) async fn call(app: &TestApp, method: reqwest::Method, key: &str, path: &str, body: Option<&Value>) -> Answer {
    let mut request = app.client.request(method, app.url(path)).bearer_auth(key);
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.expect("send");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Answer { status, headers, body }
}

pub(crate) async fn post(app: &TestApp, key: &str, path: &str, body: &Value) -> Answer {
    call(app, reqwest::Method::POST, key, path, Some(body)).await
}

pub(crate) async fn get(app: &TestApp, key: &str, path: &str) -> Answer {
    call(app, reqwest::Method::GET, key, path, None).await
}

/// An organisation billed in `currency`, with its management key.
pub(crate) async fn new_org(app: &TestApp, currency: &str) -> (String, String) {
    let created = post(app, &app.master_key, "/admin/orgs", &json!({"name": "Acme", "currency": currency})).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.body["id"].as_str().expect("org id").to_owned();
    let key = created.body["management_key"].as_str().expect("management key").to_owned();
    (id, key)
}

pub(crate) async fn grant(app: &TestApp, org: &str, amount: &str) {
    let granted = post(app, &app.master_key, &format!("/admin/orgs/{org}/credits"), &json!({"amount": amount})).await;
    assert_eq!(granted.status, 201, "{}", granted.body);
}

pub(crate) async fn new_key(app: &TestApp, management: &str, body: Value) -> (String, String) {
    let created = post(app, management, "/v1/keys", &body).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let hash = created.body["data"]["hash"].as_str().expect("hash").to_owned();
    (created.body["key"].as_str().expect("key").to_owned(), hash)
}

pub(crate) fn chat(max_tokens: u32) -> Value {
    json!({"model": "sandbox/echo", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hello there"}]})
}

/// `/v1/credits` once the ledger has caught up with `expected_usage` (charges are committed
/// within `[billing] commit_interval_ms` of the answer; the journal made them durable before it).
pub(crate) async fn credits_after(app: &TestApp, key: &str, expected_usage: Decimal) -> Value {
    let mut credits = Value::Null;
    for _ in 0..100 {
        credits = get(app, key, "/v1/credits").await.body;
        if number(&credits["data"]["total_usage"]) == expected_usage {
            return credits;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the ledger never showed a total usage of {expected_usage}; last: {credits}");
}

pub(crate) fn number(v: &Value) -> Decimal {
    v.to_string().parse().unwrap_or_else(|_| panic!("not a decimal: {v}"))
}

#[tokio::test]
async fn an_org_with_no_credit_gets_402_and_a_grant_lets_it_pay_exactly() {
    let app = spawn_app().await;
    let (org, management) = new_org(&app, "INR").await;
    let (key, _) = new_key(&app, &management, json!({"name": "app"})).await;

    let refused = post(&app, &key, "/v1/chat/completions", &chat(16)).await;
    assert_eq!(refused.status, 402, "{}", refused.body);
    assert_eq!(refused.body["error"]["code"], "insufficient_credits");

    grant(&app, &org, "1.00").await;
    let served = post(&app, &key, "/v1/chat/completions", &chat(16)).await;
    assert_eq!(served.status, 200, "{}", served.body);
    let cost = number(&served.body["usage"]["cost"]);
    let usage = &served.body["usage"];
    // sandbox/echo: 0.10 in, 0.40 out USD per million tokens, billed in INR at 88.50.
    let tokens_usd = (Decimal::from(usage["prompt_tokens"].as_u64().unwrap_or(0)) * decimal("0.10")
        + Decimal::from(usage["completion_tokens"].as_u64().unwrap_or(0)) * decimal("0.40"))
        / Decimal::from(1_000_000);
    let expected = (tokens_usd * decimal("88.50") * Decimal::from(1_000_000_000)).ceil() / Decimal::from(1_000_000_000);
    assert_eq!(cost, expected.normalize());
    assert_eq!(served.headers["x-br-cost"].to_str().unwrap_or(""), cost.to_string());
    assert_eq!(served.headers["x-br-cost-currency"], "INR");

    let credits = credits_after(&app, &key, cost).await;
    assert_eq!(number(&credits["data"]["total_credits"]), decimal("1"));
    assert_eq!(number(&credits["data"]["balance"]), decimal("1") - cost);
}

#[tokio::test]
async fn management_and_inference_keys_stay_in_their_lanes() {
    let app = spawn_app().await;
    let (org, management) = new_org(&app, "USD").await;
    grant(&app, &org, "5").await;
    let (key, hash) = new_key(&app, &management, json!({"name": "app"})).await;
    assert!(key.starts_with("marga_sk_"));

    let as_manager = post(&app, &management, "/v1/chat/completions", &chat(8)).await;
    assert_eq!(as_manager.status, 403, "{}", as_manager.body);
    let as_inference = get(&app, &key, "/v1/keys").await;
    assert_eq!(as_inference.status, 403);
    let not_operator = post(&app, &management, "/admin/orgs", &json!({"name": "x", "currency": "USD"})).await;
    assert_eq!(not_operator.status, 403);

    let listed = get(&app, &management, "/v1/keys").await;
    let hashes: Vec<&str> = listed.body["data"].as_array().expect("list").iter().filter_map(|k| k["hash"].as_str()).collect();
    assert!(hashes.contains(&hash.as_str()));
    let me = get(&app, &key, "/v1/key").await;
    assert_eq!(me.body["data"]["hash"], hash.as_str());
    assert_eq!(me.body["data"]["is_management_key"], false);

    let duplicate = post(&app, &management, "/v1/keys", &json!({"name": "app"})).await;
    assert_eq!(duplicate.status, 400);
    assert_eq!(duplicate.body["error"]["code"], "duplicate_key_name");
}

#[tokio::test]
async fn another_orgs_objects_answer_404_and_change_nothing() {
    let app = spawn_app().await;
    let (_, manager_a) = new_org(&app, "USD").await;
    let (_, manager_b) = new_org(&app, "USD").await;
    let (_, hash_a) = new_key(&app, &manager_a, json!({"name": "a"})).await;
    let guardrail =
        post(&app, &manager_a, "/v1/guardrails", &json!({"name": "g", "blocked_models": ["sandbox/echo"]})).await;
    let guardrail_id = guardrail.body["data"]["id"].as_str().expect("guardrail id").to_owned();

    for (method, path, body) in [
        (reqwest::Method::GET, format!("/v1/keys/{hash_a}"), None),
        (reqwest::Method::PATCH, format!("/v1/keys/{hash_a}"), Some(json!({"disabled": true}))),
        (reqwest::Method::DELETE, format!("/v1/keys/{hash_a}"), None),
        (reqwest::Method::GET, format!("/v1/guardrails/{guardrail_id}"), None),
        (reqwest::Method::PATCH, format!("/v1/guardrails/{guardrail_id}"), Some(json!({"name": "stolen"}))),
        (reqwest::Method::DELETE, format!("/v1/guardrails/{guardrail_id}"), None),
        (reqwest::Method::POST, format!("/v1/guardrails/{guardrail_id}/keys"), Some(json!({"key_hashes": [hash_a]}))),
    ] {
        let answer = call(&app, method.clone(), &manager_b, &path, body.as_ref()).await;
        assert_eq!(answer.status, 404, "{method} {path}: {}", answer.body);
    }
    let still = get(&app, &manager_a, &format!("/v1/keys/{hash_a}")).await;
    assert_eq!(still.body["data"]["disabled"], false);
    let listed_b = get(&app, &manager_b, "/v1/keys").await;
    assert!(!listed_b.body.to_string().contains(&hash_a), "org B lists org A's key");
    let guardrail_a = get(&app, &manager_a, &format!("/v1/guardrails/{guardrail_id}")).await;
    assert_eq!(guardrail_a.body["data"]["name"], "g");
}

#[tokio::test]
async fn revoked_keys_stop_working_at_once() {
    let app = spawn_app().await;
    let (org, management) = new_org(&app, "USD").await;
    grant(&app, &org, "5").await;
    let (key, hash) = new_key(&app, &management, json!({"name": "app"})).await;
    assert_eq!(post(&app, &key, "/v1/chat/completions", &chat(8)).await.status, 200);
    let deleted = call(&app, reqwest::Method::DELETE, &management, &format!("/v1/keys/{hash}"), None).await;
    assert_eq!(deleted.body["deleted"], true);
    let after = post(&app, &key, "/v1/chat/completions", &chat(8)).await;
    assert_eq!(after.status, 401);
    assert!(!after.body.to_string().contains(&key), "the key is echoed");
}

#[tokio::test]
async fn per_minute_and_per_day_limits_answer_429_with_retry_after() {
    let app = spawn_app().await;
    let (org, management) = new_org(&app, "INR").await;
    grant(&app, &org, "5").await;
    let (minute_key, _) = new_key(&app, &management, json!({"name": "m", "rpm_limit": 2})).await;
    for _ in 0..2 {
        let ok = post(&app, &minute_key, "/v1/chat/completions", &chat(8)).await;
        assert_eq!(ok.status, 200);
        assert_eq!(ok.headers["x-ratelimit-limit"], "2");
    }
    let refused = post(&app, &minute_key, "/v1/chat/completions", &chat(8)).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.body["error"]["code"], "rate_limit_exceeded");
    assert!(refused.headers.contains_key("retry-after"));

    let (day_key, _) = new_key(&app, &management, json!({"name": "d", "daily_limit": 1})).await;
    assert_eq!(post(&app, &day_key, "/v1/chat/completions", &chat(8)).await.status, 200);
    let refused = post(&app, &day_key, "/v1/chat/completions", &chat(8)).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.body["error"]["code"], "daily_limit_reached");
}

/// `[limits] ip_rpm`: one client's requests count together, whatever key they carry; the
/// master key is not limited.
#[tokio::test]
async fn the_per_ip_limit_counts_every_key_of_one_client() {
    let options = Options { extra_toml: "\n[limits]\nip_rpm = 3\n".into(), ..Options::default() };
    let app = spawn_app_with(options).await;
    let (org, management) = new_org(&app, "USD").await;
    grant(&app, &org, "5").await;
    let (first, _) = new_key(&app, &management, json!({"name": "first"})).await;
    let (second, _) = new_key(&app, &management, json!({"name": "second"})).await;
    for key in [&first, &second, &first] {
        assert_eq!(post(&app, key, "/v1/chat/completions", &chat(8)).await.status, 200);
    }
    let refused = post(&app, &second, "/v1/chat/completions", &chat(8)).await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert_eq!(refused.body["error"]["code"], "rate_limit_exceeded");
    assert!(refused.headers.contains_key("retry-after"));
    assert_eq!(post(&app, &app.master_key, "/v1/chat/completions", &chat(8)).await.status, 200);
}

#[tokio::test]
async fn key_budgets_and_guardrails_are_enforced_at_admission() {
    let app = spawn_app().await;
    let (org, management) = new_org(&app, "USD").await;
    grant(&app, &org, "5").await;
    let (tight, _) = new_key(&app, &management, json!({"name": "tight", "limit": "0.000001"})).await;
    let over = post(&app, &tight, "/v1/chat/completions", &chat(64)).await;
    assert_eq!(over.status, 429, "{}", over.body);
    assert_eq!(over.body["error"]["code"], "budget_exceeded");

    let (guarded, hash) = new_key(&app, &management, json!({"name": "guarded"})).await;
    let blocked = post(&app, &management, "/v1/guardrails", &json!({"name": "no-echo", "blocked_models": ["sandbox/echo"]})).await;
    assert_eq!(blocked.status, 201, "{}", blocked.body);
    let id = blocked.body["data"]["id"].as_str().expect("id").to_owned();
    assert_eq!(post(&app, &guarded, "/v1/chat/completions", &chat(8)).await.status, 200, "not enforced before assignment");
    let assigned = post(&app, &management, &format!("/v1/guardrails/{id}/keys"), &json!({"key_hashes": [hash]})).await;
    assert_eq!(assigned.body["assigned_count"], 1);
    let refused = post(&app, &guarded, "/v1/chat/completions", &chat(8)).await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    let removed = post(&app, &management, &format!("/v1/guardrails/{id}/keys/remove"), &json!({"key_hashes": [hash]})).await;
    assert_eq!(removed.body["unassigned_count"], 1);
    assert_eq!(post(&app, &guarded, "/v1/chat/completions", &chat(8)).await.status, 200);
}

#[tokio::test]
async fn hundreds_of_concurrent_requests_never_overspend_a_small_balance() {
    let app = spawn_app().await;
    let (org, management) = new_org(&app, "INR").await;
    grant(&app, &org, "0.02").await;
    let (key, _) = new_key(&app, &management, json!({"name": "burst", "rpm_limit": 100_000})).await;
    let body = chat(16);
    let requests = (0..200).map(|_| post(&app, &key, "/v1/chat/completions", &body));
    let answers = futures::future::join_all(requests).await;
    let served: Vec<&Answer> = answers.iter().filter(|a| a.status == 200).collect();
    let refused = answers.iter().filter(|a| a.status == 402).count();
    assert_eq!(served.len() + refused, 200, "only 200 or 402 expected");
    assert!(!served.is_empty() && refused > 0, "the balance covers some but not all: {} served", served.len());
    let reported: Decimal = served.iter().map(|a| number(&a.body["usage"]["cost"])).sum();
    let credits = credits_after(&app, &management, reported).await;
    let balance = number(&credits["data"]["balance"]);
    assert!(balance >= Decimal::ZERO, "balance went negative: {balance}");
    assert_eq!(balance, decimal("0.02") - reported, "ledger = sum of charges reported to clients");
}

/// A burst arriving before the instance holds any lease opens one lease, and every request
/// reserves from it: none is refused while the balance covers them all. (Each opening a lease
/// of its own from the same look at the balance used to lease it all away, and those that
/// looked again before the winners' leases were in memory got 402: 2–15 % of such a burst on
/// Postgres.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_with_plenty_of_credit_is_never_refused() {
    let app = spawn_app().await;
    let (org, management) = new_org(&app, "INR").await;
    grant(&app, &org, "10").await;
    let (key, _) = new_key(&app, &management, json!({"name": "burst", "rpm_limit": 100_000})).await;
    let body = chat(16);
    let answers = futures::future::join_all((0..200).map(|_| post(&app, &key, "/v1/chat/completions", &body))).await;
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).filter(|s| *s != 200).collect();
    assert!(statuses.is_empty(), "refused with plenty of credit: {statuses:?}");
}

#[tokio::test]
async fn keys_are_never_stored_in_plaintext() {
    let app = spawn_app_with(Options::default()).await;
    let (org, management) = new_org(&app, "USD").await;
    grant(&app, &org, "1").await;
    let (key, hash) = new_key(&app, &management, json!({"name": "secret"})).await;
    let served = post(&app, &key, "/v1/chat/completions", &chat(8)).await;
    assert_eq!(served.status, 200);
    let generation = served.body["id"].as_str().expect("generation id");
    app.record(generation).await;
    // What is searched holds what was written (SQLite files, or the Postgres rows): the key's
    // hash is there, the key is not.
    assert!(!app.stored_in_plaintext(&hash).await.is_empty(), "the key's hash is not in the store searched");
    for secret in [&key, &management, &app.master_key] {
        let found = app.stored_in_plaintext(secret).await;
        assert!(found.is_empty(), "a key is stored in plaintext: {found:?}");
    }
}

#[tokio::test]
async fn account_views_of_other_routers_work() {
    let app = spawn_app().await;
    let (org, management) = new_org(&app, "INR").await;
    grant(&app, &org, "2.5").await;
    let account = get(&app, &management, "/v1/auth/account").await;
    assert_eq!(number(&account.body["credit_balance"]), decimal("2.5"));
    assert_eq!(account.body["currency"], "INR");
    let created = post(&app, &management, "/me/keys", &json!({"name": "br", "budget_inr": "50", "expires_days": 30})).await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert!(created.body["key"].as_str().is_some_and(|k| k.starts_with("marga_sk_")));
    assert_eq!(number(&created.body["budget_inr"]), decimal("50"));
    let listed = get(&app, &management, "/me/keys").await;
    assert_eq!(listed.body["data"].as_array().map(Vec::len), Some(2), "management key + the new one");
}

#[tokio::test]
async fn a_workspace_budget_caps_its_keys_and_other_orgs_cannot_touch_it() {
    let app = spawn_app().await;
    let (org, management) = new_org(&app, "USD").await;
    let (_, other_manager) = new_org(&app, "USD").await;
    grant(&app, &org, "5").await;
    let created = post(&app, &management, "/me/workspaces", &json!({"name": "team", "monthly_budget": "0.000001"})).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let ws = created.body["data"]["id"].as_str().expect("workspace id").to_owned();
    let (in_ws, _) = new_key(&app, &management, json!({"name": "ws-key", "workspace_id": ws})).await;
    let (outside, _) = new_key(&app, &management, json!({"name": "free-key"})).await;
    let refused = post(&app, &in_ws, "/v1/chat/completions", &chat(64)).await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert_eq!(refused.body["error"]["code"], "budget_exceeded");
    assert_eq!(post(&app, &outside, "/v1/chat/completions", &chat(64)).await.status, 200);

    let stolen = call(&app, reqwest::Method::PATCH, &other_manager, &format!("/me/workspaces/{ws}"), Some(&json!({"monthly_budget": null}))).await;
    assert_eq!(stolen.status, 404);
    let removed = call(&app, reqwest::Method::DELETE, &other_manager, &format!("/me/workspaces/{ws}"), None).await;
    assert_eq!(removed.status, 404);
    let foreign_key = post(&app, &other_manager, "/v1/keys", &json!({"name": "x", "workspace_id": ws})).await;
    assert_eq!(foreign_key.status, 400, "a key cannot join another org's workspace");

    let raised = call(&app, reqwest::Method::PATCH, &management, &format!("/me/workspaces/{ws}"), Some(&json!({"monthly_budget": "10"}))).await;
    assert_eq!(raised.status, 200, "{}", raised.body);
    assert_eq!(post(&app, &in_ws, "/v1/chat/completions", &chat(64)).await.status, 200);
}

/// Settled charges are durable in the journal at once and reach the database together: after
/// `[billing] commit_interval_ms`, or as soon as a full batch (512) waits; stopping commits what
/// waits without sitting out the interval.
#[tokio::test]
async fn charges_reach_the_database_after_the_commit_interval_or_a_full_batch() {
    use futures::StreamExt;
    let options = Options { extra_toml: "\n[billing]\ncommit_interval_ms = 10000\n".into(), ..Options::default() };
    let app = spawn_app_with(options).await;
    let (org, management) = new_org(&app, "USD").await;
    grant(&app, &org, "100").await;
    let (key, _) = new_key(&app, &management, json!({"name": "many", "rpm_limit": 100000})).await;
    let cost_of = |answer: &Answer| {
        assert_eq!(answer.status, 200, "{}", answer.body);
        number(&answer.body["usage"]["cost"])
    };

    let mut spent = cost_of(&post(&app, &key, "/v1/chat/completions", &chat(16)).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let credits = get(&app, &key, "/v1/credits").await.body;
    assert_eq!(number(&credits["data"]["total_usage"]), Decimal::ZERO, "one charge waits for company: {credits}");

    // The writer holds the first charge; the 512th queued behind it makes a full batch, which
    // ends the wait (fewer would wait out the interval, as the last one below does).
    let body = chat(16);
    let answers: Vec<Answer> = futures::stream::iter(0..512)
        .map(|_| post(&app, &key, "/v1/chat/completions", &body))
        .buffer_unordered(32)
        .collect()
        .await;
    spent += answers.iter().map(cost_of).sum::<Decimal>();
    credits_after(&app, &key, spent).await;

    let waiting = cost_of(&post(&app, &key, "/v1/chat/completions", &chat(16)).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let credits = get(&app, &key, "/v1/credits").await.body;
    assert_eq!(number(&credits["data"]["total_usage"]), spent, "after the batch, a charge waits again: {credits}");
    spent += waiting;
    let started = std::time::Instant::now();
    let app = app.restart().await;
    assert!(started.elapsed() < Duration::from_secs(3), "stopping took {:?}", started.elapsed());
    let credits = get(&app, &key, "/v1/credits").await.body;
    assert_eq!(number(&credits["data"]["total_usage"]), spent, "{credits}");
}
