//! API keys and credit, in the three shapes clients know:
//! OpenRouter (`/v1/keys`, `/v1/keys/{hash}`, `/v1/key`, `/v1/credits`), BharatRouter
//! (`/me/keys`) and BatchRouter (`/v1/auth/account`, `/v1/auth/account/api-keys`).
//!
//! A key is shown once, at creation; afterwards only its hash (the id) and a label exist.
//! Every lookup is scoped to the caller's organisation: another org's key answers 404.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use marga_store::KeyRecord;
use serde::Deserialize;
use serde_json::{json, Value};

use super::extract::{parse_json, read_body};
use super::money_json::exact;
use super::AppState;
use crate::accounts::{Action, Principal, Role, INFERENCE_PREFIX, MANAGEMENT_PREFIX};
use crate::error::ApiError;
use crate::keys::{self, KeyHash};
use crate::money::{nanos_to_decimal, parse_nanos};
use crate::pipeline::unix_now_ms;

/// What a new key may say about itself (both shapes' fields, all optional but the name).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    pub name: String,
    #[serde(default)]
    pub limit: Option<Value>,
    #[serde(default)]
    pub limit_reset: Option<String>,
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub expires_days: Option<u32>,
    #[serde(default)]
    pub rpm_limit: Option<u32>,
    #[serde(default)]
    pub daily_limit: Option<u32>,
    #[serde(default, alias = "budget_inr", alias = "monthly_budget")]
    pub budget: Option<Value>,
    #[serde(default)]
    pub workspace_id: Option<String>,
    /// Accepted for OpenRouter compatibility; BYOK traffic is never charged, so never counted.
    #[serde(default, rename = "include_byok_in_limit")]
    pub _include_byok_in_limit: Option<bool>,
    /// `management` or `inference` (default).
    #[serde(default)]
    pub kind: Option<String>,
    /// The member the key belongs to (default: the caller's member). A management key acts
    /// with that member's role.
    #[serde(default, alias = "member_id")]
    pub creator_user_id: Option<String>,
}

/// `PATCH`: every field optional; `null` clears a limit.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPatch {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub disabled: Option<bool>,
    #[serde(default, with = "double_option")]
    pub limit: Option<Option<Value>>,
    #[serde(default, with = "double_option")]
    pub limit_reset: Option<Option<String>>,
    #[serde(default, with = "double_option")]
    pub rpm_limit: Option<Option<u32>>,
    #[serde(default, with = "double_option")]
    pub daily_limit: Option<Option<u32>>,
    #[serde(default, with = "double_option", alias = "budget_inr", alias = "monthly_budget")]
    pub budget: Option<Option<Value>>,
    /// Accepted for OpenRouter compatibility (see [`NewKey`]).
    #[serde(default, rename = "include_byok_in_limit")]
    pub _include_byok_in_limit: Option<bool>,
}

/// Distinguishes an absent field (`None`) from an explicit `null` (`Some(None)`).
mod double_option {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

fn money_field(value: &Value, param: &str) -> Result<i64, ApiError> {
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return Err(ApiError::invalid(format!("`{param}` must be a decimal amount"), Some(param.to_owned()))),
    };
    match parse_nanos(&text) {
        Some(n) if n >= 0 => Ok(n),
        _ => Err(ApiError::invalid(format!("`{param}` must be a non-negative amount, not `{text}`"), Some(param.to_owned()))),
    }
}

fn limit_reset(value: Option<&str>) -> Result<Option<String>, ApiError> {
    match value {
        None => Ok(None),
        Some(v @ ("daily" | "weekly" | "monthly")) => Ok(Some(v.to_owned())),
        Some(other) => Err(ApiError::invalid(
            format!("`limit_reset` must be daily, weekly or monthly, not `{other}`"),
            Some("limit_reset".into()),
        )),
    }
}

