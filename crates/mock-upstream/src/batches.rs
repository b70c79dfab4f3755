//! Fake batch APIs, kept in memory:
//!
//! * OpenAI: `POST /v1/files` (multipart, `purpose=batch`), `POST /v1/batches`,
//!   `GET /v1/batches/{id}` (`validating` → `in_progress` → `completed`),
//!   `GET /v1/files/{id}/content` (output lines `{id, custom_id, response: {status_code,
//!   request_id, body}, error}`; refused requests go to the error file).
//! * Anthropic: `POST /v1/messages/batches` (`requests: [{custom_id, params}]`),
//!   `GET /v1/messages/batches/{id}` (`processing_status` `in_progress` → `ended`,
//!   `request_counts`, `results_url`), `GET /v1/messages/batches/{id}/results` (JSONL
//!   `{custom_id, result: {type: succeeded, message} | {type: errored, error}}`).
//!
//! `POST /v1/batches/{id}/cancel` and `POST /v1/messages/batches/{id}/cancel` cancel a batch
//! that has not ended (no results; [`crate::MockUpstream::batches_cancelled`]).
//!
//! A batch ends `Scenario::batch_delay_ms` after its creation (0: at the first poll); its
//! answers are the same as the realtime routes' (and `Scenario::reply` at creation applies).
//! Creations (file uploads and batch creates) go through the failure gate; polls and
//! downloads do not.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::Response;
use bytes::Bytes;
use serde_json::{json, Value};

use crate::anthropic::{batch_message, Anthropic};
use crate::openai::{batch_chat, OpenAi};
use crate::respond::{self, Dialect};
use crate::{text, Kind, Shared};

/// One batch, of either API.
struct Batch {
    created: Instant,
    created_s: u64,
    delay_ms: u64,
    reply: Option<String>,
    /// `(custom_id, request body)` in input order.
    requests: Vec<(String, Value)>,
    input_file_id: String,
    /// Filled in when it ends: `(custom_id, Ok(answer) | Err(message))`.
    results: Option<Vec<(String, Result<Value, String>)>>,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    /// Cancelled before it ended: no results.
    cancelled: bool,
}

impl Batch {
    fn due(&self) -> bool {
        self.created.elapsed().as_millis() >= u128::from(self.delay_ms)
    }
}

/// The batch store of one mock.
#[derive(Default)]
pub(crate) struct Store {
    files: Mutex<HashMap<String, Vec<u8>>>,
    batches: Mutex<HashMap<String, Batch>>,
    pub(crate) created: std::sync::atomic::AtomicU64,
    pub(crate) cancelled: std::sync::atomic::AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `(name, body)` of each part of a `multipart/form-data` body.
fn multipart_parts(content_type: &str, body: &[u8]) -> Vec<(String, Vec<u8>)> {
    let Some(boundary) = content_type.split("boundary=").nth(1) else { return Vec::new() };
    let delimiter = format!("--{}", boundary.trim_matches('"'));
    let text = String::from_utf8_lossy(body);
    text.split(delimiter.as_str())
        .filter_map(|part| {
            let (head, data) = part.split_once("\r\n\r\n")?;
            let name = head.split("name=\"").nth(1)?.split('"').next()?.to_owned();
            Some((name, data.strip_suffix("\r\n").unwrap_or(data).as_bytes().to_vec()))
        })
        .collect()
}

fn bad_request<D: Dialect>(message: &str) -> Response {
    D::error(StatusCode::BAD_REQUEST, message)
}

fn not_found<D: Dialect>(what: &str) -> Response {
    D::error(StatusCode::NOT_FOUND, &format!("no such {what}"))
}

/// Records a poll or download and checks its credentials (no failure gate); `Some` is the
/// refusal.
fn refused<D: Dialect>(shared: &Shared, kind: Kind, uri: Uri, headers: HeaderMap) -> Option<Response> {
    let authorized = D::authorized(&headers, &uri);
    shared.record(kind, uri, headers, Bytes::new());
    (!authorized).then(D::auth_error)
}

/// `POST /v1/files`.
pub(crate) async fn upload(State(shared): State<Arc<Shared>>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    if let Err(refused) = respond::gate::<OpenAi>(&shared, Kind::Files, uri, headers, body.clone()).await {
        return refused;
    }
    let parts = multipart_parts(&content_type, &body);
    let field = |name: &str| parts.iter().find(|(n, _)| n == name).map(|(_, d)| d.clone());
    let (Some(purpose), Some(file)) = (field("purpose"), field("file")) else {
        return bad_request::<OpenAi>("a multipart body with `purpose` and `file` is required");
    };
    let id = text::next_id("file-mock-");
    let bytes = file.len();
    lock(&shared.batches.files).insert(id.clone(), file);
    let object = json!({
        "id": id, "object": "file", "bytes": bytes, "created_at": text::now_secs(),
        "filename": "batch.jsonl", "purpose": String::from_utf8_lossy(&purpose), "status": "processed",
    });
    respond::json(StatusCode::OK, &object)
}

/// `GET /v1/files/{id}/content`.
pub(crate) async fn file_content(State(shared): State<Arc<Shared>>, Path(id): Path<String>, uri: Uri, headers: HeaderMap) -> Response {
    if let Some(refused) = refused::<OpenAi>(&shared, Kind::Files, uri, headers) {
        return refused;
    }
    match lock(&shared.batches.files).get(&id) {
        Some(bytes) => respond::raw(StatusCode::OK, "application/octet-stream", Bytes::from(bytes.clone())),
        None => not_found::<OpenAi>("file"),
    }
}

/// The `(custom_id, body)` of each line of an OpenAI batch input file.
fn input_lines(file: &[u8]) -> Result<Vec<(String, Value)>, String> {
    let text = String::from_utf8_lossy(file);
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).map_err(|e| format!("line {}: {e}", n + 1))?;
        let custom_id = v["custom_id"].as_str().ok_or_else(|| format!("line {}: custom_id is required", n + 1))?;
        out.push((custom_id.to_owned(), v["body"].clone()));
    }
    Ok(out)
}

