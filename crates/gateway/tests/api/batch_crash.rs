//! A batch survives `kill -9`: the real `marga` binary is killed with SIGKILL while a batch is
//! half done, started again on the same data, and the batch completes with every item in
//! the output exactly once and charged exactly once (one ledger line per item, keyed by the
//! item, summing to the output's costs). On Postgres, two instances share one batch: every
//! item runs exactly once between them (the upstream sees each request once).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use mock_upstream::{MockUpstream, Scenario};
use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::crash::{Data, Gateway};
use crate::helpers::{note_skipped, postgres_enabled, TestDatabase};

const ITEMS: usize = 150;
/// `[batch] item_lease_s`: how long the dead instance's items wait before they are taken over.
const ITEM_LEASE_S: u64 = 2;

fn config_toml(upstream: &MockUpstream) -> String {
    format!(
        r#"
[server]
log_flush_ms = 20

[billing]
lease_ttl_s = 2

[batch]
concurrency = 8
item_lease_s = {ITEM_LEASE_S}
poll_ms = 50

[providers.slow]
kind = "openai"
base_url = "{base}"
api_key = "sk-slow"
region = "US"

[models."test/slow"]
routes = [{{ provider = "slow", model = "gpt-slow", input_per_mtok = "0.10", output_per_mtok = "0.40", currency = "USD" }}]
"#,
        base = upstream.openai_base(),
    )
}

/// Uploads `ITEMS` chat requests and creates the batch; returns its id.
async fn start_batch(client: &reqwest::Client, gateway: &Gateway, key: &str) -> String {
    let lines: Vec<String> = (0..ITEMS)
        .map(|i| {
            let body = json!({"model": "test/slow", "max_tokens": 8, "messages": [{"role": "user", "content": format!("item {i}")}]});
            json!({"custom_id": format!("item-{i}"), "method": "POST", "url": "/v1/chat/completions", "body": body}).to_string()
        })
        .collect();
    let boundary = "crash-boundary";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{boundary}\r\n\
         Content-Disposition: form-data; name=\"file\"; filename=\"items.jsonl\"\r\n\r\n"
    )
    .into_bytes();
    body.extend(lines.join("\n").into_bytes());
    body.extend(format!("\r\n--{boundary}--\r\n").into_bytes());
    let file: Value = client
        .post(gateway.url("/v1/files"))
        .bearer_auth(key)
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(body)
        .send()
        .await
        .expect("upload")
        .json()
        .await
        .expect("file JSON");
    let file_id = file["id"].as_str().unwrap_or_else(|| panic!("upload failed: {file}"));
    let create = json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"});
    let batch: Value =
        client.post(gateway.url("/v1/batches")).bearer_auth(key).json(&create).send().await.expect("create").json().await.expect("batch JSON");
    batch["id"].as_str().unwrap_or_else(|| panic!("create failed: {batch}")).to_owned()
}

async fn batch_state(client: &reqwest::Client, gateway: &Gateway, key: &str, id: &str) -> Value {
    let url = gateway.url(&format!("/v1/batches/{id}"));
    client.get(url).bearer_auth(key).send().await.expect("get batch").json().await.expect("batch JSON")
}