fn parse_expiry(new: &NewKey, now: i64) -> Result<Option<i64>, ApiError> {
    if let Some(days) = new.expires_days {
        if !(1..=365).contains(&days) {
            return Err(ApiError::invalid("`expires_days` must be between 1 and 365", Some("expires_days".into())));
        }
        return Ok(Some(now + i64::from(days) * 86_400_000));
    }
    let Some(text) = &new.expires_at else { return Ok(None) };
    let parsed = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .ok()
        .filter(|t| t.offset().is_utc())
        .ok_or_else(|| ApiError::invalid("`expires_at` must be an ISO 8601 time in UTC", Some("expires_at".into())))?;
    let ms = i64::try_from(parsed.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
    if ms <= now {
        return Err(ApiError::invalid("`expires_at` must be in the future", Some("expires_at".into())));
    }
    Ok(Some(ms))
}

pub fn iso(ms: i64) -> Value {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .map_or(Value::Null, Value::String)
}

/// The role of member `user_id` of `org_id`, read from the store (not the cache: a member just
/// added on another instance counts at once).
pub async fn member_role(state: &AppState, org_id: &str, user_id: &str) -> Result<Option<Role>, ApiError> {
    let members = state.admission.accounts.repo().list_members(org_id).await.map_err(internal)?;
    Ok(members.iter().find(|m| m.user_id == user_id).and_then(|m| Role::parse(&m.role)))
}

/// Whom a new key belongs to: `requested` (a member of the caller's org) or the caller's own
/// member. Handing a management key to an owner other than oneself is an owner's act.
async fn key_member(state: &AppState, principal: &Principal, requested: Option<&str>, management: bool) -> Result<Option<String>, ApiError> {
    let Some(id) = requested else { return Ok(principal.key.member_id.clone()) };
    let param = Some("creator_user_id".to_owned());
    if id.len() > 200 {
        return Err(ApiError::invalid("`creator_user_id` is too long", param));
    }
    let role = member_role(state, &principal.org.id, id)
        .await?
        .ok_or_else(|| ApiError::invalid(format!("no member `{id}` in this organisation"), param))?;
    if management && role == Role::Owner && principal.key.member_id.as_deref() != Some(id) {
        principal.require(Action::ManageOwners)?;
    }
    Ok(Some(id.to_owned()))
}

/// What changing or revoking `record` asks of the caller: an owner's management keys are the
/// owners' to manage.
pub async fn require_for_key(state: &AppState, principal: &Principal, record: &KeyRecord) -> Result<(), ApiError> {
    principal.require(Action::ManageKeys)?;
    if record.kind == "management" {
        if let Some(member) = &record.member_id {
            if member_role(state, &record.org_id, member).await? == Some(Role::Owner) {
                principal.require(Action::ManageOwners)?;
            }
        }
    }
    Ok(())
}

/// Creates a key for `principal`'s organisation; returns the record and the plaintext key.
pub async fn create_key(state: &AppState, principal: &Principal, new: NewKey) -> Result<(KeyRecord, String), ApiError> {
    principal.require(Action::ManageKeys)?;
    if new.name.trim().is_empty() || new.name.len() > 200 {
        return Err(ApiError::invalid("`name` must be 1 to 200 characters", Some("name".into())));
    }
    let management = match new.kind.as_deref() {
        None | Some("inference") => false,
        Some("management") => true,
        Some(other) => return Err(ApiError::invalid(format!("unknown key kind `{other}`"), Some("kind".into()))),
    };
    let member_id = key_member(state, principal, new.creator_user_id.as_deref(), management).await?;
    let repo = state.admission.accounts.repo();
    let existing = repo.list_keys(&principal.org.id).await.map_err(internal)?;
    if existing.iter().any(|k| k.name == new.name && !k.disabled) {
        return Err(ApiError::Conflict { code: "duplicate_key_name", message: format!("an active key named `{}` exists", new.name) });
    }
    if let Some(ws) = &new.workspace_id {
        let workspaces = repo.list_workspaces(&principal.org.id).await.map_err(internal)?;
        if !workspaces.iter().any(|w| &w.id == ws) {
            return Err(ApiError::invalid(format!("no workspace `{ws}` in this organisation"), Some("workspace_id".into())));
        }
    }
    let now = unix_now_ms();
    let prefix = if management { MANAGEMENT_PREFIX } else { INFERENCE_PREFIX };
    let secret = keys::generate(prefix);
    let record = KeyRecord {
        id: KeyHash::of(&secret).to_hex(),
        org_id: principal.org.id.clone(),
        workspace_id: new.workspace_id.clone(),
        kind: if management { "management" } else { "inference" }.to_owned(),
        name: new.name.clone(),
        label: keys::label(&secret),
        limit_nanos: new.limit.as_ref().map(|v| money_field(v, "limit")).transpose()?,
        limit_reset: limit_reset(new.limit_reset.as_deref())?,
        rpm_limit: new.rpm_limit.map(i64::from),
        daily_limit: new.daily_limit.map(i64::from),
        budget_nanos: new.budget.as_ref().map(|v| money_field(v, "budget")).transpose()?,
        trial: state.admission.trial_keys && !management,
        disabled: false,
        expires_at_ms: parse_expiry(&new, now)?,
        created_at_ms: now,
        updated_at_ms: now,
        revoked_at_ms: None,
        member_id,
    };
    repo.create_key(&record).await.map_err(internal)?;
    state.admission.accounts.note_key(record.clone());
    Ok((record, secret))
}

pub fn internal(e: impl std::error::Error + Send + Sync + 'static) -> ApiError {
    ApiError::Internal(anyhow::Error::new(e))
}

/// A key of the caller's organisation, or 404.
async fn own_key(state: &AppState, principal: &Principal, id: &str) -> Result<KeyRecord, ApiError> {
    let record = state.admission.accounts.repo().get_key(id).await.map_err(internal)?;
    record
        .filter(|k| k.org_id == principal.org.id && k.revoked_at_ms.is_none())
        .ok_or(ApiError::NotFound)
}

/// Applies a patch; refuses raising a trial key past its caps (`trial_ceiling`).
fn apply_patch(record: &mut KeyRecord, patch: KeyPatch, state: &AppState) -> Result<(), ApiError> {
    if let Some(name) = patch.name {
        record.name = name;
    }
    if let Some(disabled) = patch.disabled {
        record.disabled = disabled;
    }
    if let Some(limit) = patch.limit {
        record.limit_nanos = limit.as_ref().map(|v| money_field(v, "limit")).transpose()?;
    }
    if let Some(reset) = patch.limit_reset {
        record.limit_reset = limit_reset(reset.as_deref())?;
    }
    if let Some(budget) = patch.budget {
        record.budget_nanos = budget.as_ref().map(|v| money_field(v, "budget")).transpose()?;
    }
    let trial = &state.admission.defaults;
    if let Some(rpm) = patch.rpm_limit {
        if record.trial && rpm.is_none_or(|r| r > trial.trial_rpm) {
            return Err(ApiError::invalid(format!("trial keys are capped at {} requests per minute", trial.trial_rpm), Some("rpm_limit".into())).with_code("trial_ceiling"));
        }
        record.rpm_limit = rpm.map(i64::from);
    }
    if let Some(daily) = patch.daily_limit {
        if record.trial && daily.is_none_or(|d| d > trial.trial_daily) {
            return Err(ApiError::invalid(format!("trial keys are capped at {} requests per day", trial.trial_daily), Some("daily_limit".into())).with_code("trial_ceiling"));
        }
        record.daily_limit = daily.map(i64::from);
    }
    record.updated_at_ms = unix_now_ms().max(record.updated_at_ms + 1);
    Ok(())
}

async fn usage_since(state: &AppState, record: &KeyRecord, since: i64) -> i64 {
    state.admission.ledger.repo().spend_since(&record.org_id, Some(&record.id), since).await.unwrap_or(0)
}

type Amount = Option<Box<serde_json::value::RawValue>>;

/// `{"data": …}`, serialised directly so that exact amounts stay exact (a detour through
/// `serde_json::Value` would turn them into floats).
#[derive(serde::Serialize)]
pub struct Data<T> {
    pub data: T,
}

/// OpenRouter's KeyData plus Marga's limits; amounts exact, in the org currency.
#[derive(serde::Serialize)]
struct KeyData {
    hash: String,
    name: String,
    label: String,
    kind: String,
    disabled: bool,
    limit: Amount,
    limit_remaining: Amount,
    limit_reset: Option<String>,
    include_byok_in_limit: bool,
    usage: Amount,
    usage_daily: Amount,
    usage_weekly: Amount,
    usage_monthly: Amount,
    currency: &'static str,
    rpm_limit: Option<i64>,
    daily_limit: Option<i64>,
    budget: Amount,
    tier: &'static str,
    workspace_id: Option<String>,
    creator_user_id: Option<String>,
    created_at: Value,
    updated_at: Value,
    expires_at: Value,
}

/// `GET /v1/key` adds what the key is.
#[derive(serde::Serialize)]
struct CurrentKey {
    #[serde(flatten)]
    data: KeyData,
    is_free_tier: bool,
    is_management_key: bool,
    is_provisioning_key: bool,
    rate_limit: Value,
}

async fn key_data(state: &AppState, principal: &Principal, record: &KeyRecord) -> KeyData {
    let now = unix_now_ms();
    let tz = principal.org.timezone;
    let usage = usage_since(state, record, 0).await;
    let daily = usage_since(state, record, tz.day_start(now)).await;
    let weekly = usage_since(state, record, tz.week_start(now)).await;
    let monthly = usage_since(state, record, tz.month_start(now)).await;
    let window_usage = match record.limit_reset.as_deref() {
        Some("daily") => daily,
        Some("weekly") => weekly,
        Some("monthly") => monthly,
        _ => usage,
    };
    let amount = |n: i64| exact(nanos_to_decimal(n));
    KeyData {
        hash: record.id.clone(),
        name: record.name.clone(),
        label: record.label.clone(),
        kind: record.kind.clone(),
        disabled: record.disabled,
        limit: record.limit_nanos.and_then(amount),
        limit_remaining: record.limit_nanos.and_then(|l| amount((l - window_usage).max(0))),
        limit_reset: record.limit_reset.clone(),
        include_byok_in_limit: false,
        usage: amount(usage),
        usage_daily: amount(daily),
        usage_weekly: amount(weekly),
        usage_monthly: amount(monthly),
        currency: principal.org.currency.code(),
        rpm_limit: record.rpm_limit,
        daily_limit: record.daily_limit,
        budget: record.budget_nanos.and_then(amount),
        tier: if record.trial { "trial" } else { "standard" },
        workspace_id: record.workspace_id.clone(),
        creator_user_id: record.member_id.clone(),
        created_at: iso(record.created_at_ms),
        updated_at: iso(record.updated_at_ms),
        expires_at: record.expires_at_ms.map_or(Value::Null, iso),
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(state: &AppState, body: Body) -> Result<T, ApiError> {
    parse_json(&read_body(body, state.max_body).await?)
}

pub async fn create(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let principal = state.admission.accounts.authenticate(&headers)?;
    principal.require(Action::ManageKeys)?;
    let new: NewKey = read_json(&state, body).await?;
    let (record, secret) = create_key(&state, &principal, new).await?;
    let data = key_data(&state, &principal, &record).await;
    #[derive(serde::Serialize)]
    struct Created {
        data: KeyData,
        key: String,
    }
    Ok((StatusCode::CREATED, Json(Created { data, key: secret })).into_response())
}

pub async fn list(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let principal = state.admission.accounts.authenticate(&headers)?;
    principal.require_management()?;
    let records = state.admission.accounts.repo().list_keys(&principal.org.id).await.map_err(internal)?;
    let mut data = Vec::with_capacity(records.len());
    for record in &records {
        data.push(key_data(&state, &principal, record).await);
    }
    Ok(Json(Data { data }).into_response())
}

pub async fn get(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    let principal = state.admission.accounts.authenticate(&headers)?;
    principal.require_management()?;
    let record = own_key(&state, &principal, &id).await?;
    Ok(Json(Data { data: key_data(&state, &principal, &record).await }).into_response())
}

pub async fn update(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let principal = state.admission.accounts.authenticate(&headers)?;
    principal.require(Action::ManageKeys)?;
    let patch: KeyPatch = read_json(&state, body).await?;
    let mut record = own_key(&state, &principal, &id).await?;
    require_for_key(&state, &principal, &record).await?;
    apply_patch(&mut record, patch, &state)?;
    state.admission.accounts.repo().update_key(&record).await.map_err(internal)?;
    state.admission.accounts.note_key(record.clone());
    Ok(Json(Data { data: key_data(&state, &principal, &record).await }).into_response())
}

pub async fn delete(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    let principal = state.admission.accounts.authenticate(&headers)?;
    principal.require(Action::ManageKeys)?;
    let mut record = own_key(&state, &principal, &id).await?;
    require_for_key(&state, &principal, &record).await?;
    let now = unix_now_ms();
    record.revoked_at_ms = Some(now);
    record.disabled = true;
    record.updated_at_ms = now.max(record.updated_at_ms + 1);
    state.admission.accounts.repo().update_key(&record).await.map_err(internal)?;
    state.admission.accounts.note_key(record);
    Ok(Json(json!({ "deleted": true })).into_response())
}

/// `GET /v1/key`: the calling key describes itself.
pub async fn current(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let principal = state.admission.accounts.authenticate(&headers)?;
    if principal.is_master() {
        let data = json!({
            "label": "master key", "name": "master key", "kind": "master", "limit": null, "limit_remaining": null,
            "limit_reset": null, "usage": 0, "is_free_tier": false, "is_management_key": true,
            "is_provisioning_key": true, "expires_at": null, "currency": principal.org.currency.code(),
            "rate_limit": { "requests": -1, "interval": "10s", "note": "not limited" },
        });
        return Ok(Json(json!({ "data": data })).into_response());
    }
    let record = own_key(&state, &principal, &principal.key.id).await?;
    let management = principal.key.kind == crate::accounts::KeyKind::Management;
    let data = CurrentKey {
        data: key_data(&state, &principal, &record).await,
        is_free_tier: record.trial,
        is_management_key: management,
        is_provisioning_key: management,
        rate_limit: json!({ "requests": record.rpm_limit.unwrap_or(-1), "interval": "1m", "note": "rpm_limit of this key; -1 = none" }),
    };
    Ok(Json(Data { data }).into_response())
}

/// `GET /v1/credits`: credits granted and used, exact, in the organisation's currency.
pub async fn credits(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let principal = state.admission.accounts.authenticate(&headers)?;
    let repo = state.admission.ledger.repo();
    // One read for both, so that `total_credits` (their sum) never counts a charge twice.
    let (balance, used) = repo.totals(&principal.org.id).await.map_err(internal)?;
    #[derive(serde::Serialize)]
    struct Credits {
        total_credits: Amount,
        total_usage: Amount,
        balance: Amount,
        currency: &'static str,
    }
    let data = Credits {
        total_credits: exact(nanos_to_decimal(balance + used)),
        total_usage: exact(nanos_to_decimal(used)),
        balance: exact(nanos_to_decimal(balance)),
        currency: principal.org.currency.code(),
    };
    Ok(Json(Data { data }).into_response())
}
