//! BatchRouter's native batches on the same store and worker: `POST /v1/batches` with inline
//! `items` (or an `input_file_id` of item lines) and a required `Idempotency-Key`, the native
//! batch object, results paging with a stable cursor, and signed artifact URLs.
//!
//! An item is `{customer_item_id, operation: responses | embeddings, model, input}`; it is
//! stored as `{"endpoint", "body"}` for the worker (`responses` → `/v1/chat/completions`,
//! `embeddings` → `/v1/embeddings`), so it runs through exactly the same pipeline as an
//! OpenAI batch item. The batch's `endpoint` is [`NATIVE`].

use std::collections::HashSet;

use hmac::{Hmac, Mac};
use marga_store::{BatchRecord, ItemResult, NewItem};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::create::{item_max_cost, store_error};
use super::lanes::Tally;
use crate::accounts::Principal;
use crate::error::ApiError;
use crate::http::AppState;
use crate::money::Money;
use crate::pipeline::unix_now_ms;

/// The `endpoint` of native batches.
pub const NATIVE: &str = "native";
/// Most preflight problems reported at once.
const MAX_PROBLEMS: usize = 20;

/// One native item, as sent.
#[derive(Debug, Deserialize)]
pub struct NativeItem {
    pub customer_item_id: String,
    #[serde(default = "responses")]
    pub operation: String,
    pub model: String,
    pub input: Value,
}

fn responses() -> String {
    "responses".to_owned()
}

/// The body of a native create, as far as Marga reads it.
#[derive(Debug, Deserialize)]
pub struct CreateNative {
    #[serde(default)]
    pub items: Option<Vec<Value>>,
    #[serde(default)]
    pub input_file_id: Option<String>,
    #[serde(default)]
    pub metadata: Option<serde_json::Map<String, Value>>,
    /// This batch's delivery webhook (overrides the organisation's default).
    #[serde(default)]
    pub webhook: Option<super::webhook::Target>,
    /// How long the batch may take (`<n>h` or `<n>m`, at most and by default `24h`): a
    /// window shorter than 24 h rules out providers' native batch lanes.
    #[serde(default)]
    pub completion_window: Option<String>,
}

/// The stored form of an item: the endpoint and request body the worker runs.
pub fn to_request(item: &NativeItem) -> Result<(String, Value), String> {
    let mut body = match &item.input {
        Value::Object(map) => map.clone(),
        Value::String(text) => serde_json::Map::from_iter([("input".to_owned(), Value::String(text.clone()))]),
        _ => return Err("`input` must be an object".to_owned()),
    };
    body.insert("model".to_owned(), Value::String(item.model.clone()));
    match item.operation.as_str() {
        "responses" => {
            if !body.contains_key("messages") {
                let Some(text) = body.remove("input") else { return Err("`input` needs `messages` or `input`".to_owned()) };
                let content = if text.is_string() { text } else { Value::String(text.to_string()) };
                body.insert("messages".to_owned(), json!([{"role": "user", "content": content}]));
            }
            Ok(("/v1/chat/completions".to_owned(), Value::Object(body)))
        }
        "embeddings" => {
            if !body.contains_key("input") {
                return Err("`input.input` is required for embeddings".to_owned());
            }
            Ok(("/v1/embeddings".to_owned(), Value::Object(body)))
        }
        other => Err(format!("unsupported operation \"{other}\" (responses or embeddings)")),
    }
}

/// Reads the stored form back: (endpoint, body).
pub fn from_stored(stored: &str) -> Option<(String, String)> {
    let v: Value = serde_json::from_str(stored).ok()?;
    Some((v["endpoint"].as_str()?.to_owned(), v["body"].to_string()))
}

/// The `Idempotency-Key`: required, 8–128 printable characters.
pub fn idempotency_key(headers: &axum::http::HeaderMap) -> Result<String, ApiError> {
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::trim).unwrap_or_default();
    if !(8..=128).contains(&key.len()) {
        let message = "the `Idempotency-Key` header is required (8 to 128 characters)";
        return Err(ApiError::InvalidRequest { message: message.to_owned(), param: None, code: "idempotency_key_required" });
    }
    Ok(key.to_owned())
}

/// What a batch stores to recognise a replay of the create that made it.
struct RequestHash {
    /// Stored: the body's keyed fingerprint ([`crate::secrets::Secrets::fingerprint`]). The
    /// body holds the webhook's secret; a plain hash would let whoever reads the database guess
    /// a weak secret offline.
    keyed: String,
    /// The body's plain SHA-256, which batches created before hashes were keyed stored. Still
    /// accepted when comparing, so that a create retried across the upgrade gets its batch back
    /// rather than a 409; comparing with it reveals nothing those rows do not already hold, and
    /// it is never stored any more.
    legacy: String,
}

