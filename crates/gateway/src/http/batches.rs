//! `/v1/batches`: create (the OpenAI shape), list, get and cancel. Batches belong to the
//! caller's organisation: another organisation's id is 404 and nothing changes.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use serde_json::Value;

use super::extract::{parse_json, read_body};
use super::AppState;
use crate::accounts::Principal;
use crate::batch::create::{create as create_batch, store_error, CreateBatch};
use crate::batch::shapes::{batch_json, page};
use crate::error::ApiError;
use crate::pipeline::unix_now_ms;

fn caller(state: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let principal = state.admission.accounts.authenticate(headers)?;
    principal.require_inference()?;
    Ok(principal)
}

pub async fn create(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Result<Json<Value>, ApiError> {
    let principal = caller(&state, &headers)?;
    let bytes = read_body(body, state.max_body).await?;
    let request: CreateBatch = parse_json(&bytes)?;
    let batch = create_batch(&state, &principal, request).await?;
    Ok(Json(batch_json(&batch)))
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

pub async fn get(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let principal = caller(&state, &headers)?;
    let batch = state.batches.store.get_batch(&principal.org.id, &id).await.map_err(store_error)?.ok_or(ApiError::NotFound)?;
    Ok(Json(batch_json(&batch)))
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
    let batch = store.get_batch(&principal.org.id, &id).await.map_err(store_error)?.ok_or(ApiError::NotFound)?;
    Ok(Json(batch_json(&batch)))
}
