//! BatchRouter's native batches end to end: the required `Idempotency-Key` (replay, 409 on a
//! different payload, 400 without it), preflight errors in `error.details.preflight`, inline
//! items and file items run by the worker, stable cursor paging of results, the billing
//! receipt, and signed artifact URLs (valid, tampered, expired), all tenant-isolated. The
//! stored request hash is keyed, and a plain one stored by an earlier version still replays.

use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::accounts::{get, grant, new_key, new_org, Answer};
use crate::batch::{upload, wait_for_charges};
use crate::helpers::{spawn_app, TestApp};

async fn create(app: &TestApp, key: &str, idempotency: Option<&str>, body: &Value) -> Answer {
    let mut request = app.client.post(app.url("/v1/batches")).bearer_auth(key).json(body);
    if let Some(k) = idempotency {
        request = request.header("Idempotency-Key", k);
    }
    let response = request.send().await.expect("send");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    Answer { status, headers, body: response.json().await.expect("JSON") }
}

fn item(id: &str, text: &str) -> Value {
    json!({"customer_item_id": id, "operation": "responses", "model": "sandbox/echo", "input": {"messages": [{"role": "user", "content": text}], "max_tokens": 16}})
}

async fn funded(app: &TestApp) -> (String, String) {
    let (org, management) = new_org(app, "USD").await;
    grant(app, &org, "1").await;
    let (key, _) = new_key(app, &management, json!({"name": "native"})).await;
    (org, key)
}

async fn wait_completed(app: &TestApp, key: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let batch = get(app, key, &format!("/v1/batches/{id}")).await.body;
        if batch["status"] == "completed" {
            return batch;
        }
        assert!(Instant::now() < deadline, "not completed: {batch}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn idempotency_key_is_required_replays_and_refuses_a_different_payload() {
    let app = spawn_app().await;
    let (_, key) = funded(&app).await;
    let body = json!({"items": [item("a", "one"), item("b", "two")]});
    let missing = create(&app, &key, None, &body).await;
    assert_eq!((missing.status, missing.body["error"]["code"].as_str()), (400, Some("idempotency_key_required")));
    assert_eq!(create(&app, &key, Some("short"), &body).await.status, 400, "shorter than 8");
    let first = create(&app, &key, Some("order-2026-0001"), &body).await;
    assert_eq!(first.status, 201, "{}", first.body);
    let id = first.body["batch"]["id"].as_str().unwrap().to_owned();
    assert_eq!(first.body["batch"]["item_count"], 2);
    let replay = create(&app, &key, Some("order-2026-0001"), &body).await;
    assert_eq!((replay.status, replay.body["batch"]["id"].as_str()), (200, Some(id.as_str())), "the same batch");
    let changed = create(&app, &key, Some("order-2026-0001"), &json!({"items": [item("a", "other")]})).await;
    assert_eq!((changed.status, changed.body["error"]["code"].as_str()), (409, Some("idempotency_key_reused")));
    // Keys are per organisation: another org's same key is a new batch of its own.
    let (_, other) = funded(&app).await;
    let theirs = create(&app, &other, Some("order-2026-0001"), &body).await;
    assert_eq!(theirs.status, 201);
    assert_ne!(theirs.body["batch"]["id"], first.body["batch"]["id"]);
    assert_eq!(get(&app, &key, "/v1/batches").await.body["data"].as_array().unwrap().len(), 1);
}

/// The plain SHA-256 of a create's body, as batches stored it before request hashes were keyed.
fn plain_hash(body: &Value) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(body.to_string().as_bytes()))
}

