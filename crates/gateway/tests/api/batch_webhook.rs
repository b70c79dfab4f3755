//! Delivery webhooks end to end: a local receiver that fails twice then accepts gets the
//! batch's terminal event three times, each signed with the hex HMAC-SHA256 of the raw body;
//! the organisation's default webhook is used when a batch has none; and unsafe targets
//! (plain http, loopback, private, link-local) are refused unless the operator allows them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::accounts::{call, grant, new_key, new_org, Answer};
use crate::helpers::{spawn_app, spawn_app_with, Options, TestApp};

/// Deliveries received: (signature header, raw body).
pub(crate) type Received = Arc<Mutex<Vec<(String, String)>>>;

/// A receiver on a local port that answers 500 to the first `failures` deliveries.
pub(crate) async fn receiver(failures: usize) -> (String, Received) {
    let received: Received = Arc::default();
    let seen = Arc::clone(&received);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let seen = Arc::clone(&seen);
            async move {
                let signature = headers.get("x-batchrouter-signature").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                let mut all = seen.lock().unwrap();
                all.push((signature, body));
                if all.len() <= failures { StatusCode::INTERNAL_SERVER_ERROR } else { StatusCode::OK }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

pub(crate) fn hmac_hex(secret: &str, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

pub(crate) async fn create(app: &TestApp, key: &str, idempotency: &str, body: &Value) -> Answer {
    let response = app.client.post(app.url("/v1/batches")).bearer_auth(key).header("Idempotency-Key", idempotency).json(body).send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    Answer { status, headers, body: response.json().await.unwrap() }
}

pub(crate) fn items(n: usize) -> Value {
    let items: Vec<Value> = (0..n)
        .map(|i| json!({"customer_item_id": format!("w{i}"), "operation": "responses", "model": "sandbox/echo", "input": {"input": "hi"}}))
        .collect();
    json!(items)
}

pub(crate) async fn wait_deliveries(received: &Received, n: usize) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = received.lock().unwrap().clone();
        if got.len() >= n {
            return got;
        }
        assert!(Instant::now() < deadline, "only {} deliveries", got.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) fn allowing() -> Options {
    let extra_toml = "[security]\nallow_private_webhook_targets = true\n\n[batch]\nwebhook_retry_base_ms = 50\n".to_owned();
    Options { extra_toml, ..Options::default() }
}

#[tokio::test]
async fn terminal_events_are_signed_and_retried_until_accepted() {
    let app = spawn_app_with(allowing()).await;
    let (org, management) = new_org(&app, "USD").await;
    grant(&app, &org, "1").await;
    let (key, _) = new_key(&app, &management, json!({"name": "hooks"})).await;
    let (url, received) = receiver(2).await;
    let secret = "whsec-0123456789";
    let created = create(&app, &key, "hooked-batch-1", &json!({"items": items(3), "webhook": {"url": url, "secret": secret}})).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.body["batch"]["id"].as_str().unwrap().to_owned();
    let deliveries = wait_deliveries(&received, 3).await;
    for (signature, body) in &deliveries {
        assert_eq!(signature, &hmac_hex(secret, body), "signed with the batch's secret");
    }
    assert_eq!(deliveries[0].1, deliveries[2].1, "the same event, retried");
    let event: Value = serde_json::from_str(&deliveries[2].1).unwrap();
    assert_eq!((event["type"].as_str(), event["data"]["batch_id"].as_str()), (Some("batch.completed"), Some(id.as_str())));
    assert_eq!((event["data"]["items_total"].as_u64(), event["data"]["items_completed"].as_u64()), (Some(3), Some(3)));
    assert!(event["id"].as_str().unwrap().starts_with("evt_"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(received.lock().unwrap().len(), 3, "no delivery after the receiver accepted");

    // The organisation's default webhook serves batches created without one.
    let (default_url, default_received) = receiver(0).await;
    let put = call(&app, reqwest::Method::PUT, &management, "/v1/auth/account/delivery-webhook", Some(&json!({"url": default_url, "secret": "org-default-secret"}))).await;
    assert_eq!(put.status, 200, "{}", put.body);
    let refused = call(&app, reqwest::Method::PUT, &key, "/v1/auth/account/delivery-webhook", Some(&json!({"url": default_url, "secret": "org-default-secret"}))).await;
    assert_eq!(refused.status, 403, "inference keys cannot set it");
    let second = create(&app, &key, "hooked-batch-2", &json!({"items": items(1)})).await;
    let second_id = second.body["batch"]["id"].as_str().unwrap().to_owned();
    let got = wait_deliveries(&default_received, 1).await;
    let event: Value = serde_json::from_str(&got[0].1).unwrap();
    assert_eq!(event["data"]["batch_id"], second_id.as_str());
    assert_eq!(got[0].0, hmac_hex("org-default-secret", &got[0].1));
}

#[tokio::test]
async fn unsafe_webhook_targets_are_refused() {
    let app = spawn_app().await;
    let (org, management) = new_org(&app, "USD").await;
    grant(&app, &org, "1").await;
    let (key, _) = new_key(&app, &management, json!({"name": "hooks"})).await;
    let targets = [
        "http://8.8.8.8/hook",
        "https://127.0.0.1/hook",
        "https://localhost:8443/hook",
        "https://10.0.0.7/hook",
        "https://192.168.1.1/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/hook",
        "https://[fd00::1]/hook",
    ];
    for (i, url) in targets.iter().enumerate() {
        let body = json!({"items": items(1), "webhook": {"url": url, "secret": "long-enough-secret"}});
        let refused = create(&app, &key, &format!("ssrf-check-{i:04}"), &body).await;
        assert_eq!(refused.status, 400, "{url}: {}", refused.body);
        assert_eq!(refused.body["error"]["details"]["preflight"][0]["code"], "unsafe_webhook_url", "{url}");
        let put = call(&app, reqwest::Method::PUT, &management, "/v1/auth/account/delivery-webhook", Some(&json!({"url": url, "secret": "long-enough-secret"}))).await;
        assert_eq!(put.status, 400, "{url}");
    }
    let short = create(&app, &key, "ssrf-check-short", &json!({"items": items(1), "webhook": {"url": "https://8.8.8.8/h", "secret": "short"}})).await;
    assert_eq!(short.status, 400);
    let listed = call(&app, reqwest::Method::GET, &key, "/v1/batches", None).await;
    assert_eq!(listed.body["data"], json!([]), "nothing was created");
}

#[tokio::test]
async fn progress_events_come_at_most_every_interval_while_items_finish() {
    let extra_toml = "[security]\nallow_private_webhook_targets = true\n\n[batch]\nconcurrency = 1\nwebhook_progress_ms = 300\n".to_owned();
    let app = spawn_app_with(Options { extra_toml, ..Options::default() }).await;
    let (org, management) = new_org(&app, "USD").await;
    grant(&app, &org, "1").await;
    let (key, _) = new_key(&app, &management, json!({"name": "hooks"})).await;
    app.mock.set_scenario(mock_upstream::Scenario { delay_ms: 60, ..mock_upstream::Scenario::default() });
    let (url, received) = receiver(0).await;
    let items: Vec<Value> = (0..10)
        .map(|i| json!({"customer_item_id": format!("p{i}"), "model": "test/openai-chat", "input": {"input": "slow"}}))
        .collect();
    let created = create(&app, &key, "progress-batch-1", &json!({"items": items, "webhook": {"url": url, "secret": "progress-secret"}})).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let started = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(20);
    let events = loop {
        let got: Vec<Value> = received.lock().unwrap().iter().map(|(_, body)| serde_json::from_str(body).unwrap()).collect();
        if got.iter().any(|e| e["type"] == "batch.completed") {
            break got;
        }
        assert!(Instant::now() < deadline, "no completion event: {got:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let progress: Vec<&Value> = events.iter().filter(|e| e["type"] == "batch.progress").collect();
    assert!(!progress.is_empty(), "{events:?}");
    let done: Vec<u64> = progress.iter().map(|e| e["data"]["items_completed"].as_u64().unwrap()).collect();
    assert!(done.windows(2).all(|w| w[0] < w[1]) && done.iter().all(|d| (1..10).contains(d)), "{done:?}");
    assert!(progress.iter().all(|e| e["data"]["status"] == "in_progress"));
    let most = started.elapsed().as_millis() as usize / 300 + 1;
    assert!(progress.len() <= most, "at most one per 300 ms: {} events in {:?}", progress.len(), started.elapsed());
    assert_eq!(events.last().unwrap()["type"], "batch.completed");
}

#[tokio::test]
async fn a_pending_retry_survives_a_restart() {
    let extra_toml = "[security]\nallow_private_webhook_targets = true\n\n[batch]\nwebhook_retry_base_ms = 1500\n".to_owned();
    let app = spawn_app_with(Options { extra_toml, ..Options::default() }).await;
    let (org, management) = new_org(&app, "USD").await;
    grant(&app, &org, "1").await;
    let (key, _) = new_key(&app, &management, json!({"name": "hooks"})).await;
    let (url, received) = receiver(1).await;
    let created = create(&app, &key, "restart-hook-1", &json!({"items": items(1), "webhook": {"url": url, "secret": "restart-secret"}})).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let first = wait_deliveries(&received, 1).await;
    // The first delivery failed; the retry is due in 1.5 s. Restart meanwhile.
    let app = app.restart().await;
    let both = wait_deliveries(&received, 2).await;
    assert_eq!(both[1].1, first[0].1, "the same event after the restart");
    assert_eq!(both[1].0, hmac_hex("restart-secret", &both[1].1));
    let event: Value = serde_json::from_str(&both[1].1).unwrap();
    let id = event["id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let delivery = app.store.get_delivery(id).await.unwrap().unwrap();
        if delivery.state == "delivered" {
            assert_eq!(delivery.attempts, 2);
            break;
        }
        assert!(Instant::now() < deadline, "{delivery:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
