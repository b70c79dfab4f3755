//! The operator's endpoints (`/admin/orgs`, master key only) and the organisation-scoped
//! account views of BharatRouter (`/me/keys`) and BatchRouter (`/v1/auth/account`).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use marga_store::{LedgerEntry, MemberRecord, OrgRecord};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::extract::{parse_json, read_body};
use super::keys::{create_key, internal, iso, Data, NewKey};
use super::money_json::exact;
use super::AppState;
use crate::accounts::Role;
use crate::error::ApiError;
use crate::money::{nanos_to_decimal, parse_nanos, Currency};
use crate::pipeline::unix_now_ms;

type Amount = Option<Box<serde_json::value::RawValue>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewOrg {
    name: String,
    currency: String,
    #[serde(default)]
    timezone: Option<String>,
    /// The email of the owner member the org starts with (who holds the management key).
    #[serde(default)]
    owner_email: Option<String>,
}

#[derive(Serialize)]
struct OrgView {
    id: String,
    name: String,
    currency: String,
    timezone: String,
    balance: Amount,
    created_at: Value,
}

async fn org_view(state: &AppState, org: &OrgRecord) -> Result<OrgView, ApiError> {
    let balance = state.admission.ledger.repo().balance(&org.id).await.map_err(internal)?;
    Ok(OrgView {
        id: org.id.clone(),
        name: org.name.clone(),
        currency: org.currency.clone(),
        timezone: org.timezone.clone(),
        balance: exact(nanos_to_decimal(balance)),
        created_at: iso(org.created_at_ms),
    })
}

fn operator(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    state.admission.accounts.authenticate(headers)?.require_operator()
}

