//! Usage analytics for an organisation, over the request log and its daily rollup:
//! `GET /v1/generation?id=` (OpenRouter's generation stats, any key of the organisation),
//! `GET /me/usage`, `GET /me/usage/daily`, `GET /me/activity`, `GET /me/activity/events` and
//! OpenRouter's `GET /v1/activity` (management keys; the master key sees its default org).
//!
//! Every read is scoped to the caller's organisation: another organisation's generation id
//! answers 404. Days are the organisation's local days (see `marga_store::UsageRepo`); costs
//! are exact sums of nanos in the organisation's currency.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use marga_store::{GenerationRecord, UsageGroup, UsageQuery, UsageRepo, UsageRow};
use serde::Serialize;
use serde_json::Value;

use super::keys::{internal, iso, Data};
use super::stats::PublicStats;
use super::usage_report::{self as report, amount, date_of, parse_date, Amount, KeyNames};
use super::AppState;
use crate::accounts::{Principal, DEFAULT_ORG};
use crate::error::ApiError;
use crate::money::Currency;
use crate::pipeline::unix_now_ms;

/// What the usage endpoints share: the store's usage queries and the public statistics cache.
pub struct UsageState {
    pub repo: Arc<dyn UsageRepo>,
    pub public: PublicStats,
}

impl UsageState {
    pub fn new(repo: Arc<dyn UsageRepo>) -> UsageState {
        UsageState { repo, public: PublicStats::default() }
    }
}

/// The longest `/me/activity` range, in days.
pub const MAX_SPAN_DAYS: i64 = 366;
/// The most `/me/activity/events` returns at once, and the default.
pub const MAX_EVENTS: u32 = 200;
const DEFAULT_EVENTS: u32 = 50;
/// The longest id or filter value accepted.
const MAX_PARAM_LEN: usize = 256;

type Params = HashMap<String, String>;

fn params(query: Result<Query<Params>, QueryRejection>) -> Result<Params, ApiError> {
    query.map(|Query(p)| p).map_err(|e| ApiError::invalid(format!("invalid query string: {e}"), None))
}

/// A bounded, non-empty text parameter, if present.
fn text_param<'p>(params: &'p Params, name: &str) -> Result<Option<&'p str>, ApiError> {
    match params.get(name).map(String::as_str) {
        None => Ok(None),
        Some(v) if v.is_empty() || v.len() > MAX_PARAM_LEN => Err(ApiError::invalid(
            format!("`{name}` must be 1 to {MAX_PARAM_LEN} characters"),
            Some(name.to_owned()),
        )),
        Some(v) => Ok(Some(v)),
    }
}

fn manager(state: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let principal = state.admission.accounts.authenticate(headers)?;
    principal.require_management()?;
    Ok(principal)
}

fn today(principal: &Principal) -> i64 {
    principal.org.timezone.day_number(unix_now_ms())
}

async fn rows(state: &AppState, query: &UsageQuery<'_>) -> Result<Vec<UsageRow>, ApiError> {
    state.usage.repo.usage_rows(query).await.map_err(internal)
}

/// Keeps the dimensions named: `day`, `key`, `model`, `provider`.
fn group(day: bool, key: bool, model: bool, provider: bool) -> UsageGroup {
    UsageGroup { day, key, model, provider }
}

/// The last 30 local days of the organisation, kept by `group`.
fn last_30_days(principal: &Principal, today: i64, group: UsageGroup) -> UsageQuery<'_> {
    UsageQuery { org_id: &principal.org.id, from_day: today - 29, to_day: today, model: None, key_id: None, group }
}

/// The organisation's key names by id (revoked keys are no longer listed: `null` names).
async fn key_names(state: &AppState, principal: &Principal) -> Result<KeyNames, ApiError> {
    let keys = state.admission.accounts.repo().list_keys(&principal.org.id).await.map_err(internal)?;
    let mut names: KeyNames = keys.into_iter().map(|k| (k.id, k.name)).collect();
    if principal.org.id == DEFAULT_ORG {
        names.insert("master".to_owned(), "master key".to_owned());
    }
    Ok(names)
}

