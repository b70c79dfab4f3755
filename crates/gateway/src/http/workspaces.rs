//! Workspaces: groups of keys within an organisation, each with an optional monthly budget
//! (`budget_exceeded` once its keys' charges this month reach it). `GET/POST /me/workspaces`,
//! `PATCH/DELETE /me/workspaces/{id}`; management keys only (changing: owners and admins),
//! scoped to the caller's org.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use marga_store::WorkspaceRecord;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::extract::{parse_json, read_body};
use super::keys::{internal, iso, Data};
use super::money_json::exact;
use super::AppState;
use crate::accounts::{Action, Principal};
use crate::error::ApiError;
use crate::money::{nanos_to_decimal, parse_nanos};
use crate::pipeline::unix_now_ms;

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkspaceBody {
    #[serde(default)]
    name: Option<String>,
    /// A decimal in the organisation's currency, or `null` for none.
    #[serde(default, alias = "monthly_budget_inr")]
    monthly_budget: Option<Value>,
}

#[derive(Serialize)]
struct WorkspaceView {
    id: String,
    name: String,
    monthly_budget: Option<Box<serde_json::value::RawValue>>,
    currency: &'static str,
    created_at: Value,
}

fn view(ws: &WorkspaceRecord, principal: &Principal) -> WorkspaceView {
    WorkspaceView {
        id: ws.id.clone(),
        name: ws.name.clone(),
        monthly_budget: ws.monthly_budget_nanos.and_then(|n| exact(nanos_to_decimal(n))),
        currency: principal.org.currency.code(),
        created_at: iso(ws.created_at_ms),
    }
}

fn budget(value: &Value) -> Result<Option<i64>, ApiError> {
    let text = match value {
        Value::Null => return Ok(None),
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    };
    parse_nanos(&text)
        .filter(|n| *n >= 0)
        .map(Some)
        .ok_or_else(|| ApiError::invalid("`monthly_budget` must be a non-negative amount", Some("monthly_budget".into())))
}

/// The caller, allowed `action` (reading: any member; changing: owners and admins).
fn manager(state: &AppState, headers: &HeaderMap, action: Action) -> Result<Principal, ApiError> {
    let principal = state.admission.accounts.authenticate(headers)?;
    principal.require(action)?;
    Ok(principal)
}

async fn own(state: &AppState, principal: &Principal, id: &str) -> Result<WorkspaceRecord, ApiError> {
    let all = state.admission.accounts.repo().list_workspaces(&principal.org.id).await.map_err(internal)?;
    all.into_iter().find(|w| w.id == id).ok_or(ApiError::NotFound)
}

pub async fn list(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let principal = manager(&state, &headers, Action::ReadOrg)?;
    let all = state.admission.accounts.repo().list_workspaces(&principal.org.id).await.map_err(internal)?;
    Ok(Json(Data { data: all.iter().map(|w| view(w, &principal)).collect::<Vec<_>>() }).into_response())
}

pub async fn create(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let principal = manager(&state, &headers, Action::ManageWorkspaces)?;
    let body: WorkspaceBody = parse_json(&read_body(body, state.max_body).await?)?;
    let name = body.name.filter(|n| !n.trim().is_empty()).ok_or_else(|| ApiError::invalid("`name` is required", Some("name".into())))?;
    let ws = WorkspaceRecord {
        id: format!("ws_{}", uuid::Uuid::now_v7().simple()),
        org_id: principal.org.id.clone(),
        name,
        monthly_budget_nanos: body.monthly_budget.as_ref().map(budget).transpose()?.flatten(),
        created_at_ms: unix_now_ms(),
    };
    state.admission.accounts.repo().create_workspace(&ws).await.map_err(internal)?;
    state.admission.accounts.note_workspace(Some(ws.clone()), None);
    Ok((StatusCode::CREATED, Json(Data { data: view(&ws, &principal) })).into_response())
}

pub async fn update(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = manager(&state, &headers, Action::ManageWorkspaces)?;
    let body: WorkspaceBody = parse_json(&read_body(body, state.max_body).await?)?;
    let mut ws = own(&state, &principal, &id).await?;
    if let Some(name) = body.name {
        ws.name = name;
    }
    if let Some(value) = &body.monthly_budget {
        ws.monthly_budget_nanos = budget(value)?;
    }
    state.admission.accounts.repo().update_workspace(&ws).await.map_err(internal)?;
    state.admission.accounts.note_workspace(Some(ws.clone()), None);
    Ok(Json(Data { data: view(&ws, &principal) }).into_response())
}

pub async fn delete(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    let principal = manager(&state, &headers, Action::ManageWorkspaces)?;
    let deleted = state.admission.accounts.repo().delete_workspace(&principal.org.id, &id).await.map_err(internal)?;
    if !deleted {
        return Err(ApiError::NotFound);
    }
    state.admission.accounts.note_workspace(None, Some(&id));
    Ok(Json(serde_json::json!({ "deleted": true })).into_response())
}