#[tokio::test]
async fn the_request_hash_is_keyed_and_a_plain_hash_stored_earlier_still_replays() {
    let app = spawn_app().await;
    let (org, key) = funded(&app).await;
    let body = json!({"items": [item("a", "one")]});
    let first = create(&app, &key, Some("keyed-hash-0001"), &body).await;
    assert_eq!(first.status, 201, "{}", first.body);
    let stored = app.store.get_batch(&org, first.body["batch"]["id"].as_str().unwrap()).await.unwrap().unwrap();
    let hash = stored.request_hash.unwrap_or_default();
    assert!(hash.len() == 64 && hash != plain_hash(&body), "{hash}: not the plain SHA-256 of the body");
    // A batch stored by an earlier version, with the body's plain SHA-256: it still replays.
    let earlier = json!({"items": [item("b", "two")]});
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let legacy = marga_store::BatchRecord {
        id: format!("batch_{}", uuid::Uuid::now_v7().simple()),
        org_id: org.clone(),
        key_id: "earlier".to_owned(),
        endpoint: "native".to_owned(),
        completion_window: "24h".to_owned(),
        status: "completed".to_owned(),
        created_at_ms: now,
        completed_at_ms: Some(now),
        expires_at_ms: now + 86_400_000,
        idempotency_key: Some("plain-hash-0001".to_owned()),
        request_hash: Some(plain_hash(&earlier)),
        ..marga_store::BatchRecord::default()
    };
    app.store.create_batch(&legacy, &[]).await.unwrap();
    let replay = create(&app, &key, Some("plain-hash-0001"), &earlier).await;
    assert_eq!((replay.status, replay.body["batch"]["id"].as_str()), (200, Some(legacy.id.as_str())), "{}", replay.body);
    let changed = create(&app, &key, Some("plain-hash-0001"), &body).await;
    assert_eq!((changed.status, changed.body["error"]["code"].as_str()), (409, Some("idempotency_key_reused")));
}

#[tokio::test]
async fn preflight_errors_list_every_problem() {
    let app = spawn_app().await;
    let (_, key) = funded(&app).await;
    let file = upload(&app, &key, "batch", item("f", "x").to_string()).await.body["id"].as_str().unwrap().to_owned();
    let both = create(&app, &key, Some("preflight-1"), &json!({"items": [item("a", "x")], "input_file_id": file})).await;
    assert_eq!(both.status, 400, "{}", both.body);
    assert_eq!(both.body["error"]["details"]["preflight"][0]["code"], "items_xor_input_file");
    let neither = create(&app, &key, Some("preflight-2"), &json!({"sla_tier": "standard"})).await;
    assert_eq!(neither.body["error"]["details"]["preflight"][0]["code"], "items_xor_input_file");
    let unknown = json!({"customer_item_id": "c", "operation": "responses", "model": "no/such", "input": {"input": "x"}});
    let vision = json!({"customer_item_id": "d", "operation": "vision", "model": "sandbox/echo", "input": {}});
    let bad = create(&app, &key, Some("preflight-3"), &json!({"items": [item("a", "x"), item("a", "y"), unknown, vision]})).await;
    assert_eq!(bad.status, 400);
    let problems = bad.body["error"]["details"]["preflight"].as_array().unwrap().clone();
    assert_eq!(problems.iter().map(|p| p["item"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2, 3], "{problems:?}");
    assert!(problems[0]["message"].as_str().unwrap().contains("used twice"));
    assert!(problems[1]["message"].as_str().unwrap().contains("no/such"));
    assert!(problems[2]["message"].as_str().unwrap().contains("vision"));
    assert_eq!(get(&app, &key, "/v1/batches").await.body["data"], json!([]), "nothing created");
}

#[tokio::test]
async fn native_items_run_and_page_with_a_stable_cursor_and_a_receipt() {
    let app = spawn_app().await;
    let (org, key) = funded(&app).await;
    let (_, other) = funded(&app).await;
    let mut items: Vec<Value> = (0..6).map(|i| item(&format!("n{i}"), &format!("text {i}"))).collect();
    items.push(json!({"customer_item_id": "emb", "operation": "embeddings", "model": "test/openai-embed", "input": {"input": "vector me"}}));
    let created = create(&app, &key, Some("native-run-01"), &json!({"items": items, "metadata": {"team": "eval"}})).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.body["batch"]["id"].as_str().unwrap().to_owned();
    assert_eq!(get(&app, &other, &format!("/v1/batches/{id}/results")).await.status, 404);
    let done = wait_completed(&app, &key, &id).await;
    assert_eq!((done["item_count"].as_u64(), done["items_completed"].as_u64(), done["items_failed"].as_u64()), (Some(7), Some(7), Some(0)));
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/batches/{id}/results?limit=3&cursor={c}"),
            None => format!("/v1/batches/{id}/results?limit=3"),
        };
        let page = get(&app, &key, &path).await.body;
        for r in page["data"].as_array().unwrap() {
            assert_eq!(r["status"], "succeeded", "{r}");
            seen.push(r["customer_item_id"].as_str().unwrap().to_owned());
        }
        // The same cursor gives the same page.
        assert_eq!(get(&app, &key, &path).await.body, page);
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, ["n0", "n1", "n2", "n3", "n4", "n5", "emb"]);
    let bad = get(&app, &key, &format!("/v1/batches/{id}/results?cursor=zzz")).await;
    assert_eq!(bad.status, 400);
    let with_receipt = get(&app, &key, &format!("/v1/batches/{id}?include_billing_receipt=true")).await.body;
    let receipt = &with_receipt["billing_receipt"];
    let charges = wait_for_charges(&app, &org, 7).await;
    let charged: i64 = charges.iter().map(|c| -c.amount_nanos).sum();
    assert_eq!(receipt["total_cost"].as_str().unwrap().parse::<Decimal>().unwrap(), Decimal::new(charged, 9), "{receipt}");
    assert_eq!(receipt["provider_lanes"].as_array().unwrap().len(), 2, "{receipt}");
    assert!(get(&app, &key, &format!("/v1/batches/{id}")).await.body.get("billing_receipt").is_none());
}