impl RequestHash {
    fn of(state: &AppState, body: &Value) -> RequestHash {
        let text = body.to_string();
        RequestHash { keyed: state.secrets.fingerprint(text.as_bytes()), legacy: hex::encode(Sha256::digest(text.as_bytes())) }
    }

    fn matches(&self, stored: Option<&str>) -> bool {
        stored.is_some_and(|stored| stored == self.keyed || stored == self.legacy)
    }
}

/// Creates a native batch, or returns the one this key already created (`true`: a replay).
pub async fn create(state: &AppState, principal: &Principal, key: String, body: Value) -> Result<(BatchRecord, bool), ApiError> {
    let hash = RequestHash::of(state, &body);
    if let Some(existing) = replay(state, principal, &key, &hash).await? {
        return Ok((existing, true));
    }
    let request: CreateNative = serde_json::from_value(body)
        .map_err(|e| ApiError::invalid(format!("invalid request body: {e}"), None))?;
    super::create::check_metadata(request.metadata.as_ref())?;
    if let Some(target) = &request.webhook {
        super::webhook::check(target, state.batches.allow_private_webhooks)
            .await
            .map_err(|message| preflight(vec![json!({"code": "unsafe_webhook_url", "message": message})]))?;
    }
    let window = request.completion_window.clone().unwrap_or_else(|| super::create::COMPLETION_WINDOW.to_owned());
    let window_ms = super::lanes::parse_window(&window)?;
    let (items, file_id, max_cost, lanes) = gather(state, principal, &request).await?;
    let choice = super::create::choose_lane(lanes.as_ref(), window_ms);
    // Sealed before anything is reserved: stored sealed, opened only to sign a delivery.
    let webhook_secret = request.webhook.as_ref().map(|w| state.secrets.seal(&w.secret)).transpose().map_err(|e| ApiError::Internal(e.into()))?;
    let now = unix_now_ms();
    let id = format!("batch_{}", uuid::Uuid::now_v7().simple());
    let until = now + window_ms + super::create::LEASE_MARGIN_MS;
    let lease = state.admission.reserve_batch(principal, max_cost, &id, until).await?;
    let batch = BatchRecord {
        id,
        org_id: principal.org.id.clone(),
        key_id: principal.key.id.clone(),
        endpoint: NATIVE.to_owned(),
        input_file_id: file_id.unwrap_or_default(),
        completion_window: window,
        metadata: request.metadata.map(|m| Value::Object(m).to_string()),
        status: "in_progress".to_owned(),
        total: items.len() as i64,
        created_at_ms: now,
        in_progress_at_ms: Some(now),
        expires_at_ms: now + window_ms,
        idempotency_key: Some(key.clone()),
        request_hash: Some(hash.keyed.clone()),
        webhook_url: request.webhook.as_ref().map(|w| w.url.clone()),
        webhook_secret,
        credit_lease_id: lease,
        lane: choice.lane,
        lane_route: choice.route,
        rejected_lanes: choice.rejected,
        ..BatchRecord::default()
    };
    store_or_replay(state, principal, batch, &items, &hash).await
}

/// Stores the new batch; when a concurrent create with the same key won the unique index,
/// gives the credit lease back and returns that batch (`true`: a replay).
async fn store_or_replay(
    state: &AppState,
    principal: &Principal,
    batch: BatchRecord,
    items: &[NewItem],
    hash: &RequestHash,
) -> Result<(BatchRecord, bool), ApiError> {
    let Err(e) = state.batches.store.create_batch(&batch, items).await else {
        state.batches.wake.notify_waiters();
        return Ok((batch, false));
    };
    if let Some(lease) = &batch.credit_lease_id {
        let _ = state.admission.ledger.repo().close_lease(lease).await;
    }
    let key = batch.idempotency_key.unwrap_or_default();
    match replay(state, principal, &key, hash).await? {
        Some(existing) => Ok((existing, true)),
        None => Err(store_error(e)),
    }
}

async fn replay(state: &AppState, principal: &Principal, key: &str, hash: &RequestHash) -> Result<Option<BatchRecord>, ApiError> {
    let found = state.batches.store.find_batch_by_key(&principal.org.id, key).await.map_err(store_error)?;
    match found {
        Some(b) if hash.matches(b.request_hash.as_deref()) => Ok(Some(b)),
        Some(_) => Err(ApiError::Conflict {
            code: "idempotency_key_reused",
            message: "this Idempotency-Key was used with a different request".to_owned(),
        }),
        None => Ok(None),
    }
}

fn preflight(problems: Vec<Value>) -> ApiError {
    let message = match problems.first() {
        Some(first) => format!("the batch failed preflight: {}", first["message"].as_str().unwrap_or("invalid input")),
        None => "the batch failed preflight".to_owned(),
    };
    ApiError::Preflight { message, problems }
}

