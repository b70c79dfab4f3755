//! Files and OpenAI-compatible batches end to end: uploads streamed to disk and checked line
//! by line, tenant isolation, batch creation errors, the worker running every item through
//! the router and charging each once by its item id, output and error files, cancellation.

use std::time::{Duration, Instant};

use marga_store::LedgerEntry;
use mock_upstream::Scenario;
use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::accounts::{call, get, grant, new_key, new_org, post, Answer};
use crate::helpers::{files_under, spawn_app, spawn_app_with, Options, TestApp};

/// `POST /v1/files` as a multipart form (`purpose`, then `file`), as the SDKs send it.
pub(crate) async fn upload(app: &TestApp, key: &str, purpose: &str, content: impl Into<Vec<u8>>) -> Answer {
    let boundary = "marga-test-boundary-7d1f";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n--{boundary}\r\n\
         Content-Disposition: form-data; name=\"file\"; filename=\"input.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n"
    )
    .into_bytes();
    body.extend(content.into());
    body.extend(format!("\r\n--{boundary}--\r\n").into_bytes());
    let response = app
        .client
        .post(app.url("/v1/files"))
        .bearer_auth(key)
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(body)
        .send()
        .await
        .expect("send");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.expect("body");
    Answer { status, headers, body: serde_json::from_str(&text).unwrap_or(Value::String(text)) }
}

