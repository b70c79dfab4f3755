//! `/v1/batches`: create (the OpenAI shape or BatchRouter's native one), list, get, cancel,
//! native results paging and signed artifact downloads. Batches belong to the
//! caller's organisation: another organisation's id is 404 and nothing changes.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use marga_store::{BatchRecord, ItemResult};
use serde::Deserialize;
use serde_json::{json, Value};

use super::extract::{parse_json, read_body};
use super::AppState;
use crate::accounts::Principal;
use crate::batch::create::{create as create_batch, store_error, CreateBatch};
use crate::batch::native;
use crate::batch::shapes::{batch_json, page};
use crate::error::ApiError;
use crate::pipeline::unix_now_ms;

fn caller(state: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let principal = state.admission.accounts.authenticate(headers)?;
    principal.require_inference()?;
    Ok(principal)
}

/// One endpoint, two shapes: OpenAI's (`endpoint` + `input_file_id`) or BatchRouter's native
/// one (`items` or `input_file_id`, with an `Idempotency-Key`), answered `{"batch": {…}}`.
pub async fn create(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let principal = caller(&state, &headers)?;
    let bytes = read_body(body, state.max_body).await?;
    let value: Value = parse_json(&bytes)?;
    if value.get("endpoint").is_some() {
        let request: CreateBatch = parse_json(&bytes)?;
        let batch = create_batch(&state, &principal, request).await?;
        return Ok(Json(batch_json(&batch)).into_response());
    }
    let key = native::idempotency_key(&headers)?;
    let (batch, replayed) = native::create(&state, &principal, key, value).await?;
    let status = if replayed { StatusCode::OK } else { StatusCode::CREATED };
    Ok((status, Json(json!({ "batch": native::batch_json(&batch, None) }))).into_response())
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    after: Option<String>,
    limit: Option<i64>,
}

pub async fn list(State(state): State<AppState>, headers: HeaderMap, Query(q): Query<ListQuery>) -> Result<Json<Value>, ApiError> {
    let principal = caller(&state, &headers)?;
    let limit = q.limit.unwrap_or(20).clamp(1, 100);
    let batches =
        state.batches.store.list_batches(&principal.org.id, q.after.as_deref(), limit + 1).await.map_err(store_error)?;
    Ok(Json(page(batches.iter().map(batch_json).collect(), limit as usize)))
}

#[derive(Debug, Deserialize)]
pub struct GetQuery {
    #[serde(default)]
    include_billing_receipt: bool,
}

pub async fn get(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<GetQuery>,
) -> Result<Json<Value>, ApiError> {
    let principal = caller(&state, &headers)?;
    let batch = own_batch(&state, &principal, &id).await?;
    if batch.endpoint != native::NATIVE {
        return Ok(Json(batch_json(&batch)));
    }
    let receipt = match q.include_billing_receipt && is_terminal(&batch) {
        true => Some(native::receipt(&all_results(&state, &batch.id).await?, principal.org.currency.code(), batch.rejected_lanes.as_deref())),
        false => None,
    };
    Ok(Json(native::batch_json(&batch, receipt)))
}

async fn own_batch(state: &AppState, principal: &Principal, id: &str) -> Result<BatchRecord, ApiError> {
    state.batches.store.get_batch(&principal.org.id, id).await.map_err(store_error)?.ok_or(ApiError::NotFound)
}

fn is_terminal(b: &BatchRecord) -> bool {
    matches!(b.status.as_str(), "completed" | "cancelled" | "failed" | "expired")
}

async fn all_results(state: &AppState, batch_id: &str) -> Result<Vec<ItemResult>, ApiError> {
    let mut all = Vec::new();
    loop {
        let after = all.last().map_or(-1, |r: &ItemResult| r.idx);
        let page = state.batches.store.item_results(batch_id, after, 1000).await.map_err(store_error)?;
        if page.is_empty() {
            return Ok(all);
        }
        all.extend(page);
    }
}

#[derive(Debug, Deserialize)]
pub struct ResultsQuery {
    limit: Option<i64>,
    cursor: Option<String>,
}