/// What a native create gathered: items, input file id, maximum cost and lane tally.
type Gathered = (Vec<NewItem>, Option<String>, Money, Option<Tally>);

/// The items (checked: every problem found, up to [`MAX_PROBLEMS`], is reported at once),
/// the input file id, if any, the batch's maximum cost and its lane tally.
async fn gather(state: &AppState, principal: &Principal, req: &CreateNative) -> Result<Gathered, ApiError> {
    let raw: Vec<Value> = match (&req.items, &req.input_file_id) {
        (Some(items), None) => items.clone(),
        (None, Some(id)) => read_file_items(state, principal, id).await?,
        _ => {
            let message = "send exactly one of `items` and `input_file_id`";
            return Err(preflight(vec![json!({"code": "items_xor_input_file", "message": message})]));
        }
    };
    if raw.is_empty() || raw.len() > state.batches.settings.max_items {
        let message = format!("a batch holds 1 to {} items", state.batches.settings.max_items);
        return Err(preflight(vec![json!({"code": "item_count", "message": message})]));
    }
    let mut problems = Vec::new();
    let mut items = Vec::with_capacity(raw.len());
    let mut seen = HashSet::new();
    let mut max_cost = Money::zero(principal.org.currency);
    let mut lanes = None;
    for (index, value) in raw.into_iter().enumerate() {
        match check_item(state, principal, value, &mut seen, &mut lanes) {
            Ok((item, cost)) => {
                max_cost.amount += state.registry.fx.convert(cost, principal.org.currency).amount;
                items.push(item);
            }
            Err(message) if problems.len() < MAX_PROBLEMS => problems.push(json!({"item": index, "code": "invalid_item", "message": message})),
            Err(_) => {}
        }
    }
    if !problems.is_empty() {
        return Err(preflight(problems));
    }
    Ok((items, req.input_file_id.clone(), max_cost, lanes))
}

fn check_item(
    state: &AppState,
    principal: &Principal,
    value: Value,
    seen: &mut HashSet<String>,
    lanes: &mut Option<Tally>,
) -> Result<(NewItem, Money), String> {
    let item: NativeItem = serde_json::from_value(value).map_err(|e| format!("not an item: {e}"))?;
    if item.customer_item_id.is_empty() || item.customer_item_id.len() > super::files::MAX_CUSTOM_ID {
        return Err("`customer_item_id` must be 1 to 512 bytes".to_owned());
    }
    if !seen.insert(item.customer_item_id.clone()) {
        return Err(format!("`customer_item_id` \"{}\" is used twice", item.customer_item_id));
    }
    let (endpoint, body) = to_request(&item)?;
    let body_text = body.to_string();
    let cost = item_max_cost(state, principal, &endpoint, &body_text, lanes).map_err(|e| format!("item {}: {e}", item.customer_item_id))?;
    let stored = json!({"endpoint": endpoint, "body": body}).to_string();
    Ok((NewItem { custom_id: item.customer_item_id, body: stored }, cost))
}

async fn read_file_items(state: &AppState, principal: &Principal, id: &str) -> Result<Vec<Value>, ApiError> {
    let file = state.batches.store.get_file(&principal.org.id, id).await.map_err(store_error)?;
    let Some(file) = file.filter(|f| f.purpose == "batch") else {
        let message = format!("no batch input file `{id}`");
        return Err(preflight(vec![json!({"code": "input_file_not_found", "message": message})]));
    };
    let text = tokio::fs::read_to_string(state.batches.path_of(&file.id)).await.map_err(super::files::io_error)?;
    let mut values = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let value = serde_json::from_str(line).map_err(|e| {
            preflight(vec![json!({"code": "bad_jsonl", "line": n + 1, "message": format!("line {}: {e}", n + 1)})])
        })?;
        values.push(value);
    }
    Ok(values)
}

/// The native status of a stored batch.
fn native_status(b: &BatchRecord) -> &'static str {
    match b.status.as_str() {
        // On a provider's native lane, submitted and waiting for the provider's batch.
        "in_progress" if b.completed + b.failed == 0 && b.native_batch_id.is_some() => "dispatched",
        "in_progress" if b.completed + b.failed == 0 => "queued",
        "in_progress" | "cancelling" => "processing",
        "finalizing" => "completing",
        "completed" => "completed",
        "cancelled" => "cancelled",
        "failed" => "failed",
        _ => "expired",
    }
}

