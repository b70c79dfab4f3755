//! Wire-level tests of the mock upstream: every format's happy paths,
//! tools, auth, failure injection, stream cuts and errors, embeddings,
//! counters, the control endpoints and the batch APIs, through a real HTTP client.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use base64::Engine as _;
use mock_upstream::{MockUpstream, Scenario};
use serde_json::{json, Value};

#[path = "wire/anthropic.rs"]
mod anthropic;
#[path = "wire/batches.rs"]
mod batches;
#[path = "wire/gemini.rs"]
mod gemini;
#[path = "wire/openai.rs"]
mod openai;
#[path = "wire/scenarios.rs"]
mod scenarios;

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

/// `data:` payloads of an SSE body (either separator style).
fn sse_data(body: &str) -> Vec<String> {
    body.replace("\r\n", "\n")
        .split("\n\n")
        .filter_map(|ev| {
            ev.lines()
                .find_map(|l| l.strip_prefix("data: "))
                .map(str::to_owned)
        })
        .collect()
}

/// `(event name, data json)` pairs of an Anthropic SSE body.
fn sse_events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter(|ev| !ev.trim().is_empty())
        .map(|ev| {
            let name = ev
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap()
                .to_owned();
            let data = ev.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
            (name, serde_json::from_str(data).unwrap())
        })
        .collect()
}

async fn openai_post(m: &MockUpstream, path: &str, body: Value) -> reqwest::Response {
    client()
        .post(format!("{}{path}", m.openai_base()))
        .bearer_auth("sk-test")
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn anthropic_post(m: &MockUpstream, body: Value) -> reqwest::Response {
    client()
        .post(format!("{}/messages", m.anthropic_base()))
        .header("x-api-key", "sk-ant")
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn gemini_post(m: &MockUpstream, method_and_query: &str, body: Value) -> reqwest::Response {
    client()
        .post(format!(
            "{}/models/gemini-test:{method_and_query}",
            m.gemini_base()
        ))
        .header("x-goog-api-key", "g-key")
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn chat_body(text: &str) -> Value {
    json!({ "model": "gpt-test", "messages": [
        { "role": "system", "content": "Be brief" },
        { "role": "user", "content": text },
    ]})
}

fn weather_tool() -> Value {
    json!([{ "type": "function", "function": { "name": "get_weather", "parameters": { "type": "object" } } }])
}

fn anthropic_body(text: &str) -> Value {
    json!({ "model": "claude-test", "max_tokens": 100, "system": "Be brief",
            "messages": [{ "role": "user", "content": [{ "type": "text", "text": text }] }] })
}

fn gemini_body(text: &str) -> Value {
    json!({ "systemInstruction": { "parts": [{ "text": "Be brief" }] },
            "contents": [{ "role": "user", "parts": [{ "text": text }] }] })
}