/// `POST /v1/batches`.
pub(crate) async fn create_openai(State(shared): State<Arc<Shared>>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let adm = match respond::admit::<OpenAi>(&shared, Kind::Batches, uri, headers, body).await {
        Ok(adm) => adm,
        Err(refused) => return refused,
    };
    let file_id = adm.body["input_file_id"].as_str().unwrap_or_default().to_owned();
    if adm.body["endpoint"].as_str() != Some("/v1/chat/completions") {
        return bad_request::<OpenAi>("this mock's batches take endpoint /v1/chat/completions");
    }
    let Some(file) = lock(&shared.batches.files).get(&file_id).cloned() else { return not_found::<OpenAi>("file") };
    let requests = match input_lines(&file) {
        Ok(r) if !r.is_empty() => r,
        Ok(_) => return bad_request::<OpenAi>("the input file holds no requests"),
        Err(message) => return bad_request::<OpenAi>(&message),
    };
    let id = text::next_id("batch_mock_");
    let batch = new_batch(&adm.active.scenario, requests, file_id);
    let object = openai_object(&id, &batch);
    shared.batches.created.fetch_add(1, Ordering::Relaxed);
    lock(&shared.batches.batches).insert(id, batch);
    respond::json(StatusCode::OK, &object)
}

fn new_batch(scenario: &crate::Scenario, requests: Vec<(String, Value)>, input_file_id: String) -> Batch {
    Batch {
        created: Instant::now(),
        created_s: text::now_secs(),
        delay_ms: scenario.batch_delay_ms,
        reply: scenario.reply.clone(),
        requests,
        input_file_id,
        results: None,
        output_file_id: None,
        error_file_id: None,
        cancelled: false,
    }
}

/// Ends a due batch: answers every request and (OpenAI) writes the output and error files.
fn advance(store: &Store, batch: &mut Batch, answer: fn(&Value, Option<&String>) -> Result<Value, String>, files: bool) {
    if batch.results.is_some() || batch.cancelled || !batch.due() {
        return;
    }
    let results: Vec<_> = batch.requests.iter().map(|(id, body)| (id.clone(), answer(body, batch.reply.as_ref()))).collect();
    if files {
        let (mut output, mut errors) = (Vec::new(), Vec::new());
        for (custom_id, result) in &results {
            let (status, body, sink) = match result {
                Ok(answer) => (200, answer.clone(), &mut output),
                Err(message) => {
                    let error = json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}});
                    (400, error, &mut errors)
                }
            };
            let line = json!({
                "id": text::next_id("batch_req_mock_"), "custom_id": custom_id,
                "response": {"status_code": status, "request_id": text::next_id("req_mock_"), "body": body}, "error": null,
            });
            sink.extend_from_slice(format!("{line}\n").as_bytes());
        }
        let mut stored = lock(&store.files);
        for (bytes, slot) in [(output, &mut batch.output_file_id), (errors, &mut batch.error_file_id)] {
            if !bytes.is_empty() {
                let id = text::next_id("file-mock-");
                stored.insert(id.clone(), bytes);
                *slot = Some(id);
            }
        }
    }
    batch.results = Some(results);
}