pub fn batch_json(b: &BatchRecord, receipt: Option<Value>) -> Value {
    let mut out = json!({
        "id": b.id,
        "object": "batch",
        "status": native_status(b),
        "item_count": b.total,
        "items_completed": b.completed,
        "items_failed": b.failed,
        "created_at": super::secs(b.created_at_ms),
        "completed_at": b.completed_at_ms.or(b.cancelled_at_ms).map(super::secs),
        "sla_deadline": super::secs(b.expires_at_ms),
        "sla_tier": "standard",
        "routing_mode": "cheapest",
        "lane": super::shapes::lane_json(b),
        "input_file_id": (!b.input_file_id.is_empty()).then_some(&b.input_file_id),
        "metadata": b.metadata.as_deref().and_then(|m| serde_json::from_str::<Value>(m).ok()),
    });
    if let (Some(receipt), Some(map)) = (receipt, out.as_object_mut()) {
        map.insert("billing_receipt".to_owned(), receipt);
    }
    out
}

/// One result in the native shape.
pub fn result_json(r: &ItemResult) -> Value {
    let line: Value = serde_json::from_str(&r.result).unwrap_or(Value::Null);
    let body = &line["response"]["body"];
    json!({
        "customer_item_id": line["custom_id"],
        "status": if r.is_error { "failed" } else { "succeeded" },
        "status_code": line["response"]["status_code"],
        "response": if r.is_error { Value::Null } else { body.clone() },
        "error": if r.is_error { body["error"].clone() } else { Value::Null },
    })
}

/// The billing receipt: what the batch's items cost, per lane (model) that ran them, and the
/// lanes not taken with the reason (as decided at creation).
pub fn receipt(results: &[ItemResult], currency: &str, rejected_lanes: Option<&str>) -> Value {
    let mut total = rust_decimal::Decimal::ZERO;
    let mut lanes: std::collections::BTreeMap<String, (u64, rust_decimal::Decimal)> = Default::default();
    for r in results.iter().filter(|r| !r.is_error) {
        let line: Value = serde_json::from_str(&r.result).unwrap_or(Value::Null);
        let body = &line["response"]["body"];
        let cost: rust_decimal::Decimal = body["usage"]["cost"].to_string().trim_matches('"').parse().unwrap_or_default();
        total += cost;
        let lane = lanes.entry(body["model"].as_str().unwrap_or("unknown").to_owned()).or_default();
        lane.0 += 1;
        lane.1 += cost;
    }
    let provider_lanes: Vec<Value> =
        lanes.into_iter().map(|(model, (items, cost))| json!({"model": model, "items": items, "cost": cost.normalize().to_string()})).collect();
    let rejected: Value = rejected_lanes.and_then(|r| serde_json::from_str(r).ok()).unwrap_or_else(|| json!([]));
    json!({"currency": currency, "total_cost": total.normalize().to_string(), "provider_lanes": provider_lanes, "rejected_lanes": rejected})
}

/// The signature of an artifact URL: hex HMAC-SHA256 of `<batch id>.<expires>`.
pub fn sign(secret: &[u8], batch_id: &str, expires: i64) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(format!("{batch_id}.{expires}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Checks an artifact URL's signature in constant time, and its expiry.
pub fn verify(secret: &[u8], batch_id: &str, expires: i64, signature: &str, now_s: i64) -> Result<(), &'static str> {
    if now_s > expires {
        return Err("this download link has expired");
    }
    let Ok(given) = hex::decode(signature) else { return Err("invalid download link signature") };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else { return Err("invalid download link signature") };
    mac.update(format!("{batch_id}.{expires}").as_bytes());
    mac.verify_slice(&given).map_err(|_| "invalid download link signature")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn signatures_verify_and_refuse_tampering_and_expiry() {
        let secret = b"0123456789abcdef";
        let sig = sign(secret, "batch_1", 1000);
        assert_eq!(verify(secret, "batch_1", 1000, &sig, 999), Ok(()));
        assert!(verify(secret, "batch_2", 1000, &sig, 999).is_err(), "another batch");
        assert!(verify(secret, "batch_1", 2000, &sig, 999).is_err(), "a longer expiry");
        assert!(verify(b"another secret!!", "batch_1", 1000, &sig, 999).is_err());
        assert_eq!(verify(secret, "batch_1", 1000, &sig, 1001), Err("this download link has expired"));
    }

    #[test]
    fn items_become_endpoint_requests() {
        let item = |op: &str, input: Value| NativeItem { customer_item_id: "a".into(), operation: op.into(), model: "m".into(), input };
        let (ep, body) = to_request(&item("responses", json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}))).unwrap();
        assert_eq!((ep.as_str(), &body["model"], &body["max_tokens"]), ("/v1/chat/completions", &json!("m"), &json!(5)));
        let (_, body) = to_request(&item("responses", json!({"input": "hello"}))).unwrap();
        assert_eq!(body["messages"], json!([{"role": "user", "content": "hello"}]));
        let (ep, body) = to_request(&item("embeddings", json!({"input": "x"}))).unwrap();
        assert_eq!((ep.as_str(), &body["input"]), ("/v1/embeddings", &json!("x")));
        assert!(to_request(&item("vision", json!({}))).is_err());
    }
}