async fn wait_until(client: &reqwest::Client, gateway: &Gateway, key: &str, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let batch = batch_state(client, gateway, key, id).await;
        if done(&batch) {
            return batch;
        }
        assert!(Instant::now() < deadline, "gave up waiting: {batch}\n{}", gateway.log_tail());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every item is in the output exactly once, and charged exactly once: one ledger line per
/// item (referenced by its generation id) whose amounts sum to the output's costs.
async fn assert_exactly_once(client: &reqwest::Client, gateway: &Gateway, key: &str, data: &Data, batch: &Value) {
    assert_eq!(batch["status"], "completed", "{batch}");
    assert_eq!(batch["request_counts"], json!({"total": ITEMS, "completed": ITEMS, "failed": 0}));
    let url = gateway.url(&format!("/v1/files/{}/content", batch["output_file_id"].as_str().expect("output file")));
    let text = client.get(url).bearer_auth(key).send().await.expect("content").text().await.expect("text");
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    assert_eq!(lines.len(), ITEMS, "one output line per item");
    let ids: BTreeSet<&str> = lines.iter().map(|l| l["custom_id"].as_str().expect("custom_id")).collect();
    assert_eq!(ids.len(), ITEMS, "no item twice");
    let cost: Decimal = lines.iter().map(|l| l["response"]["body"]["usage"]["cost"].to_string().parse::<Decimal>().expect("cost")).sum();
    let id = batch["id"].as_str().expect("id");
    let store = data.store().await;
    let expected: BTreeSet<String> = (0..ITEMS).map(|i| format!("gen-{id}-{i}")).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let entries = store.entries("default", None, 100_000).await.expect("ledger");
        let charges: Vec<_> = entries.iter().filter(|e| e.kind == "charge" && e.reference.starts_with(&format!("gen-{id}-"))).collect();
        let references: BTreeSet<String> = charges.iter().map(|c| c.reference.clone()).collect();
        if charges.len() == ITEMS {
            assert_eq!(references, expected, "each item charged once");
            let charged: i64 = charges.iter().map(|c| -c.amount_nanos).sum();
            assert_eq!(Decimal::new(charged, 9), cost, "the charges are the output's costs");
            return;
        }
        assert!(charges.len() < ITEMS && Instant::now() < deadline, "{} charges for {ITEMS} items", charges.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn kill_9_mid_batch(database: Option<TestDatabase>) {
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let upstream = MockUpstream::start_with(local, Scenario { delay_ms: 40, ..Scenario::default() }).await.expect("upstream");
    let data = Data { dir: tempfile::tempdir().expect("temp dir"), database };
    let config = data.dir.path().join("marga.toml");
    std::fs::write(&config, config_toml(&upstream)).expect("write config");
    let key = format!("marga_mk_test_{}", uuid::Uuid::new_v4().simple());
    let client = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().expect("client");
    let mut first = Gateway::start(&config, &data, &key, "first").await;
    let id = start_batch(&client, &first, &key).await;
    let part_done = |b: &Value| b["request_counts"]["completed"].as_u64().unwrap_or(0) >= (ITEMS / 4) as u64;
    let before = wait_until(&client, &first, &key, &id, part_done).await;
    first.kill_9();
    let completed_before = before["request_counts"]["completed"].as_u64().unwrap_or(0);
    assert!(completed_before < ITEMS as u64, "killed mid-batch: {before}");
    let second = Gateway::start(&config, &data, &key, "second").await;
    let terminal = |b: &Value| matches!(b["status"].as_str(), Some("completed" | "failed" | "cancelled"));
    let done = wait_until(&client, &second, &key, &id, terminal).await;
    assert_exactly_once(&client, &second, &key, &data, &done).await;
    // Items that were in flight at the kill ran again (at most `concurrency` of them).
    let calls = upstream.requests();
    assert!((ITEMS as u64..=ITEMS as u64 + 8).contains(&calls), "{calls} upstream calls for {ITEMS} items");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_batch_on_sqlite_completes_every_item_exactly_once() {
    kill_9_mid_batch(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_batch_on_postgres_completes_every_item_exactly_once() {
    if !postgres_enabled() {
        note_skipped("batch_crash::kill_9_mid_batch_on_postgres_completes_every_item_exactly_once");
        return;
    }
    kill_9_mid_batch(Some(TestDatabase::create().await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_postgres_share_a_batch_without_doing_an_item_twice() {
    if !postgres_enabled() {
        note_skipped("batch_crash::two_instances_on_postgres_share_a_batch_without_doing_an_item_twice");
        return;
    }
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    // Each instance calls an upstream of its own, so that who ran what can be counted.
    let first = MockUpstream::start_with(local, Scenario { delay_ms: 20, ..Scenario::default() }).await.expect("upstream");
    let second = MockUpstream::start_with(local, Scenario { delay_ms: 20, ..Scenario::default() }).await.expect("upstream");
    let data = Data { dir: tempfile::tempdir().expect("temp dir"), database: Some(TestDatabase::create().await) };
    let configs = [data.dir.path().join("one.toml"), data.dir.path().join("two.toml")];
    std::fs::write(&configs[0], config_toml(&first)).expect("write config");
    std::fs::write(&configs[1], config_toml(&second)).expect("write config");
    let key = format!("marga_mk_test_{}", uuid::Uuid::new_v4().simple());
    let client = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().expect("client");
    // Both instances share the data directory too (the documented multi-instance setup).
    let one = Gateway::start(&configs[0], &data, &key, "one").await;
    let two = Gateway::start(&configs[1], &data, &key, "two").await;
    let id = start_batch(&client, &one, &key).await;
    let terminal = |b: &Value| matches!(b["status"].as_str(), Some("completed" | "failed" | "cancelled"));
    let done = wait_until(&client, &two, &key, &id, terminal).await;
    assert_exactly_once(&client, &two, &key, &data, &done).await;
    let (a, b) = (first.requests(), second.requests());
    assert_eq!(a + b, ITEMS as u64, "no item ran twice ({a} + {b})");
    assert!(a > 0 && b > 0, "both instances took part ({a} + {b})");
}