pub(crate) fn line(custom_id: &str, url: &str, body: Value) -> String {
    json!({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).to_string()
}

pub(crate) fn chat_line(custom_id: &str, text: &str) -> String {
    let body = json!({"model": "sandbox/echo", "max_tokens": 16, "messages": [{"role": "user", "content": text}]});
    line(custom_id, "/v1/chat/completions", body)
}

/// Polls the batch until it reaches a terminal status.
pub(crate) async fn wait_terminal(app: &TestApp, key: &str, id: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let batch = get(app, key, &format!("/v1/batches/{id}")).await;
        assert_eq!(batch.status, 200, "{}", batch.body);
        if matches!(batch.body["status"].as_str(), Some("completed" | "failed" | "cancelled" | "expired")) {
            return batch.body;
        }
        assert!(Instant::now() < deadline, "batch not finished in time: {}", batch.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) async fn content(app: &TestApp, key: &str, file_id: &str) -> (u16, String) {
    let response = app.client.get(app.url(&format!("/v1/files/{file_id}/content"))).bearer_auth(key).send().await.expect("send");
    (response.status().as_u16(), response.text().await.expect("text"))
}

fn jsonl(text: &str) -> Vec<Value> {
    text.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}

/// A funded organisation and an inference key of it.
async fn funded(app: &TestApp, amount: &str) -> (String, String) {
    let (org, management) = new_org(app, "USD").await;
    grant(app, &org, amount).await;
    let (key, _) = new_key(app, &management, json!({"name": "batch"})).await;
    (org, key)
}

#[tokio::test]
async fn files_round_trip_and_stay_inside_their_organisation() {
    let app = spawn_app().await;
    let (_, key) = funded(&app, "1").await;
    let (_, other) = funded(&app, "1").await;
    let text = format!("{}\n{}\n", chat_line("a", "one"), chat_line("b", "two"));
    let created = upload(&app, &key, "batch", text.clone()).await;
    assert_eq!(created.status, 200, "{}", created.body);
    let file = &created.body;
    assert_eq!((file["object"].as_str(), file["purpose"].as_str(), file["filename"].as_str()), (Some("file"), Some("batch"), Some("input.jsonl")));
    assert_eq!(file["bytes"], text.len());
    let id = file["id"].as_str().unwrap();
    assert_eq!(get(&app, &key, &format!("/v1/files/{id}")).await.body["id"], id);
    assert_eq!(content(&app, &key, id).await, (200, text.clone()));
    let listed = get(&app, &key, "/v1/files?purpose=batch").await.body;
    assert_eq!((listed["object"].as_str(), listed["data"][0]["id"].as_str(), listed["has_more"].as_bool()), (Some("list"), Some(id), Some(false)));
    // Another organisation sees nothing and changes nothing.
    assert_eq!(get(&app, &other, &format!("/v1/files/{id}")).await.status, 404);
    assert_eq!(content(&app, &other, id).await.0, 404);
    assert_eq!(call(&app, reqwest::Method::DELETE, &other, &format!("/v1/files/{id}"), None).await.status, 404);
    assert_eq!(get(&app, &other, "/v1/files").await.body["data"], json!([]));
    assert_eq!(content(&app, &key, id).await, (200, text));
    let deleted = call(&app, reqwest::Method::DELETE, &key, &format!("/v1/files/{id}"), None).await;
    assert_eq!(deleted.body, json!({"id": id, "object": "file", "deleted": true}));
    assert_eq!(get(&app, &key, &format!("/v1/files/{id}")).await.status, 404);
    let stored: Vec<_> = files_under(app.data_dir.path()).into_iter().filter(|f| f.to_string_lossy().contains(id)).collect();
    assert!(stored.is_empty(), "deleted from disk too: {stored:?}");
}

#[tokio::test]
async fn invalid_jsonl_is_refused_naming_the_line_and_leaves_nothing_behind() {
    let options = Options { extra_toml: "[batch]\nmax_file_bytes = 2000\n".to_owned(), ..Options::default() };
    let app = spawn_app_with(options).await;
    let (_, key) = funded(&app, "1").await;
    let bad = format!("{}\n\n{{\"custom_id\": \"x\", \"method\": \"POST\"\n", chat_line("a", "one"));
    let refused = upload(&app, &key, "batch", bad.clone()).await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    let message = refused.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("line 3"), "{message}");
    let get_line = chat_line("a", "one").replace("POST", "GET");
    let refused = upload(&app, &key, "batch", get_line).await;
    assert!(refused.body["error"]["message"].as_str().unwrap().contains("line 1: `method` must be \"POST\""), "{}", refused.body);
    // Not a batch file: stored as it is.
    assert_eq!(upload(&app, &key, "user_data", bad).await.status, 200);
    assert_eq!(upload(&app, &key, "nonsense", "x").await.status, 400);
    let too_big = upload(&app, &key, "batch", vec![b'x'; 5000]).await;
    assert_eq!((too_big.status, too_big.body["error"]["code"].as_str()), (413, Some("request_too_large")));
    let files: Vec<_> = files_under(&app.data_dir.path().join("data/files"));
    assert_eq!(files.len(), 1, "only the accepted upload is on disk, no partial files: {files:?}");
    assert_eq!(get(&app, &key, "/v1/files").await.body["data"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn batch_creation_is_checked_before_anything_runs() {
    let app = spawn_app().await;
    let (_, key) = funded(&app, "1").await;
    let (_, other) = funded(&app, "1").await;
    let create = |file: &str, endpoint: &str| json!({"input_file_id": file, "endpoint": endpoint, "completion_window": "24h"});
    let upload_id = |text: String| {
        let (app, key) = (&app, key.clone());
        async move { upload(app, &key, "batch", text).await.body["id"].as_str().unwrap().to_owned() }
    };
    let good = upload_id(format!("{}\n{}\n", chat_line("a", "x"), chat_line("b", "y"))).await;
    let expect_400 = |answer: Answer, needle: &str| {
        assert_eq!(answer.status, 400, "{}", answer.body);
        let message = answer.body["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.contains(needle), "{message} should mention {needle}");
    };
    expect_400(post(&app, &key, "/v1/batches", &create(&good, "/v1/images")).await, "endpoint");
    expect_400(post(&app, &key, "/v1/batches", &json!({"input_file_id": good, "endpoint": "/v1/chat/completions", "completion_window": "1h"})).await, "24h");
    expect_400(post(&app, &key, "/v1/batches", &create(&good, "/v1/embeddings")).await, "line 1");
    expect_400(post(&app, &other, "/v1/batches", &create(&good, "/v1/chat/completions")).await, "no file");
    let dup = upload_id(format!("{}\n{}\n", chat_line("a", "x"), chat_line("a", "y"))).await;
    expect_400(post(&app, &key, "/v1/batches", &create(&dup, "/v1/chat/completions")).await, "line 2: `custom_id` \"a\" is used twice");
    let unknown = line("z", "/v1/chat/completions", json!({"model": "no/such-model", "messages": [{"role": "user", "content": "x"}]}));
    let unknown = upload_id(format!("{}\n{unknown}\n", chat_line("a", "x"))).await;
    expect_400(post(&app, &key, "/v1/batches", &create(&unknown, "/v1/chat/completions")).await, "line 2");
    assert_eq!(get(&app, &key, "/v1/batches").await.body["data"], json!([]), "nothing was created");
    // A poor organisation cannot start a batch it could not pay for.
    let (_, poor_management) = new_org(&app, "USD").await;
    let (poor, _) = new_key(&app, &poor_management, json!({"name": "poor"})).await;
    let poor_file = upload(&app, &poor, "batch", chat_line("a", "x")).await.body["id"].as_str().unwrap().to_owned();
    let refused = post(&app, &poor, "/v1/batches", &create(&poor_file, "/v1/chat/completions")).await;
    assert_eq!((refused.status, refused.body["error"]["code"].as_str()), (402, Some("insufficient_credits")));
}

#[tokio::test]
async fn a_batch_runs_every_item_through_the_router_and_charges_each_once() {
    let app = spawn_app().await;
    let (org, key) = funded(&app, "1").await;
    let mut lines: Vec<String> = (0..5).map(|i| chat_line(&format!("req-{i}"), &format!("hello number {i}"))).collect();
    // Valid at creation, refused when it runs: an error line, not a charge.
    let hot = json!({"model": "sandbox/echo", "temperature": 7, "messages": [{"role": "user", "content": "x"}]});
    lines.push(line("too-hot", "/v1/chat/completions", hot));
    let file = upload(&app, &key, "batch", lines.join("\n")).await.body["id"].as_str().unwrap().to_owned();
    let body = json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h", "metadata": {"job": "eval"}});
    let created = post(&app, &key, "/v1/batches", &body).await;
    assert_eq!(created.status, 200, "{}", created.body);
    let id = created.body["id"].as_str().unwrap().to_owned();
    assert_eq!((created.body["object"].as_str(), created.body["status"].as_str()), (Some("batch"), Some("in_progress")));
    assert_eq!(created.body["metadata"], json!({"job": "eval"}));
    let done = wait_terminal(&app, &key, &id, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["request_counts"], json!({"total": 6, "completed": 5, "failed": 1}));
    assert!(done["completed_at"].as_i64().is_some() && done["finalizing_at"].as_i64().is_some(), "{done}");
    let (status, output) = content(&app, &key, done["output_file_id"].as_str().unwrap()).await;
    assert_eq!(status, 200);
    let output = jsonl(&output);
    assert_eq!(output.iter().map(|l| l["custom_id"].as_str().unwrap()).collect::<Vec<_>>(), ["req-0", "req-1", "req-2", "req-3", "req-4"]);
    let mut total_cost = Decimal::ZERO;
    for l in &output {
        assert_eq!((l["response"]["status_code"].as_u64(), l["error"].is_null()), (Some(200), true), "{l}");
        let body = &l["response"]["body"];
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["id"], l["response"]["request_id"], "the request id is the generation id");
        total_cost += body["usage"]["cost"].to_string().parse::<Decimal>().unwrap();
    }
    let errors = jsonl(&content(&app, &key, done["error_file_id"].as_str().unwrap()).await.1);
    assert_eq!(errors.len(), 1);
    assert_eq!((errors[0]["custom_id"].as_str(), errors[0]["response"]["status_code"].as_u64()), (Some("too-hot"), Some(400)));
    assert!(errors[0]["response"]["body"]["error"]["message"].as_str().unwrap().contains("temperature"));
    // The ledger: one charge per successful item, keyed by the item, summing to the costs.
    let charges = wait_for_charges(&app, &org, 5).await;
    let mut references: Vec<&str> = charges.iter().map(|c| c.reference.as_str()).collect();
    references.sort_unstable();
    let expected: Vec<String> = (0..5).map(|i| format!("gen-{id}-{i}")).collect();
    assert_eq!(references, expected.iter().map(String::as_str).collect::<Vec<_>>());
    let charged: i64 = charges.iter().map(|c| -c.amount_nanos).sum();
    assert_eq!(Decimal::new(charged, 9), total_cost);
    let listed = get(&app, &key, "/v1/batches?limit=1").await.body;
    assert_eq!((listed["data"][0]["id"].as_str(), listed["has_more"].as_bool()), (Some(id.as_str()), Some(false)));
}

/// The organisation's charges once `n` of them are committed.
pub(crate) async fn wait_for_charges(app: &TestApp, org: &str, n: usize) -> Vec<LedgerEntry> {
    for _ in 0..200 {
        let entries = app.store.entries(org, None, 100_000).await.expect("entries");
        let charges: Vec<LedgerEntry> = entries.into_iter().filter(|e| e.kind == "charge").collect();
        if charges.len() >= n {
            return charges;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("fewer than {n} charges were committed");
}

#[tokio::test]
async fn embeddings_batches_use_the_embeddings_pipeline() {
    let app = spawn_app().await;
    let (_, key) = funded(&app, "1").await;
    let body = |text: &str| json!({"model": "test/openai-embed", "input": text});
    let text = format!("{}\n{}\n", line("e1", "/v1/embeddings", body("alpha")), line("e2", "/v1/embeddings", body("beta")));
    let file = upload(&app, &key, "batch", text).await.body["id"].as_str().unwrap().to_owned();
    let created = post(&app, &key, "/v1/batches", &json!({"input_file_id": file, "endpoint": "/v1/embeddings", "completion_window": "24h"})).await;
    assert_eq!(created.status, 200, "{}", created.body);
    let done = wait_terminal(&app, &key, created.body["id"].as_str().unwrap(), Duration::from_secs(30)).await;
    assert_eq!(done["request_counts"], json!({"total": 2, "completed": 2, "failed": 0}), "{done}");
    assert!(done["error_file_id"].is_null());
    let output = jsonl(&content(&app, &key, done["output_file_id"].as_str().unwrap()).await.1);
    assert_eq!(output[1]["custom_id"], "e2");
    assert_eq!(output[1]["response"]["body"]["object"], "list");
    assert!(output[1]["response"]["body"]["data"][0]["embedding"].is_array());
    assert_eq!(app.mock.requests_for("/embeddings"), 2);
}

#[tokio::test]
async fn cancelling_stops_pending_items_and_keeps_what_finished() {
    let options = Options { extra_toml: "[batch]\nconcurrency = 1\n".to_owned(), ..Options::default() };
    let app = spawn_app_with(options).await;
    let (_, key) = funded(&app, "1").await;
    let (_, other) = funded(&app, "1").await;
    app.mock.set_scenario(Scenario { delay_ms: 150, ..Scenario::default() });
    let lines: Vec<String> = (0..20)
        .map(|i| line(&format!("c{i}"), "/v1/chat/completions", json!({"model": "test/openai-chat", "messages": [{"role": "user", "content": "x"}]})))
        .collect();
    let file = upload(&app, &key, "batch", lines.join("\n")).await.body["id"].as_str().unwrap().to_owned();
    let created = post(&app, &key, "/v1/batches", &json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"})).await;
    let id = created.body["id"].as_str().unwrap().to_owned();
    while app.mock.requests() < 2 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(post(&app, &other, &format!("/v1/batches/{id}/cancel"), &json!({})).await.status, 404, "not theirs");
    let cancelling = post(&app, &key, &format!("/v1/batches/{id}/cancel"), &json!({})).await;
    assert_eq!(cancelling.status, 200, "{}", cancelling.body);
    assert_eq!(cancelling.body["status"], "cancelling");
    let done = wait_terminal(&app, &key, &id, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "cancelled");
    let finished = done["request_counts"]["completed"].as_u64().unwrap();
    assert!((1..20).contains(&finished), "{done}");
    assert!(app.mock.requests() < 20, "pending items never ran");
    let output = jsonl(&content(&app, &key, done["output_file_id"].as_str().unwrap()).await.1);
    assert_eq!(output.len() as u64, finished);
    let again = post(&app, &key, &format!("/v1/batches/{id}/cancel"), &json!({})).await;
    assert_eq!((again.status, again.body["status"].as_str()), (200, Some("cancelled")));
}

#[tokio::test]
async fn a_batch_reserves_its_credit_at_creation_and_returns_the_rest_when_it_ends() {
    let options = Options { extra_toml: "[batch]\nconcurrency = 2\n".to_owned(), ..Options::default() };
    let app = spawn_app_with(options).await;
    let (org, key) = funded(&app, "1").await;
    app.mock.set_scenario(Scenario { delay_ms: 100, ..Scenario::default() });
    let lines: Vec<String> = (0..6)
        .map(|i| line(&format!("r{i}"), "/v1/chat/completions", json!({"model": "test/openai-chat", "max_tokens": 1000, "messages": [{"role": "user", "content": "x"}]})))
        .collect();
    let file = upload(&app, &key, "batch", lines.join("\n")).await.body["id"].as_str().unwrap().to_owned();
    let created = post(&app, &key, "/v1/batches", &json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"})).await;
    assert_eq!(created.status, 200, "{}", created.body);
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    // Reserved at creation: what is available drops by the batch's maximum cost at once.
    let balance = app.store.balance(&org).await.unwrap();
    let available = app.store.available(&org, now()).await.unwrap();
    assert!(available < balance, "the batch holds credit: available {available} of {balance}");
    let done = wait_terminal(&app, &key, created.body["id"].as_str().unwrap(), Duration::from_secs(30)).await;
    assert_eq!(done["request_counts"]["completed"], 6);
    let charges = wait_for_charges(&app, &org, 6).await;
    let charged: i64 = charges.iter().map(|c| -c.amount_nanos).sum();
    let granted = 1_000_000_000;
    assert_eq!(app.store.balance(&org).await.unwrap(), granted - charged);
    // Ended: the lease is closed and only the charges are gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let available = app.store.available(&org, now()).await.unwrap();
        if available == granted - charged {
            break;
        }
        assert!(Instant::now() < deadline, "credit still held after the batch ended: {available}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A batch that would cost more than what is left is refused at creation.
    let costly: Vec<String> = (0..50)
        .map(|i| line(&format!("big{i}"), "/v1/chat/completions", json!({"model": "test/openai-chat", "max_tokens": 100_000, "messages": [{"role": "user", "content": "x"}]})))
        .collect();
    let file = upload(&app, &key, "batch", costly.join("\n")).await.body["id"].as_str().unwrap().to_owned();
    let refused = post(&app, &key, "/v1/batches", &json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"})).await;
    assert_eq!((refused.status, refused.body["error"]["code"].as_str()), (402, Some("insufficient_credits")), "{}", refused.body);
}

#[tokio::test]
async fn a_batch_past_its_window_expires_with_what_finished() {
    let app = spawn_app().await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    // A batch whose 24 h window has passed (written as an earlier run would have left it).
    let batch = marga_store::BatchRecord {
        id: format!("batch_{}", uuid::Uuid::now_v7().simple()),
        org_id: "default".to_owned(),
        key_id: "master".to_owned(),
        endpoint: "/v1/chat/completions".to_owned(),
        input_file_id: "file-gone".to_owned(),
        completion_window: "24h".to_owned(),
        status: "in_progress".to_owned(),
        total: 3,
        created_at_ms: now - 90_000_000,
        in_progress_at_ms: Some(now - 90_000_000),
        expires_at_ms: now - 3_600_000,
        ..marga_store::BatchRecord::default()
    };
    let body = json!({"model": "sandbox/echo", "messages": [{"role": "user", "content": "late"}]}).to_string();
    let items: Vec<marga_store::NewItem> = (0..3).map(|i| marga_store::NewItem { custom_id: format!("late-{i}"), body: body.clone() }).collect();
    app.store.create_batch(&batch, &items).await.unwrap();
    let done = wait_terminal(&app, &app.master_key, &batch.id, Duration::from_secs(10)).await;
    assert_eq!(done["status"], "expired", "{done}");
    assert_eq!(done["request_counts"], json!({"total": 3, "completed": 0, "failed": 0}));
    assert!(done["expired_at"].as_i64().is_some() && done["completed_at"].is_null(), "{done}");
    assert!(done["output_file_id"].is_null());
    assert_eq!(app.store.unfinished_items(&batch.id).await.unwrap(), 0, "pending items were dropped, not run");
}