/// `GET /v1/batches/{id}/results?limit&cursor`: finished items in input order. The cursor is
/// the position after the last item returned, so pages are stable.
pub async fn results(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<ResultsQuery>,
) -> Result<Json<Value>, ApiError> {
    let principal = caller(&state, &headers)?;
    let batch = own_batch(&state, &principal, &id).await?;
    if !is_terminal(&batch) {
        let message = "results are available once the batch is completed".to_owned();
        return Err(ApiError::Conflict { code: "results_not_ready", message });
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let after = match q.cursor.as_deref() {
        None | Some("") => -1,
        Some(c) => c.strip_prefix("c_").and_then(|n| n.parse::<i64>().ok()).filter(|n| *n >= 0).ok_or_else(|| {
            ApiError::invalid("invalid `cursor`", Some("cursor".into()))
        })?,
    };
    let mut page = state.batches.store.item_results(&batch.id, after, limit + 1).await.map_err(store_error)?;
    let has_more = page.len() as i64 > limit;
    page.truncate(limit as usize);
    let next = if has_more { page.last().map(|r| format!("c_{}", r.idx)) } else { None };
    let data: Vec<Value> = page.iter().map(native::result_json).collect();
    Ok(Json(json!({ "object": "list", "data": data, "has_more": has_more, "next_cursor": next })))
}

/// How long an artifact URL stays valid.
const ARTIFACT_TTL_S: i64 = 3600;

#[derive(Debug, Deserialize)]
pub struct ArtifactQuery {
    #[serde(default)]
    expires: i64,
    #[serde(default)]
    signature: String,
}

/// `GET /v1/batches/{id}/artifact-url`: an expiring, HMAC-signed URL, served by Marga itself,
/// that downloads every result as JSONL without a key.
pub async fn artifact_url(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let principal = caller(&state, &headers)?;
    let batch = own_batch(&state, &principal, &id).await?;
    if !is_terminal(&batch) {
        let message = "the artifact is available once the batch is completed".to_owned();
        return Err(ApiError::Conflict { code: "results_not_ready", message });
    }
    let expires = unix_now_ms() / 1000 + ARTIFACT_TTL_S;
    let signature = native::sign(&state.batches.artifact_secret, &batch.id, expires);
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
    let scheme = headers.get("x-forwarded-proto").and_then(|h| h.to_str().ok()).filter(|p| *p == "https").unwrap_or("http");
    let url = format!("{scheme}://{host}/v1/batches/{}/artifact?expires={expires}&signature={signature}", batch.id);
    Ok(Json(json!({ "url": url, "expires_at": expires })))
}

/// The signed download itself: refused (403) when the signature does not match or it expired.
pub async fn artifact(State(state): State<AppState>, Path(id): Path<String>, Query(q): Query<ArtifactQuery>) -> Result<Response, ApiError> {
    native::verify(&state.batches.artifact_secret, &id, q.expires, &q.signature, unix_now_ms() / 1000)
        .map_err(|message| ApiError::Forbidden { message: message.to_owned() })?;
    let mut body = String::new();
    for r in all_results(&state, &id).await? {
        body.push_str(&native::result_json(&r).to_string());
        body.push('\n');
    }
    Ok(([(header::CONTENT_TYPE, "application/jsonl")], body).into_response())
}

/// Moves an in-progress batch to `cancelling`; the worker cancels its pending items, waits
/// for running ones, writes what finished and marks it `cancelled`.
pub async fn cancel(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let principal = caller(&state, &headers)?;
    let store = &state.batches.store;
    let batch = store.get_batch(&principal.org.id, &id).await.map_err(store_error)?.ok_or(ApiError::NotFound)?;
    let moved = store
        .set_batch_status(&batch.id, &["validating", "in_progress"], "cancelling", "cancelling_at_ms", unix_now_ms())
        .await
        .map_err(store_error)?;
    if !moved && !matches!(batch.status.as_str(), "cancelling" | "cancelled") {
        let message = format!("a batch that is {} cannot be cancelled", batch.status);
        return Err(ApiError::Conflict { code: "batch_not_cancellable", message });
    }
    state.batches.wake.notify_waiters();
    let batch = own_batch(&state, &principal, &id).await?;
    Ok(Json(if batch.endpoint == native::NATIVE { native::batch_json(&batch, None) } else { batch_json(&batch) }))
}

/// `POST /v1/quotes/model`: a free estimate from sample items (nothing is reserved).
pub async fn quote(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Result<Json<Value>, ApiError> {
    let principal = caller(&state, &headers)?;
    let bytes = read_body(body, state.max_body).await?;
    let request: crate::batch::quote::QuoteRequest = parse_json(&bytes)?;
    Ok(Json(crate::batch::quote::quote(&state, &principal, request)?))
}

/// `PUT /v1/auth/account/delivery-webhook {url, secret}`: the organisation's default webhook
/// for batches created without one (management keys).
pub async fn put_delivery_webhook(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Result<Json<Value>, ApiError> {
    let principal = state.admission.accounts.authenticate(&headers)?;
    principal.require_management()?;
    let bytes = read_body(body, state.max_body).await?;
    let mut target: crate::batch::webhook::Target = parse_json(&bytes)?;
    crate::batch::webhook::check(&target, state.batches.allow_private_webhooks)
        .await
        .map_err(|message| ApiError::Preflight { message: message.clone(), problems: vec![json!({"code": "unsafe_webhook_url", "message": message})] })?;
    target.secret = state.secrets.seal(&target.secret).map_err(|e| ApiError::Internal(e.into()))?;
    let stored = serde_json::to_string(&target).map_err(|e| ApiError::Internal(e.into()))?;
    let key = crate::batch::webhook::org_setting(&principal.org.id);
    state.batches.store.put_setting(&key, &stored).await.map_err(store_error)?;
    Ok(Json(json!({ "url": target.url, "updated": true })))
}