/// `GET /me/usage`: requests, tokens and cost per key, today and over the last 30 days.
pub async fn me_usage(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let principal = manager(&state, &headers)?;
    let today = today(&principal);
    let rows = rows(&state, &last_30_days(&principal, today, group(true, true, false, false))).await?;
    let mut usage = report::usage(&rows, today, &key_names(&state, &principal).await?);
    usage.timezone = principal.org.timezone.label();
    usage.currency = principal.org.currency.code();
    Ok(Json(usage).into_response())
}

/// `GET /me/usage/daily`: day × model over the last 30 days.
pub async fn me_usage_daily(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let principal = manager(&state, &headers)?;
    let today = today(&principal);
    let rows = rows(&state, &last_30_days(&principal, today, group(true, false, true, false))).await?;
    #[derive(Serialize)]
    struct Daily {
        from: String,
        to: String,
        timezone: String,
        currency: &'static str,
        days: Vec<report::DailyEntry>,
    }
    let daily = Daily {
        from: date_of(today - 29),
        to: date_of(today),
        timezone: principal.org.timezone.label(),
        currency: principal.org.currency.code(),
        days: report::daily(&rows),
    };
    Ok(Json(daily).into_response())
}

/// `from`/`to` (inclusive local dates; default the last 30 days), at most [`MAX_SPAN_DAYS`].
fn date_range(params: &Params, today: i64) -> Result<(i64, i64), ApiError> {
    let to = params.get("to").map(|t| parse_date(t, "to")).transpose()?.unwrap_or(today);
    let from = params.get("from").map(|f| parse_date(f, "from")).transpose()?.unwrap_or(to - 29);
    if from > to {
        return Err(ApiError::invalid("`from` must not be after `to`", Some("from".into())));
    }
    if to - from + 1 > MAX_SPAN_DAYS {
        return Err(ApiError::invalid(format!("the range may span at most {MAX_SPAN_DAYS} days"), Some("from".into())));
    }
    Ok((from, to))
}

/// `GET /me/activity?from&to&model&key_id`.
pub async fn me_activity(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<Params>, QueryRejection>,
) -> Result<Response, ApiError> {
    let principal = manager(&state, &headers)?;
    let params = params(query)?;
    let (from, to) = date_range(&params, today(&principal))?;
    let query = UsageQuery {
        org_id: &principal.org.id,
        from_day: from,
        to_day: to,
        model: text_param(&params, "model")?,
        key_id: text_param(&params, "key_id")?,
        group: UsageGroup::default(),
    };
    let by = |group| UsageQuery { group, ..query.clone() };
    let rows = report::ActivityRows {
        by_day: rows(&state, &by(group(true, false, false, false))).await?,
        by_model: rows(&state, &by(group(false, false, true, false))).await?,
        by_key: rows(&state, &by(group(false, true, false, false))).await?,
        by_model_provider: rows(&state, &by(group(false, false, true, true))).await?,
    };
    let mut activity = report::activity(&rows, from, to, &key_names(&state, &principal).await?);
    activity.timezone = principal.org.timezone.label();
    activity.currency = principal.org.currency.code();
    Ok(Json(activity).into_response())
}

/// One request in `/me/activity/events`.
#[derive(Serialize)]
struct Event {
    id: String,
    at: Value,
    model: String,
    provider: Option<String>,
    status: String,
    http_status: i64,
    latency_ms: i64,
    ttft_ms: Option<i64>,
    generation_time_ms: Option<i64>,
    tokens: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
    cost: Amount,
    currency: String,
    /// The cost when the organisation pays in INR (BharatRouter's field), else `null`.
    cost_inr: Amount,
    key_id: Option<String>,
    key_name: Option<String>,
    streamed: bool,
    cancelled: bool,
    byok: bool,
    finish_reason: Option<String>,
}