/// `POST /admin/orgs {name, currency, timezone?}` → 201 with the org and a management key
/// (shown once).
pub async fn create_org(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    operator(&state, &headers)?;
    let new: NewOrg = parse_json(&read_body(body, state.max_body).await?)?;
    let currency: Currency = new.currency.parse().map_err(|m: String| ApiError::invalid(m, Some("currency".into())))?;
    if new.name.trim().is_empty() {
        return Err(ApiError::invalid("`name` must not be empty", Some("name".into())));
    }
    let timezone = new.timezone.unwrap_or_else(|| crate::accounts::timezone::default_for(currency.code()).to_owned());
    if crate::accounts::timezone::UtcOffset::parse(&timezone).is_none() {
        return Err(ApiError::invalid(format!("unknown time zone `{timezone}`"), Some("timezone".into())));
    }
    let owner_email = match new.owner_email {
        Some(email) => super::members::valid_email(&email)?,
        None => String::new(),
    };
    let org = OrgRecord {
        id: format!("org_{}", uuid::Uuid::now_v7().simple()),
        name: new.name,
        currency: currency.code().to_owned(),
        timezone,
        created_at_ms: unix_now_ms(),
    };
    let accounts = &state.admission.accounts;
    accounts.repo().create_org(&org).await.map_err(internal)?;
    accounts.note_org(&org);
    // The org starts with one owner member, who holds the first management key.
    let owner_member = MemberRecord {
        org_id: org.id.clone(),
        user_id: super::members::new_user_id(),
        email: owner_email,
        role: Role::Owner.as_str().to_owned(),
        created_at_ms: unix_now_ms(),
    };
    accounts.members().add_member(&owner_member).await.map_err(internal)?;
    let operator = crate::accounts::Principal {
        org: accounts.org(&org.id).ok_or(ApiError::NotFound)?,
        key: std::sync::Arc::new(crate::accounts::KeyInfo::master()),
        role: Some(Role::Owner),
    };
    let request = NewKey {
        name: "management".to_owned(),
        kind: Some("management".to_owned()),
        creator_user_id: Some(owner_member.user_id.clone()),
        ..NewKey::default()
    };
    let (_, management_key) = create_key(&state, &operator, request).await?;
    accounts.refresh_members().await.map_err(internal)?;
    #[derive(Serialize)]
    struct Created {
        #[serde(flatten)]
        org: OrgView,
        owner_user_id: String,
        management_key: String,
    }
    let created = Created { org: org_view(&state, &org).await?, owner_user_id: owner_member.user_id, management_key };
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

pub async fn list_orgs(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    operator(&state, &headers)?;
    let orgs = state.admission.accounts.repo().list_orgs().await.map_err(internal)?;
    let mut data = Vec::with_capacity(orgs.len());
    for org in &orgs {
        data.push(org_view(&state, org).await?);
    }
    Ok(Json(Data { data }).into_response())
}

pub async fn get_org(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, ApiError> {
    operator(&state, &headers)?;
    let org = state.admission.accounts.repo().get_org(&id).await.map_err(internal)?.ok_or(ApiError::NotFound)?;
    Ok(Json(org_view(&state, &org).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Grant {
    amount: Value,
    #[serde(default)]
    note: Option<String>,
    /// Makes the grant idempotent: the same reference is granted once.
    #[serde(default)]
    reference: Option<String>,
}

/// `POST /admin/orgs/{id}/credits {amount, note}`: a `grant` ledger line.
pub async fn grant_credits(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    operator(&state, &headers)?;
    let grant: Grant = parse_json(&read_body(body, state.max_body).await?)?;
    let org = state.admission.accounts.repo().get_org(&id).await.map_err(internal)?.ok_or(ApiError::NotFound)?;
    let text = match &grant.amount {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    };
    let amount = parse_nanos(&text)
        .filter(|n| *n > 0)
        .ok_or_else(|| ApiError::invalid("`amount` must be a positive decimal with at most 9 decimals", Some("amount".into())))?;
    let entry = LedgerEntry {
        org_id: org.id.clone(),
        amount_nanos: amount,
        currency: org.currency.clone(),
        kind: "grant".to_owned(),
        reference: grant.reference.unwrap_or_else(|| format!("grant-{}", uuid::Uuid::now_v7().simple())),
        note: grant.note,
        created_at_ms: unix_now_ms(),
        ..LedgerEntry::default()
    };
    state.admission.ledger.repo().append(std::slice::from_ref(&entry)).await.map_err(internal)?;
    Ok((StatusCode::CREATED, Json(org_view(&state, &org).await?)).into_response())
}

/// BatchRouter's `GET /v1/auth/account`.
pub async fn account(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let principal = state.admission.accounts.authenticate(&headers)?;
    let balance = state.admission.ledger.repo().balance(&principal.org.id).await.map_err(internal)?;
    #[derive(Serialize)]
    struct Account<'a> {
        org_id: &'a str,
        name: &'a str,
        currency: &'static str,
        credit_balance: Amount,
        key_kind: &'static str,
    }
    let view = Account {
        org_id: &principal.org.id,
        name: &principal.org.name,
        currency: principal.org.currency.code(),
        credit_balance: exact(nanos_to_decimal(balance)),
        key_kind: principal.key.kind.as_str(),
    };
    Ok(Json(view).into_response())
}

/// BatchRouter's `POST /v1/auth/account/api-keys {name}` and BharatRouter's `POST /me/keys
/// {name, budget_inr?, expires_days?}`: a new inference key, shown once.
pub async fn create_account_key(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let principal = state.admission.accounts.authenticate(&headers)?;
    principal.require(crate::accounts::Action::ManageKeys)?;
    let new: NewKey = parse_json(&read_body(body, state.max_body).await?)?;
    let (record, key) = create_key(&state, &principal, new).await?;
    #[derive(Serialize)]
    struct Created {
        id: String,
        key: String,
        name: String,
        tier: &'static str,
        budget_inr: Amount,
        expires_at: Value,
    }
    let created = Created {
        id: record.id,
        key,
        name: record.name,
        tier: if record.trial { "trial" } else { "standard" },
        budget_inr: record.budget_nanos.and_then(|b| exact(nanos_to_decimal(b))),
        expires_at: record.expires_at_ms.map_or(Value::Null, iso),
    };
    Ok((StatusCode::CREATED, Json(created)).into_response())
}
