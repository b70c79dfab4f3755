//! Guardrail assignments (OpenRouter): a guardrail applies to the keys it is assigned to and
//! to every key of the members it is assigned to. A key, and a member, holds at most one
//! guardrail: assigning replaces. Both are enforced at admission from the in-memory accounts
//! cache (no database read per request); a change reaches every instance within a refresh.
//!
//! - `POST /v1/guardrails/{id}/keys {key_hashes}` and `…/keys/remove` (also under
//!   `…/assignments/keys`) → `{assigned_count}` / `{unassigned_count}`;
//! - `POST /v1/guardrails/{id}/members {member_user_ids}` and `…/members/remove` (also under
//!   `…/assignments/members`);
//! - `GET /v1/guardrails/{id}/assignments/keys|members` and `GET /v1/guardrails/assignments/
//!   keys|members` (every guardrail of the org) → `{data, total_count}`, `offset`/`limit` (≤ 100).
//!
//! Ids of another organisation (guardrail, key or member) change nothing: the guardrail answers
//! 404, foreign keys and members are not counted.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::extract::{parse_json, read_body};
use super::guardrails::{manager, own};
use super::keys::{internal, iso};
use super::AppState;
use crate::accounts::{Action, Principal};
use crate::error::ApiError;
use crate::pipeline::unix_now_ms;

/// Ids per assignment request.
const MAX_IDS: usize = 1_000;
/// Rows per listing page.
const MAX_PAGE: usize = 100;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyHashes {
    key_hashes: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberIds {
    #[serde(alias = "user_ids")]
    member_user_ids: Vec<String>,
}

fn bounded(ids: Vec<String>, param: &str) -> Result<Vec<String>, ApiError> {
    if ids.len() > MAX_IDS || ids.iter().any(|id| id.len() > 200) {
        return Err(ApiError::invalid(format!("`{param}` takes at most {MAX_IDS} ids"), Some(param.to_owned())));
    }
    Ok(ids)
}

fn counted(assigned: bool, changed: u64) -> Response {
    let field = if assigned { "assigned_count" } else { "unassigned_count" };
    Json(json!({ field: changed })).into_response()
}

async fn set_keys(state: AppState, headers: HeaderMap, id: String, body: Body, assigned: bool) -> Result<Response, ApiError> {
    let principal = manager(&state, &headers, Action::ManageGuardrails)?;
    let body: KeyHashes = parse_json(&read_body(body, state.max_body).await?)?;
    let ids = bounded(body.key_hashes, "key_hashes")?;
    own(&state, &principal, &id).await?;
    let repo = state.admission.accounts.repo();
    let changed = repo.set_guardrail_keys(&principal.org.id, &id, &ids, assigned).await.map_err(internal)?;
    state.admission.accounts.refresh_guardrails().await.map_err(internal)?;
    Ok(counted(assigned, changed))
}

async fn set_members(state: AppState, headers: HeaderMap, id: String, body: Body, assigned: bool) -> Result<Response, ApiError> {
    let principal = manager(&state, &headers, Action::ManageGuardrails)?;
    let body: MemberIds = parse_json(&read_body(body, state.max_body).await?)?;
    let ids = bounded(body.member_user_ids, "member_user_ids")?;
    own(&state, &principal, &id).await?;
    let members = state.admission.accounts.members();
    let changed = members
        .set_guardrail_members(&principal.org.id, &id, &ids, assigned, unix_now_ms())
        .await
        .map_err(internal)?;
    state.admission.accounts.refresh_guardrails().await.map_err(internal)?;
    Ok(counted(assigned, changed))
}

pub async fn assign_keys(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>, body: Body) -> Result<Response, ApiError> {
    set_keys(state, headers, id, body, true).await
}

pub async fn unassign_keys(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>, body: Body) -> Result<Response, ApiError> {
    set_keys(state, headers, id, body, false).await
}

pub async fn assign_members(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>, body: Body) -> Result<Response, ApiError> {
    set_members(state, headers, id, body, true).await
}

pub async fn unassign_members(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>, body: Body) -> Result<Response, ApiError> {
    set_members(state, headers, id, body, false).await
}

/// `offset` and `limit` (1 to [`MAX_PAGE`], default [`MAX_PAGE`]).
fn page(query: &HashMap<String, String>) -> Result<(usize, usize), ApiError> {
    let number = |name: &str, default: usize, max: usize| -> Result<usize, ApiError> {
        match query.get(name) {
            None => Ok(default),
            Some(text) => text
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= max && (name == "offset" || *n >= 1))
                .ok_or_else(|| ApiError::invalid(format!("`{name}` must be an integer from {} to {max}", usize::from(name != "offset")), Some(name.to_owned()))),
        }
    };
    Ok((number("offset", 0, 1_000_000)?, number("limit", MAX_PAGE, MAX_PAGE)?))
}