fn event(r: GenerationRecord, names: &KeyNames) -> Event {
    let inr = r.currency == Currency::Inr.code();
    Event {
        at: iso(r.created_at_ms),
        status: r.status,
        http_status: r.http_status,
        latency_ms: r.latency_ms,
        ttft_ms: r.ttft_ms,
        generation_time_ms: r.generation_time_ms,
        tokens: r.prompt_tokens.saturating_add(r.completion_tokens),
        prompt_tokens: r.prompt_tokens,
        completion_tokens: r.completion_tokens,
        cost: amount(r.cost_nanos),
        cost_inr: if inr { amount(r.cost_nanos) } else { None },
        currency: r.currency,
        key_name: r.key_id.as_ref().and_then(|k| names.get(k).cloned()),
        key_id: r.key_id,
        streamed: r.streamed,
        cancelled: r.cancelled,
        byok: r.byok,
        finish_reason: r.finish_reason,
        provider: r.provider,
        model: r.model,
        id: r.id,
    }
}

/// `GET /me/activity/events?before&limit`: newest first; `next_before` continues the walk.
pub async fn me_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<Params>, QueryRejection>,
) -> Result<Response, ApiError> {
    let principal = manager(&state, &headers)?;
    let params = params(query)?;
    let limit = match params.get("limit") {
        None => DEFAULT_EVENTS,
        Some(l) => l.parse().ok().filter(|n| (1..=MAX_EVENTS).contains(n)).ok_or_else(|| {
            ApiError::invalid(format!("`limit` must be an integer from 1 to {MAX_EVENTS}"), Some("limit".into()))
        })?,
    };
    let before = text_param(&params, "before")?;
    let page = state.usage.repo.generation_events(&principal.org.id, before, limit).await.map_err(internal)?;
    let page = page.ok_or_else(|| ApiError::invalid("`before` is not a generation of this organisation", Some("before".into())))?;
    let next_before = (page.len() == limit as usize).then(|| page.last().map(|r| r.id.clone())).flatten();
    let names = key_names(&state, &principal).await?;
    #[derive(Serialize)]
    struct Events {
        events: Vec<Event>,
        next_before: Option<String>,
    }
    let events = page.into_iter().map(|r| event(r, &names)).collect();
    Ok(Json(Events { events, next_before }).into_response())
}

/// OpenRouter's `GET /v1/activity?date=`: one row per day × model × provider over the last 30
/// days and today (local days), or one day of them.
pub async fn openrouter_activity(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<Params>, QueryRejection>,
) -> Result<Response, ApiError> {
    let principal = manager(&state, &headers)?;
    let params = params(query)?;
    let today = today(&principal);
    let (mut from, mut to) = (today - 30, today);
    if let Some(date) = params.get("date") {
        let day = parse_date(date, "date")?;
        if !(from..=to).contains(&day) {
            let message = format!("`date` must be within the last 30 days ({} to {})", date_of(from), date_of(to));
            return Err(ApiError::invalid(message, Some("date".into())));
        }
        (from, to) = (day, day);
    }
    let model = text_param(&params, "model")?;
    let group = group(true, false, true, true);
    let query = UsageQuery { org_id: &principal.org.id, from_day: from, to_day: to, model, key_id: None, group };
    let rows = rows(&state, &query).await?;
    Ok(Json(Data { data: report::openrouter_activity(&rows) }).into_response())
}

/// One try of one route, in `provider_responses`.
#[derive(Serialize)]
struct ProviderResponse {
    provider: String,
    model: String,
    /// `success`, or how the attempt failed (`server`, `timeout`, …).
    status: String,
    http_status: Option<u16>,
    latency: u64,
}

#[derive(serde::Deserialize)]
struct StoredAttempt {
    provider: String,
    model: String,
    outcome: String,
    status: Option<u16>,
    latency_ms: u64,
}