fn openai_object(id: &str, b: &Batch) -> Value {
    let total = b.requests.len();
    let (status, done, failed) = match &b.results {
        None if b.cancelled => ("cancelled", 0, 0),
        Some(r) => ("completed", r.iter().filter(|(_, x)| x.is_ok()).count(), r.iter().filter(|(_, x)| x.is_err()).count()),
        None if b.created.elapsed().as_millis() * 2 < u128::from(b.delay_ms) => ("validating", 0, 0),
        None => ("in_progress", 0, 0),
    };
    let ended = b.results.as_ref().map(|_| text::now_secs());
    json!({
        "id": id, "object": "batch", "endpoint": "/v1/chat/completions", "errors": null,
        "input_file_id": b.input_file_id, "completion_window": "24h", "status": status,
        "output_file_id": b.output_file_id, "error_file_id": b.error_file_id,
        "created_at": b.created_s, "in_progress_at": b.created_s, "expires_at": b.created_s + 86_400,
        "finalizing_at": ended, "completed_at": ended, "failed_at": null, "expired_at": null,
        "cancelling_at": null, "cancelled_at": null,
        "request_counts": {"total": total, "completed": done, "failed": failed}, "metadata": null,
    })
}

/// `GET /v1/batches/{id}`.
pub(crate) async fn get_openai(State(shared): State<Arc<Shared>>, Path(id): Path<String>, uri: Uri, headers: HeaderMap) -> Response {
    if let Some(refused) = refused::<OpenAi>(&shared, Kind::Batches, uri, headers) {
        return refused;
    }
    let mut batches = lock(&shared.batches.batches);
    let Some(batch) = batches.get_mut(&id) else { return not_found::<OpenAi>("batch") };
    advance(&shared.batches, batch, batch_chat, true);
    respond::json(StatusCode::OK, &openai_object(&id, batch))
}

