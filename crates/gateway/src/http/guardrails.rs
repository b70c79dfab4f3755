//! Guardrails (OpenRouter): spend caps and model rules that apply to the keys and members they
//! are assigned to (assignments: [`super::assignments`]). `GET/POST /v1/guardrails`,
//! `GET/PATCH/DELETE /v1/guardrails/{id}`. Management keys only (changing: owners and
//! admins); every id is scoped to the caller's organisation.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use marga_store::GuardrailRecord;
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

type Amount = Option<Box<serde_json::value::RawValue>>;

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GuardrailBody {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    max_daily_spend: Option<Value>,
    #[serde(default)]
    max_weekly_spend: Option<Value>,
    #[serde(default)]
    max_monthly_spend: Option<Value>,
    #[serde(default)]
    allowed_models: Option<Vec<String>>,
    #[serde(default, alias = "ignored_models")]
    blocked_models: Option<Vec<String>>,
    #[serde(default, alias = "enforce_zdr")]
    require_zdr: Option<bool>,
}

#[derive(Serialize)]
struct GuardrailView {
    id: String,
    name: String,
    max_daily_spend: Amount,
    max_weekly_spend: Amount,
    max_monthly_spend: Amount,
    allowed_models: Vec<String>,
    blocked_models: Vec<String>,
    require_zdr: bool,
    currency: &'static str,
    created_at: Value,
    updated_at: Value,
}

fn view(g: &GuardrailRecord, principal: &Principal) -> GuardrailView {
    let list = |json: &str| serde_json::from_str(json).unwrap_or_default();
    let amount = |n: Option<i64>| n.and_then(|n| exact(nanos_to_decimal(n)));
    GuardrailView {
        id: g.id.clone(),
        name: g.name.clone(),
        max_daily_spend: amount(g.max_daily_spend_nanos),
        max_weekly_spend: amount(g.max_weekly_spend_nanos),
        max_monthly_spend: amount(g.max_monthly_spend_nanos),
        allowed_models: list(&g.allowed_models),
        blocked_models: list(&g.blocked_models),
        require_zdr: g.require_zdr,
        currency: principal.org.currency.code(),
        created_at: iso(g.created_at_ms),
        updated_at: iso(g.updated_at_ms),
    }
}

fn spend(value: &Option<Value>, param: &str) -> Result<Option<i64>, ApiError> {
    let Some(value) = value else { return Ok(None) };
    let text = match value {
        Value::Null => return Ok(None),
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    };
    parse_nanos(&text)
        .filter(|n| *n >= 0)
        .map(Some)
        .ok_or_else(|| ApiError::invalid(format!("`{param}` must be a non-negative amount"), Some(param.to_owned())))
}

/// Applies the body's fields to `g`; caps must narrow as the window narrows.
fn apply(g: &mut GuardrailRecord, body: &GuardrailBody, state: &AppState) -> Result<(), ApiError> {
    if let Some(name) = &body.name {
        g.name = name.clone();
    }
    if body.max_daily_spend.is_some() {
        g.max_daily_spend_nanos = spend(&body.max_daily_spend, "max_daily_spend")?;
    }
    if body.max_weekly_spend.is_some() {
        g.max_weekly_spend_nanos = spend(&body.max_weekly_spend, "max_weekly_spend")?;
    }
    if body.max_monthly_spend.is_some() {
        g.max_monthly_spend_nanos = spend(&body.max_monthly_spend, "max_monthly_spend")?;
    }
    for (models, param) in [(&body.allowed_models, "allowed_models"), (&body.blocked_models, "blocked_models")] {
        if let Some(unknown) = models.iter().flatten().find(|m| state.registry.model(m).is_none()) {
            return Err(ApiError::invalid(format!("unknown model `{unknown}`"), Some(param.to_owned())));
        }
    }
    if let Some(models) = &body.allowed_models {
        g.allowed_models = serde_json::to_string(models).map_err(internal)?;
    }
    if let Some(models) = &body.blocked_models {
        g.blocked_models = serde_json::to_string(models).map_err(internal)?;
    }
    if let Some(zdr) = body.require_zdr {
        g.require_zdr = zdr;
    }
    if g.name.trim().is_empty() {
        return Err(ApiError::invalid("`name` is required", Some("name".into())));
    }
    Ok(())
}

/// The caller, allowed `action` (reading: any member; changing: owners and admins).
pub(super) fn manager(state: &AppState, headers: &HeaderMap, action: Action) -> Result<Principal, ApiError> {
    let principal = state.admission.accounts.authenticate(headers)?;
    principal.require(action)?;
    Ok(principal)
}

/// The caller's org's guardrail `id`, or 404.
pub(super) async fn own(state: &AppState, principal: &Principal, id: &str) -> Result<GuardrailRecord, ApiError> {
    let all = state.admission.accounts.repo().list_guardrails(&principal.org.id).await.map_err(internal)?;
    all.into_iter().find(|g| g.id == id).ok_or(ApiError::NotFound)
}

pub async fn create(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let principal = manager(&state, &headers, Action::ManageGuardrails)?;
    let body: GuardrailBody = parse_json(&read_body(body, state.max_body).await?)?;
    let now = unix_now_ms();
    let mut g = GuardrailRecord {
        id: uuid::Uuid::now_v7().to_string(),
        org_id: principal.org.id.clone(),
        allowed_models: "[]".to_owned(),
        blocked_models: "[]".to_owned(),
        created_at_ms: now,
        updated_at_ms: now,
        ..GuardrailRecord::default()
    };
    apply(&mut g, &body, &state)?;
    state.admission.accounts.repo().create_guardrail(&g).await.map_err(internal)?;
    Ok((StatusCode::CREATED, Json(Data { data: view(&g, &principal) })).into_response())
}

pub async fn list(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let principal = manager(&state, &headers, Action::ReadOrg)?;
    let all = state.admission.accounts.repo().list_guardrails(&principal.org.id).await.map_err(internal)?;
    #[derive(Serialize)]
    struct Listing {
        data: Vec<GuardrailView>,
        total_count: usize,
    }
    let data: Vec<GuardrailView> = all.iter().map(|g| view(g, &principal)).collect();
    Ok(Json(Listing { total_count: data.len(), data }).into_response())
}

pub async fn get(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    let principal = manager(&state, &headers, Action::ReadOrg)?;
    let g = own(&state, &principal, &id).await?;
    Ok(Json(Data { data: view(&g, &principal) }).into_response())
}

pub async fn update(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = manager(&state, &headers, Action::ManageGuardrails)?;
    let body: GuardrailBody = parse_json(&read_body(body, state.max_body).await?)?;
    let mut g = own(&state, &principal, &id).await?;
    apply(&mut g, &body, &state)?;
    g.updated_at_ms = unix_now_ms();
    state.admission.accounts.repo().update_guardrail(&g).await.map_err(internal)?;
    state.admission.accounts.refresh_guardrails().await.map_err(internal)?;
    Ok(Json(Data { data: view(&g, &principal) }).into_response())
}

pub async fn delete(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    let principal = manager(&state, &headers, Action::ManageGuardrails)?;
    let deleted = state.admission.accounts.repo().delete_guardrail(&principal.org.id, &id).await.map_err(internal)?;
    if !deleted {
        return Err(ApiError::NotFound);
    }
    state.admission.accounts.refresh_guardrails().await.map_err(internal)?;
    Ok(Json(serde_json::json!({ "deleted": true })).into_response())
}