fn provider_responses(attempts: &str) -> Vec<ProviderResponse> {
    let stored: Vec<StoredAttempt> = serde_json::from_str(attempts).unwrap_or_default();
    stored
        .into_iter()
        .map(|a| ProviderResponse { provider: a.provider, model: a.model, status: a.outcome, http_status: a.status, latency: a.latency_ms })
        .collect()
}

/// `GET /v1/generation`'s `data`: OpenRouter's field names, plus Marga's own.
#[derive(Serialize)]
struct GenerationView {
    id: String,
    upstream_id: Option<String>,
    created_at: Value,
    model: String,
    upstream_model: Option<String>,
    provider_name: Option<String>,
    provider: Option<String>,
    api_type: String,
    streamed: bool,
    cancelled: bool,
    is_byok: bool,
    status: String,
    http_status: i64,
    error: Option<String>,
    tokens_prompt: i64,
    tokens_completion: i64,
    native_tokens_prompt: i64,
    native_tokens_completion: i64,
    native_tokens_reasoning: i64,
    native_tokens_cached: i64,
    usage_estimated: bool,
    total_cost: Amount,
    currency: String,
    usage: Amount,
    cache_discount: Option<Amount>,
    latency: i64,
    time_to_first_token: Option<i64>,
    generation_time: Option<i64>,
    moderation_latency: Option<i64>,
    finish_reason: Option<String>,
    native_finish_reason: Option<String>,
    provider_responses: Vec<ProviderResponse>,
    origin: Option<String>,
    http_referer: Option<String>,
    user_agent: Option<String>,
    external_user: Option<String>,
    key_id: Option<String>,
}

fn generation_view(r: GenerationRecord, state: &AppState) -> GenerationView {
    let provider_name = r.provider.as_deref().map(|p| state.registry.provider(p).map_or(p, |e| e.name()).to_owned());
    GenerationView {
        created_at: iso(r.created_at_ms),
        upstream_id: None,
        provider_name,
        provider: r.provider,
        upstream_model: r.upstream_model,
        api_type: r.endpoint,
        streamed: r.streamed,
        cancelled: r.cancelled,
        is_byok: r.byok,
        status: r.status,
        http_status: r.http_status,
        error: r.error,
        tokens_prompt: r.prompt_tokens,
        tokens_completion: r.completion_tokens,
        native_tokens_prompt: r.prompt_tokens,
        native_tokens_completion: r.completion_tokens,
        native_tokens_reasoning: r.reasoning_tokens,
        native_tokens_cached: r.cached_tokens,
        usage_estimated: r.usage_estimated,
        total_cost: amount(r.cost_nanos),
        usage: amount(r.cost_nanos),
        currency: r.currency,
        cache_discount: None,
        latency: r.latency_ms,
        time_to_first_token: r.ttft_ms,
        generation_time: r.generation_time_ms,
        moderation_latency: None,
        native_finish_reason: r.finish_reason.clone(),
        finish_reason: r.finish_reason,
        provider_responses: provider_responses(&r.attempts),
        origin: r.referer.clone(),
        http_referer: r.referer,
        user_agent: r.user_agent,
        external_user: r.end_user,
        key_id: r.key_id,
        model: r.model,
        id: r.id,
    }
}

/// `GET /v1/generation?id=`: one generation of the caller's organisation, or 404.
pub async fn generation(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<Params>, QueryRejection>,
) -> Result<Response, ApiError> {
    let principal = state.admission.accounts.authenticate(&headers)?;
    let params = params(query)?;
    let id = text_param(&params, "id")?.ok_or_else(|| ApiError::invalid("`id` is required", Some("id".into())))?;
    let record = state.usage.repo.org_generation(&principal.org.id, id).await.map_err(internal)?;
    let record = record.ok_or(ApiError::NotFound)?;
    Ok(Json(Data { data: generation_view(record, &state) }).into_response())
}
