//! Batch lanes end to end: a batch whose cheapest lane is the provider's native batch API runs
//! there (one submission to the mock's OpenAI Batch API, no realtime calls) and each item is
//! charged once at the batch price; the quote shows the realtime and native lanes and why a
//! native lane is rejected (no batch price, completion window, residency); a completion window
//! shorter than 24 h picks the realtime lane; a restart while the provider's batch runs resumes
//! polling without submitting again; a refused submission falls back to the realtime lane; an
//! item the realtime lane would refuse gets its error line without being submitted; an
//! Anthropic route runs on Message Batches, its results translated to chat completions;
//! cancelling a native-lane batch cancels the provider's batch.

use std::time::{Duration, Instant};

use marga_store::LedgerEntry;
use mock_upstream::Scenario;
use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::accounts::{get, grant, new_key, new_org, post, Answer};
use crate::batch::{content, line, upload, wait_for_charges, wait_terminal};
use crate::helpers::{expected_cost, provider, route, spawn_app_with, Options, TestApp};

const MODEL: &str = "lanes/chat";
/// The `bulk` route: realtime 2 / 8, batch 1 / 4 USD per million tokens.
const NATIVE_ROUTE: &str = "bulk/bulk-model";

fn options() -> Options {
    let bulk = r#"{ provider = "bulk", model = "bulk-model", input_per_mtok = "2", output_per_mtok = "8", currency = "USD", batch_input_per_mtok = "1", batch_output_per_mtok = "4" }"#;
    let desi = route("desi", "desi-model", "3", "12", "USD");
    Options {
        providers: vec![provider("bulk", "US"), provider("desi", "IN")],
        extra_toml: format!(
            "\n[batch]\nnative_poll_ms = 100\nitem_lease_s = 1\npoll_ms = 50\n\n[models.\"{MODEL}\"]\nroutes = [{bulk}, {desi}]\n"
        ),
        ..Options::default()
    }
}

async fn funded(app: &TestApp) -> (String, String) {
    let (org, management) = new_org(app, "USD").await;
    grant(app, &org, "1").await;
    let (key, _) = new_key(app, &management, json!({"name": "lanes"})).await;
    (org, key)
}

fn chat(text: &str, extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": text}]});
    if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    body
}

/// Uploads `n` chat lines and creates an OpenAI-shape batch.
async fn openai_batch(app: &TestApp, key: &str, n: usize) -> Value {
    let lines: Vec<String> = (0..n).map(|i| line(&format!("req-{i}"), "/v1/chat/completions", chat(&format!("question {i}"), json!({})))).collect();
    let file = upload(app, key, "batch", lines.join("\n")).await.body["id"].as_str().unwrap().to_owned();
    let body = json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"});
    let created = post(app, key, "/v1/batches", &body).await;
    assert_eq!(created.status, 200, "{}", created.body);
    created.body
}

async fn native_batch(app: &TestApp, key: &str, idempotency: &str, body: &Value) -> Answer {
    let response =
        app.client.post(app.url("/v1/batches")).bearer_auth(key).header("Idempotency-Key", idempotency).json(body).send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    Answer { status, headers, body: response.json().await.unwrap() }
}