#[tokio::test]
async fn file_items_and_signed_artifact_urls() {
    let app = spawn_app().await;
    let (_, key) = funded(&app).await;
    let (_, other) = funded(&app).await;
    let lines: Vec<String> = (0..3).map(|i| item(&format!("f{i}"), "from a file").to_string()).collect();
    let file = upload(&app, &key, "batch", lines.join("\n")).await;
    assert_eq!(file.status, 200, "native lines are valid batch lines: {}", file.body);
    let file = file.body["id"].as_str().unwrap().to_owned();
    let created = create(&app, &key, Some("native-file-01"), &json!({"input_file_id": file})).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.body["batch"]["id"].as_str().unwrap().to_owned();
    wait_completed(&app, &key, &id).await;
    assert_eq!(get(&app, &other, &format!("/v1/batches/{id}/artifact-url")).await.status, 404);
    let signed = get(&app, &key, &format!("/v1/batches/{id}/artifact-url")).await.body;
    let url = signed["url"].as_str().unwrap().to_owned();
    let download = |url: String| {
        let client = app.client.clone();
        async move {
            let response = client.get(url).send().await.expect("send");
            (response.status().as_u16(), response.text().await.expect("text"))
        }
    };
    let (status, text) = download(url.clone()).await;
    assert_eq!(status, 200, "no key needed: {text}");
    let ids: Vec<String> = text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["customer_item_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids, ["f0", "f1", "f2"]);
    // Tampered: another signature, a longer expiry, another batch.
    let last = url.chars().last().unwrap();
    let flipped = format!("{}{}", &url[..url.len() - 1], if last == '0' { '1' } else { '0' });
    assert_eq!(download(flipped).await.0, 403);
    let expires = signed["expires_at"].as_i64().unwrap();
    assert_eq!(download(url.replace(&format!("expires={expires}"), &format!("expires={}", expires + 1000))).await.0, 403);
    assert_eq!(download(url.replace(&id, "batch_other")).await.0, 403);
    // Expired: a correctly signed URL whose time has passed.
    let secret = hex::decode(app.store.get_setting("batch_artifact_secret").await.unwrap().unwrap()).unwrap();
    let past = 1_000_000;
    let signature = marga_gateway::batch::native::sign(&secret, &id, past);
    let (status, text) = download(app.url(&format!("/v1/batches/{id}/artifact?expires={past}&signature={signature}"))).await;
    assert_eq!(status, 403);
    assert!(text.contains("expired"), "{text}");
}

#[tokio::test]
async fn quotes_estimate_from_samples_and_show_selected_and_rejected_lanes() {
    let app = spawn_app().await;
    let (_, key) = funded(&app).await;
    let failover = |id: &str| {
        json!({"customer_item_id": id, "model": "test/failover", "input": {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 100}})
    };
    let ignoring = json!({"customer_item_id": "c", "model": "test/failover",
        "input": {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 100, "provider": {"ignore": ["backup"]}}});
    let answer = app
        .client
        .post(app.url("/v1/quotes/model"))
        .bearer_auth(&key)
        .json(&json!({"items": [failover("a"), failover("b"), ignoring], "estimated_items": 300}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let quote: Value = answer.json().await.unwrap();
    assert!(quote["quote_id"].as_str().unwrap().starts_with("qlock_"), "{quote}");
    let estimate = &quote["pricing_estimate"];
    assert_eq!((estimate["currency"].as_str(), estimate["sample_items"].as_u64()), (Some("USD"), Some(3)));
    let lanes = quote["quote_lanes"].as_array().unwrap();
    let lane = |provider: &str| lanes.iter().find(|l| l["lane_id"].as_str().unwrap().contains(provider)).unwrap().clone();
    let primary = lane("openai-main");
    assert_eq!((primary["selected"].as_bool(), primary["items"].as_u64()), (Some(true), Some(3)));
    let backup = lane("backup");
    assert_eq!((backup["selected"].as_bool(), backup["role"].as_str(), backup["items"].as_u64()), (Some(false), Some("failover"), Some(2)));
    // The selected lane's cost is the estimate: 3 identical items, priced on openai-main.
    let sample: Decimal = estimate["sample_cost"].as_str().unwrap().parse().unwrap();
    assert_eq!(primary["estimated_cost"].as_str().unwrap().parse::<Decimal>().unwrap(), sample);
    let total: Decimal = estimate["estimated_total"].as_str().unwrap().parse().unwrap();
    assert_eq!(total, (sample / Decimal::from(3) * Decimal::from(300)).round_dp(9));
    assert!(sample > Decimal::ZERO);
    // A route the item's own preferences excluded is a rejected lane with its reason.
    let ignore_lanes: Vec<&Value> = lanes.iter().filter(|l| l["rejection"]["reason"] == "ignored").collect();
    assert_eq!(ignore_lanes.len(), 0, "backup already listed as a lane of other items: {lanes:?}");
    let only_sample = app
        .client
        .post(app.url("/v1/quotes/model"))
        .bearer_auth(&key)
        .json(&json!({"items": [json!({"customer_item_id": "c", "model": "test/failover",
            "input": {"messages": [{"role": "user", "content": "x"}], "provider": {"ignore": ["backup"]}}})]}))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let rejected: Vec<&Value> =
        only_sample["quote_lanes"].as_array().unwrap().iter().filter(|l| l["selected"] == false && l["kind"] == "realtime").collect();
    assert_eq!(rejected.len(), 1, "{only_sample}");
    assert_eq!(rejected[0]["rejection"]["reason"], "ignored");
    assert!(rejected[0]["lane_id"].as_str().unwrap().contains("backup"));
    let bad = app.client.post(app.url("/v1/quotes/model")).bearer_auth(&key).json(&json!({"items": []})).send().await.unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(get(&app, &key, "/v1/batches").await.body["data"], json!([]), "a quote creates nothing");
}