#[derive(Serialize)]
struct Listing {
    data: Vec<Value>,
    total_count: usize,
}

fn paged(rows: Vec<Value>, (offset, limit): (usize, usize)) -> Response {
    let total_count = rows.len();
    Json(Listing { data: rows.into_iter().skip(offset).take(limit).collect(), total_count }).into_response()
}

async fn key_rows(state: &AppState, principal: &Principal, only: Option<&str>) -> Result<Vec<Value>, ApiError> {
    let repo = state.admission.accounts.repo();
    let keys: HashMap<String, marga_store::KeyRecord> =
        repo.list_keys(&principal.org.id).await.map_err(internal)?.into_iter().map(|k| (k.id.clone(), k)).collect();
    let rows = repo.all_guardrail_keys().await.map_err(internal)?;
    Ok(rows
        .into_iter()
        .filter(|(g, _)| only.is_none_or(|o| o == g))
        .filter_map(|(g, k)| {
            let key = keys.get(&k)?;
            Some(json!({
                "id": format!("{g}:{k}"), "key_hash": k, "key_name": key.name, "key_label": key.label,
                "guardrail_id": g, "assigned_by": null, "created_at": null,
            }))
        })
        .collect())
}

async fn member_rows(state: &AppState, principal: &Principal, only: Option<&str>) -> Result<Vec<Value>, ApiError> {
    let rows = state.admission.accounts.members().all_guardrail_members().await.map_err(internal)?;
    Ok(rows
        .into_iter()
        .filter(|a| a.org_id == principal.org.id && only.is_none_or(|o| o == a.guardrail_id))
        .map(|a| {
            json!({
                "id": format!("{}:{}", a.guardrail_id, a.user_id), "user_id": a.user_id,
                "organization_id": a.org_id, "guardrail_id": a.guardrail_id, "assigned_by": null,
                "created_at": iso(a.created_at_ms),
            })
        })
        .collect())
}

/// `GET /v1/guardrails/{id}/assignments/keys`.
pub async fn list_key_assignments(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let principal = manager(&state, &headers, Action::ReadOrg)?;
    let page = page(&query)?;
    own(&state, &principal, &id).await?;
    Ok(paged(key_rows(&state, &principal, Some(&id)).await?, page))
}

/// `GET /v1/guardrails/{id}/assignments/members`.
pub async fn list_member_assignments(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let principal = manager(&state, &headers, Action::ReadOrg)?;
    let page = page(&query)?;
    own(&state, &principal, &id).await?;
    Ok(paged(member_rows(&state, &principal, Some(&id)).await?, page))
}

/// `GET /v1/guardrails/assignments/keys`: every key assignment of the org.
pub async fn all_key_assignments(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let principal = manager(&state, &headers, Action::ReadOrg)?;
    Ok(paged(key_rows(&state, &principal, None).await?, page(&query)?))
}

/// `GET /v1/guardrails/assignments/members`: every member assignment of the org.
pub async fn all_member_assignments(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let principal = manager(&state, &headers, Action::ReadOrg)?;
    Ok(paged(member_rows(&state, &principal, None).await?, page(&query)?))
}