/// The output file's lines.
async fn output(app: &TestApp, key: &str, batch: &Value) -> Vec<Value> {
    let (status, text) = content(app, key, batch["output_file_id"].as_str().unwrap()).await;
    assert_eq!(status, 200);
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Checks every output line was charged once, at `input`/`output` per million tokens, and
/// returns the charges.
async fn assert_charged_at(app: &TestApp, org: &str, id: &str, lines: &[Value], input: &str, output: &str) -> Vec<LedgerEntry> {
    let mut total = Decimal::ZERO;
    for l in lines {
        let usage = &l["response"]["body"]["usage"];
        let (prompt, completion) = (usage["prompt_tokens"].as_u64().unwrap(), usage["completion_tokens"].as_u64().unwrap());
        let cost: Decimal = usage["cost"].to_string().trim_matches('"').parse().unwrap();
        assert_eq!(cost.normalize().to_string(), expected_cost(prompt, completion, input, output), "{l}");
        total += cost;
    }
    let charges = wait_for_charges(app, org, lines.len()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let charges_later: Vec<LedgerEntry> =
        app.store.entries(org, None, 1000).await.unwrap().into_iter().filter(|e| e.kind == "charge").collect();
    assert_eq!(charges_later.len(), lines.len(), "one charge per item, no more");
    let mut references: Vec<String> = charges.iter().map(|c| c.reference.clone()).collect();
    references.sort_unstable();
    let mut expected: Vec<String> = (0..lines.len()).map(|i| format!("gen-{id}-{i}")).collect();
    expected.sort_unstable();
    assert_eq!(references, expected);
    assert_eq!(Decimal::new(charges.iter().map(|c| -c.amount_nanos).sum(), 9), total);
    charges
}

#[tokio::test]
async fn a_batch_whose_cheapest_lane_is_native_runs_on_the_providers_batch_api_at_the_batch_price() {
    let app = spawn_app_with(options()).await;
    let (org, key) = funded(&app).await;
    let created = openai_batch(&app, &key, 3).await;
    assert_eq!(created["lane"], json!({"kind": "native", "route": NATIVE_ROUTE}), "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let done = wait_terminal(&app, &key, &id, Duration::from_secs(30)).await;
    assert_eq!((done["status"].as_str(), &done["request_counts"]), (Some("completed"), &json!({"total": 3, "completed": 3, "failed": 0})));
    assert_eq!(done["lane"], json!({"kind": "native", "route": NATIVE_ROUTE}), "it stayed on the native lane");
    let bulk = app.upstream("bulk");
    assert_eq!(bulk.batches_created(), 1, "one submission to the provider's batch API");
    assert_eq!(bulk.requests_for("/chat/completions"), 0, "no realtime call");
    assert_eq!(app.upstream("desi").requests(), 0);
    let lines = output(&app, &key, &done).await;
    assert_eq!(lines.iter().map(|l| l["custom_id"].as_str().unwrap()).collect::<Vec<_>>(), ["req-0", "req-1", "req-2"]);
    for l in &lines {
        let body = &l["response"]["body"];
        assert_eq!((body["object"].as_str(), body["model"].as_str()), (Some("chat.completion"), Some(MODEL)), "{l}");
        assert_eq!(body["id"], l["response"]["request_id"]);
    }
    assert_charged_at(&app, &org, &id, &lines, "1", "4").await;
    let record = app.record(&format!("gen-{id}-0")).await;
    assert_eq!((record.provider.as_deref(), record.upstream_model.as_deref()), (Some("bulk"), Some("bulk-model")));
}

#[tokio::test]
async fn the_quote_shows_both_lanes_and_why_a_native_lane_is_rejected() {
    let app = spawn_app_with(options()).await;
    let (_, key) = funded(&app).await;
    let item = |id: &str, extra: Value| json!({"customer_item_id": id, "model": MODEL, "input": chat("hello there", extra)});
    let quote = |body: Value| {
        let app = &app;
        let key = &key;
        async move { post(app, key, "/v1/quotes/model", &body).await.body }
    };
    let lane = |quote: &Value, id: &str| -> Value {
        quote["quote_lanes"].as_array().unwrap().iter().find(|l| l["lane_id"] == id).cloned().unwrap_or_else(|| panic!("no lane {id}: {quote}"))
    };
    let native_id = format!("{MODEL}:{NATIVE_ROUTE}:batch");
    let realtime_id = format!("{MODEL}:{NATIVE_ROUTE}");
    let cheap = quote(json!({"items": [item("a", json!({})), item("b", json!({}))]})).await;
    let native = lane(&cheap, &native_id);
    assert_eq!((native["kind"].as_str(), native["selected"].as_bool(), native["role"].as_str()), (Some("native_batch"), Some(true), Some("primary")), "{native}");
    assert_eq!((native["expected_completion_s"].as_i64(), native["price_per_mtok"]["input"].as_str()), (Some(86_400), Some("1")));
    let realtime = lane(&cheap, &realtime_id);
    assert_eq!((realtime["selected"].as_bool(), realtime["role"].as_str()), (Some(false), Some("fallback")), "{realtime}");
    assert!(realtime["expected_completion_s"].as_i64().unwrap() < 86_400);
    assert_eq!(lane(&cheap, &format!("{MODEL}:desi/desi-model:batch"))["rejection"]["reason"], "no_batch_price");
    assert_eq!(cheap["pricing_estimate"]["sample_cost"], native["estimated_cost"]);
    let realtime_cost: Decimal = realtime["estimated_cost"].as_str().unwrap().parse().unwrap();
    let native_cost: Decimal = native["estimated_cost"].as_str().unwrap().parse().unwrap();
    assert_eq!(native_cost * Decimal::from(2), realtime_cost, "batch prices are half the realtime ones");
    // A window shorter than a native batch may take: the realtime lane.
    let hurried = quote(json!({"items": [item("a", json!({}))], "completion_window": "1h"})).await;
    assert_eq!(lane(&hurried, &native_id)["rejection"]["reason"], "completion_window");
    assert_eq!(lane(&hurried, &realtime_id)["selected"], true);
    // Residency: an india_only item keeps only the IN route, which has no native lane.
    let resident = quote(json!({"items": [item("a", json!({"data_policy": "india_only"}))]})).await;
    assert_eq!(lane(&resident, &native_id)["rejection"]["reason"], "residency", "{resident}");
    assert_eq!(lane(&resident, &format!("{MODEL}:desi/desi-model"))["selected"], true);
    // A provider without a batch API has no native lane.
    let gemini = json!({"customer_item_id": "g", "model": "test/gemini-chat", "input": {"input": "hi"}});
    let no_api = quote(json!({"items": [gemini]})).await;
    let native = lane(&no_api, "test/gemini-chat:gemini-main/gemini-mock:batch");
    assert_eq!((native["selected"].as_bool(), native["rejection"]["reason"].as_str()), (Some(false), Some("no_native_api")));
    assert_eq!(lane(&no_api, "test/gemini-chat:gemini-main/gemini-mock")["selected"], true);
}

#[tokio::test]
async fn a_completion_window_shorter_than_a_day_runs_on_the_realtime_lane() {
    let app = spawn_app_with(options()).await;
    let (org, key) = funded(&app).await;
    let items: Vec<Value> = (0..2).map(|i| json!({"customer_item_id": format!("q{i}"), "model": MODEL, "input": chat("hi", json!({}))})).collect();
    // The same items with the default 24 h window (another organisation): the native lane.
    let (_, other) = funded(&app).await;
    let long = native_batch(&app, &other, "lanes-window-0", &json!({"items": items.clone()})).await;
    assert_eq!(long.body["batch"]["lane"]["kind"], "native", "{}", long.body);
    let long_id = long.body["batch"]["id"].as_str().unwrap().to_owned();
    assert_eq!(wait_terminal(&app, &other, &long_id, Duration::from_secs(30)).await["status"], "completed");
    assert_eq!(app.upstream("bulk").batches_created(), 1);
    let receipt = |key: String, id: String| {
        let app = &app;
        async move { get(app, &key, &format!("/v1/batches/{id}?include_billing_receipt=true")).await.body["billing_receipt"].clone() }
    };
    let taken = receipt(other.clone(), long_id.clone()).await;
    assert!(
        taken["rejected_lanes"].as_array().is_some_and(|l| l.contains(&json!({"kind": "realtime", "reason": "not_cheaper"}))),
        "the receipt says why the realtime lane was not taken: {taken}"
    );
    let created = native_batch(&app, &key, "lanes-window-1", &json!({"items": items, "completion_window": "2h"})).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let batch = &created.body["batch"];
    assert_eq!(batch["lane"]["kind"], "realtime", "{batch}");
    let id = batch["id"].as_str().unwrap().to_owned();
    let done = wait_terminal(&app, &key, &id, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(app.upstream("bulk").batches_created(), 1, "nothing more submitted");
    assert_eq!(app.upstream("bulk").requests_for("/chat/completions"), 2);
    let hurried = receipt(key.clone(), id.clone()).await;
    let rejected = hurried["rejected_lanes"].as_array().cloned().unwrap_or_default();
    assert!(
        rejected.contains(&json!({"kind": "native", "route": NATIVE_ROUTE, "reason": "completion_window"})),
        "the receipt says why the native lane was not taken: {hurried}"
    );
    let openai_shape = get(&app, &key, &format!("/v1/batches/{id}")).await;
    assert_eq!(openai_shape.status, 200);
    let results = get(&app, &key, &format!("/v1/batches/{id}/results")).await.body;
    let lines: Vec<Value> = results["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| json!({"response": {"body": r["response"]}}))
        .collect();
    assert_charged_at(&app, &org, &id, &lines, "2", "8").await;
    // Residency fails closed on a 24 h window too: india_only items never reach the US route.
    let resident: Vec<Value> = (0..2)
        .map(|i| json!({"customer_item_id": format!("r{i}"), "model": MODEL, "input": chat("hi", json!({"data_policy": "india_only"}))}))
        .collect();
    let created = native_batch(&app, &key, "lanes-resident-1", &json!({"items": resident})).await;
    assert_eq!(created.body["batch"]["lane"]["kind"], "realtime", "{}", created.body);
    let id = created.body["batch"]["id"].as_str().unwrap().to_owned();
    assert_eq!(wait_terminal(&app, &key, &id, Duration::from_secs(30)).await["status"], "completed");
    assert_eq!((app.upstream("bulk").batches_created(), app.upstream("bulk").requests_for("/chat/completions")), (1, 2));
    assert_eq!(app.upstream("desi").requests_for("/chat/completions"), 2);
}

/// Waits until the batch's provider batch id is stored.
async fn wait_submitted(app: &TestApp, org: &str, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let batch = app.store.get_batch(org, id).await.unwrap().unwrap();
        if batch.native_batch_id.is_some() {
            return;
        }
        assert!(Instant::now() < deadline, "never submitted: {batch:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_restart_while_the_providers_batch_runs_resumes_polling_without_submitting_again() {
    let app = spawn_app_with(options()).await;
    let (org, key) = funded(&app).await;
    app.upstream("bulk").set_scenario(Scenario { batch_delay_ms: 2_500, ..Scenario::default() });
    let id = openai_batch(&app, &key, 4).await["id"].as_str().unwrap().to_owned();
    wait_submitted(&app, &org, &id).await;
    assert_eq!(get(&app, &key, &format!("/v1/batches/{id}")).await.body["lane"]["kind"], "native");
    let app = app.restart().await;
    let done = wait_terminal(&app, &key, &id, Duration::from_secs(30)).await;
    assert_eq!((done["status"].as_str(), done["request_counts"]["completed"].as_u64()), (Some("completed"), Some(4)), "{done}");
    let bulk = app.upstream("bulk");
    assert_eq!(bulk.batches_created(), 1, "polling resumed; nothing submitted again");
    assert_eq!(bulk.requests_for("/chat/completions"), 0);
    let lines = output(&app, &key, &done).await;
    assert_charged_at(&app, &org, &id, &lines, "1", "4").await;
}

#[tokio::test]
async fn a_refused_native_submission_falls_back_to_the_realtime_lane() {
    let app = spawn_app_with(options()).await;
    let (org, key) = funded(&app).await;
    app.upstream("bulk").set_scenario(Scenario { fail_first: 1, fail_status: 500, ..Scenario::default() });
    let created = openai_batch(&app, &key, 3).await;
    assert_eq!(created["lane"]["kind"], "native");
    let id = created["id"].as_str().unwrap().to_owned();
    let done = wait_terminal(&app, &key, &id, Duration::from_secs(30)).await;
    assert_eq!(done["request_counts"], json!({"total": 3, "completed": 3, "failed": 0}), "{done}");
    assert_eq!(done["lane"]["kind"], "realtime", "the batch records the fallback");
    let bulk = app.upstream("bulk");
    assert_eq!((bulk.batches_created(), bulk.requests_for("/chat/completions")), (0, 3));
    let lines = output(&app, &key, &done).await;
    assert_charged_at(&app, &org, &id, &lines, "2", "8").await;
}

#[tokio::test]
async fn an_item_the_realtime_lane_would_refuse_gets_its_error_line_and_the_rest_run_natively() {
    let app = spawn_app_with(options()).await;
    let (org, key) = funded(&app).await;
    let mut lines: Vec<String> = (0..2).map(|i| line(&format!("ok-{i}"), "/v1/chat/completions", chat("fine", json!({})))).collect();
    lines.push(line("too-hot", "/v1/chat/completions", chat("x", json!({"temperature": 7}))));
    let file = upload(&app, &key, "batch", lines.join("\n")).await.body["id"].as_str().unwrap().to_owned();
    let created = post(&app, &key, "/v1/batches", &json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"})).await;
    assert_eq!(created.body["lane"]["kind"], "native", "{}", created.body);
    let id = created.body["id"].as_str().unwrap().to_owned();
    let done = wait_terminal(&app, &key, &id, Duration::from_secs(30)).await;
    assert_eq!(done["request_counts"], json!({"total": 3, "completed": 2, "failed": 1}), "{done}");
    assert_eq!(app.upstream("bulk").batches_created(), 1);
    let (_, errors) = content(&app, &key, done["error_file_id"].as_str().unwrap()).await;
    let error: Value = serde_json::from_str(errors.lines().next().unwrap()).unwrap();
    assert_eq!((error["custom_id"].as_str(), error["response"]["status_code"].as_u64()), (Some("too-hot"), Some(400)));
    assert!(error["response"]["body"]["error"]["message"].as_str().unwrap().contains("temperature"), "{error}");
    let lines = output(&app, &key, &done).await;
    assert_eq!(lines.len(), 2);
    let charges = wait_for_charges(&app, &org, 2).await;
    assert_eq!(charges.len(), 2, "the refused item is not charged");
}

#[tokio::test]
async fn an_anthropic_route_runs_on_message_batches_translated_to_chat_completions() {
    let mut options = options();
    let claude = r#"{ provider = "anthropic-main", model = "claude-mock", input_per_mtok = "3", output_per_mtok = "15", currency = "USD", batch_input_per_mtok = "1.5", batch_output_per_mtok = "7.5" }"#;
    options.extra_toml.push_str(&format!("\n[models.\"lanes/claude\"]\nroutes = [{claude}]\n"));
    let app = spawn_app_with(options).await;
    let (org, key) = funded(&app).await;
    let lines: Vec<String> = (0..2)
        .map(|i| {
            let body = json!({"model": "lanes/claude", "max_tokens": 16, "messages": [{"role": "user", "content": format!("question {i}")}]});
            line(&format!("c-{i}"), "/v1/chat/completions", body)
        })
        .collect();
    let file = upload(&app, &key, "batch", lines.join("\n")).await.body["id"].as_str().unwrap().to_owned();
    let created = post(&app, &key, "/v1/batches", &json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"})).await;
    assert_eq!(created.body["lane"], json!({"kind": "native", "route": "anthropic-main/claude-mock"}), "{}", created.body);
    let id = created.body["id"].as_str().unwrap().to_owned();
    let done = wait_terminal(&app, &key, &id, Duration::from_secs(30)).await;
    assert_eq!(done["request_counts"]["completed"], 2, "{done}");
    assert_eq!((app.mock.batches_created(), app.mock.requests_for("/messages")), (1, 0));
    let lines = output(&app, &key, &done).await;
    for l in &lines {
        let body = &l["response"]["body"];
        assert_eq!((body["object"].as_str(), body["model"].as_str()), (Some("chat.completion"), Some("lanes/claude")), "{l}");
        assert!(body["choices"][0]["message"]["content"].as_str().is_some_and(|t| !t.is_empty()), "{l}");
    }
    assert_charged_at(&app, &org, &id, &lines, "1.5", "7.5").await;
}

#[tokio::test]
async fn cancelling_a_native_lane_batch_cancels_the_providers_batch_and_charges_nothing() {
    let app = spawn_app_with(options()).await;
    let (org, key) = funded(&app).await;
    app.upstream("bulk").set_scenario(Scenario { batch_delay_ms: 60_000, ..Scenario::default() });
    let id = openai_batch(&app, &key, 2).await["id"].as_str().unwrap().to_owned();
    wait_submitted(&app, &org, &id).await;
    let cancelled = post(&app, &key, &format!("/v1/batches/{id}/cancel"), &json!({})).await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.body);
    let done = wait_terminal(&app, &key, &id, Duration::from_secs(30)).await;
    assert_eq!((done["status"].as_str(), done["request_counts"]["completed"].as_u64()), (Some("cancelled"), Some(0)), "{done}");
    let bulk = app.upstream("bulk");
    let deadline = Instant::now() + Duration::from_secs(5);
    while bulk.batches_cancelled() == 0 {
        assert!(Instant::now() < deadline, "the provider's batch was not cancelled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!((bulk.batches_created(), bulk.batches_cancelled(), bulk.requests_for("/chat/completions")), (1, 1, 0));
    let charges = app.store.entries(&org, None, 100).await.unwrap().into_iter().filter(|e| e.kind == "charge").count();
    assert_eq!(charges, 0);
}