/// `POST /v1/messages/batches`.
pub(crate) async fn create_anthropic(State(shared): State<Arc<Shared>>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let adm = match respond::admit::<Anthropic>(&shared, Kind::MessageBatches, uri, headers, body).await {
        Ok(adm) => adm,
        Err(refused) => return refused,
    };
    let Some(entries) = adm.body["requests"].as_array().filter(|r| !r.is_empty()) else {
        return bad_request::<Anthropic>("requests: at least one request is required");
    };
    let mut requests = Vec::with_capacity(entries.len());
    for entry in entries {
        let id = entry["custom_id"].as_str().unwrap_or_default();
        let valid = (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid || requests.iter().any(|(seen, _)| seen == id) {
            return bad_request::<Anthropic>(&format!("requests: custom_id `{id}` is invalid or used twice"));
        }
        requests.push((id.to_owned(), entry["params"].clone()));
    }
    let id = text::next_id("msgbatch_mock_");
    let batch = new_batch(&adm.active.scenario, requests, String::new());
    let object = anthropic_object(&id, &batch, &HeaderMap::new());
    shared.batches.created.fetch_add(1, Ordering::Relaxed);
    lock(&shared.batches.batches).insert(id, batch);
    respond::json(StatusCode::OK, &object)
}

/// Unix seconds as an RFC 3339 UTC timestamp (Anthropic's batch times), e.g.
/// `2026-12-02T04:19:00Z`.
fn rfc3339(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rest = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

fn anthropic_object(id: &str, b: &Batch, headers: &HeaderMap) -> Value {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("127.0.0.1");
    let (status, processing, succeeded, errored) = match &b.results {
        None if b.cancelled => ("ended", 0, 0, 0),
        Some(r) => ("ended", 0, r.iter().filter(|(_, x)| x.is_ok()).count(), r.iter().filter(|(_, x)| x.is_err()).count()),
        None => ("in_progress", b.requests.len(), 0, 0),
    };
    let ended = (b.results.is_some() || b.cancelled).then(|| rfc3339(text::now_secs()));
    let results_url = ended.as_ref().map(|_| format!("http://{host}/v1/messages/batches/{id}/results"));
    let canceled = if b.cancelled { b.requests.len() } else { 0 };
    json!({
        "id": id, "type": "message_batch", "processing_status": status,
        "request_counts": {"processing": processing, "succeeded": succeeded, "errored": errored, "canceled": canceled, "expired": 0},
        "created_at": rfc3339(b.created_s), "ended_at": ended, "expires_at": rfc3339(b.created_s + 86_400),
        "archived_at": null, "cancel_initiated_at": null, "results_url": results_url,
    })
}

/// `GET /v1/messages/batches/{id}`.
pub(crate) async fn get_anthropic(State(shared): State<Arc<Shared>>, Path(id): Path<String>, uri: Uri, headers: HeaderMap) -> Response {
    if let Some(refused) = refused::<Anthropic>(&shared, Kind::MessageBatches, uri, headers.clone()) {
        return refused;
    }
    let mut batches = lock(&shared.batches.batches);
    let Some(batch) = batches.get_mut(&id) else { return not_found::<Anthropic>("message batch") };
    advance(&shared.batches, batch, batch_message, false);
    respond::json(StatusCode::OK, &anthropic_object(&id, batch, &headers))
}

/// `GET /v1/messages/batches/{id}/results`.
pub(crate) async fn anthropic_results(State(shared): State<Arc<Shared>>, Path(id): Path<String>, uri: Uri, headers: HeaderMap) -> Response {
    if let Some(refused) = refused::<Anthropic>(&shared, Kind::MessageBatches, uri, headers) {
        return refused;
    }
    let batches = lock(&shared.batches.batches);
    let Some(batch) = batches.get(&id) else { return not_found::<Anthropic>("message batch") };
    let mut body = String::new();
    if batch.cancelled {
        for (custom_id, _) in &batch.requests {
            body.push_str(&json!({"custom_id": custom_id, "result": {"type": "canceled"}}).to_string());
            body.push('\n');
        }
    }
    let Some(results) = batch.results.as_ref() else { return respond::raw(StatusCode::OK, "application/binary", Bytes::from(body)) };
    for (custom_id, result) in results {
        let result = match result {
            Ok(message) => json!({"type": "succeeded", "message": message}),
            Err(message) => json!({"type": "errored", "error": {"type": "error", "error": {"type": "invalid_request_error", "message": message}}}),
        };
        body.push_str(&json!({"custom_id": custom_id, "result": result}).to_string());
        body.push('\n');
    }
    respond::raw(StatusCode::OK, "application/binary", Bytes::from(body))
}

/// Cancels a batch that has not ended; `None` when there is no such batch.
fn cancel(shared: &Shared, id: &str) -> Option<()> {
    let mut batches = lock(&shared.batches.batches);
    let batch = batches.get_mut(id)?;
    if batch.results.is_none() && !batch.cancelled {
        batch.cancelled = true;
        shared.batches.cancelled.fetch_add(1, Ordering::Relaxed);
    }
    Some(())
}

/// `POST /v1/batches/{id}/cancel`.
pub(crate) async fn cancel_openai(State(shared): State<Arc<Shared>>, Path(id): Path<String>, uri: Uri, headers: HeaderMap) -> Response {
    if let Some(refused) = refused::<OpenAi>(&shared, Kind::Batches, uri, headers) {
        return refused;
    }
    if cancel(&shared, &id).is_none() {
        return not_found::<OpenAi>("batch");
    }
    let batches = lock(&shared.batches.batches);
    match batches.get(&id) {
        Some(batch) => respond::json(StatusCode::OK, &openai_object(&id, batch)),
        None => not_found::<OpenAi>("batch"),
    }
}

/// `POST /v1/messages/batches/{id}/cancel`.
pub(crate) async fn cancel_anthropic(State(shared): State<Arc<Shared>>, Path(id): Path<String>, uri: Uri, headers: HeaderMap) -> Response {
    if let Some(refused) = refused::<Anthropic>(&shared, Kind::MessageBatches, uri, headers.clone()) {
        return refused;
    }
    if cancel(&shared, &id).is_none() {
        return not_found::<Anthropic>("message batch");
    }
    let batches = lock(&shared.batches.batches);
    match batches.get(&id) {
        Some(batch) => respond::json(StatusCode::OK, &anthropic_object(&id, batch, &headers)),
        None => not_found::<Anthropic>("message batch"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339(1_796_185_140), "2026-12-02T04:19:00Z");
    }
}
