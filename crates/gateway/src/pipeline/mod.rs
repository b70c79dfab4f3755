//! The request path, as plain async code over one typed [`RequestCtx`]:
//! authenticate → plan routes → attempt with failover → stream → record usage.
//!
//! Handlers parse and authenticate; this module owns everything from the plan on. Failover is
//! allowed only until the first content byte reaches the client (see [`stream`]).

pub mod attempt;
pub mod plan;
pub mod stream;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use marga_protocol::openai::{ExactNumber, Usage};
use marga_store::GenerationRecord;

use crate::accounts::Principal;
use crate::admission::Billing;
use crate::error::ApiError;
use crate::limits::Quota;
use crate::money::{decimal_to_nanos_ceil, Money, TokenCounts, TokenPrice};
use crate::registry::{Model, Route};

pub use plan::Candidate;

/// Which API surface a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
    Embeddings,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
        }
    }
}

/// Who sent the request, for the request log.
#[derive(Clone, Debug, Default)]
pub struct ClientInfo {
    pub user_agent: Option<String>,
    pub referer: Option<String>,
    /// The OpenAI `user` field.
    pub end_user: Option<String>,
    /// The request's span (and the caller's, from its W3C `traceparent`), when traces are
    /// exported.
    pub span: Option<crate::telemetry::otlp::RequestSpan>,
}

/// One try of one route.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AttemptRecord {
    pub provider: String,
    pub model: String,
    pub outcome: &'static str,
    pub status: Option<u16>,
    pub latency_ms: u64,
    /// When the attempt began, in ms after the request arrived.
    pub started_ms: u64,
}

/// Everything one request carries through the pipeline.
pub struct RequestCtx {
    /// The generation id: the response `id` and `x-generation-id`.
    pub id: String,
    pub started: Instant,
    pub created: u64,
    /// Unix ms when the request arrived (the record's `created_at_ms`).
    pub created_ms: i64,
    pub principal: Principal,
    pub endpoint: Endpoint,
    /// The model the client asked for.
    pub model: Arc<Model>,
    pub streamed: bool,
    pub client: ClientInfo,
    /// The request brought its own upstream key (`upstream_key`).
    pub byok: bool,
    pub attempts: Vec<AttemptRecord>,
    /// What the request reserved; taken at settlement.
    pub billing: Option<Billing>,
    /// The caller's rate-limit standing, for the `X-RateLimit-*` headers.
    pub quota: Quota,
}

impl RequestCtx {
    pub fn new(principal: Principal, endpoint: Endpoint, model: Arc<Model>, streamed: bool, client: ClientInfo) -> Self {
        RequestCtx {
            id: format!("gen-{}", uuid::Uuid::now_v7().simple()),
            started: Instant::now(),
            created: unix_now(),
            created_ms: unix_now_ms(),
            principal,
            endpoint,
            model,
            streamed,
            client,
            byok: false,
            attempts: Vec::new(),
            billing: None,
            quota: Quota::default(),
        }
    }

    pub fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub fn unix_now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_millis()).unwrap_or(0)).unwrap_or(0)
}

/// How a request ended, for the record and metrics.
pub struct Outcome<'a> {
    pub status: &'static str,
    pub http_status: u16,
    pub route: Option<&'a Route>,
    pub usage: Option<&'a Usage>,
    pub usage_estimated: bool,
    pub ttft_ms: Option<u64>,
    pub finish_reason: Option<String>,
    pub error: Option<String>,
    /// What the caller was charged, in its organisation's currency.
    pub cost: Option<Money>,
}

/// Charges the request for `usage` on `route` (durably, through its billing), writes
/// `usage.cost`, and returns the cost. A request without billing costs nothing.
pub async fn settle(ctx: &mut RequestCtx, route: &Route, usage: &mut Usage) -> Result<Option<Money>, ApiError> {
    settle_at(ctx, &route.price, usage).await
}

/// [`settle`] at `price` (a native batch lane's item is charged at its route's batch price).
pub async fn settle_at(ctx: &mut RequestCtx, price: &TokenPrice, usage: &mut Usage) -> Result<Option<Money>, ApiError> {
    let Some(billing) = ctx.billing.take() else { return Ok(None) };
    let cost = if billing.is_free() {
        Money::zero(billing.currency())
    } else {
        billing.cost_at(price, token_counts(usage))
    };
    billing.settle(&ctx.id, cost).await?;
    usage.cost = ExactNumber::new(cost.amount.to_string());
    Ok(Some(cost))
}

pub fn token_counts(usage: &Usage) -> TokenCounts {
    TokenCounts { prompt: usage.prompt_tokens, completion: usage.completion_tokens, cached: usage.cached_tokens() }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// From the start of the attempt that served to now (`latency_ms` after arrival); `None` when
/// no attempt succeeded.
fn generation_time_ms(ctx: &RequestCtx, outcome: &Outcome<'_>, latency_ms: u64) -> Option<i64> {
    outcome.route?;
    let served = ctx.attempts.iter().rev().find(|a| a.outcome == "success")?;
    Some(to_i64(latency_ms.saturating_sub(served.started_ms)))
}

/// The request log's record of a finished request; also updates the metrics.
pub fn record(ctx: &RequestCtx, outcome: &Outcome<'_>) -> GenerationRecord {
    let usage = outcome.usage.cloned().unwrap_or_default();
    let cost = outcome.cost;
    let latency_ms = ctx.elapsed_ms();
    observe(ctx, outcome, &usage, latency_ms);
    GenerationRecord {
        id: ctx.id.clone(),
        created_at_ms: ctx.created_ms,
        org_id: Some(ctx.principal.org.id.clone()),
        key_id: Some(ctx.principal.key.id.clone()),
        endpoint: ctx.endpoint.as_str().to_owned(),
        model: ctx.model.id.clone(),
        provider: outcome.route.map(|r| r.provider.id.clone()),
        upstream_model: outcome.route.map(|r| r.upstream_model.clone()),
        streamed: ctx.streamed,
        status: outcome.status.to_owned(),
        http_status: i64::from(outcome.http_status),
        prompt_tokens: to_i64(usage.prompt_tokens),
        completion_tokens: to_i64(usage.completion_tokens),
        cached_tokens: to_i64(usage.cached_tokens()),
        reasoning_tokens: to_i64(usage.reasoning_tokens()),
        usage_estimated: outcome.usage_estimated,
        cost: cost.map(|c| c.amount.to_string()).unwrap_or_else(|| "0".to_owned()),
        currency: cost.map(|c| c.currency.code()).unwrap_or("USD").to_owned(),
        latency_ms: to_i64(latency_ms),
        ttft_ms: outcome.ttft_ms.map(to_i64),
        finish_reason: outcome.finish_reason.clone(),
        attempts: serde_json::to_string(&ctx.attempts).unwrap_or_else(|_| "[]".to_owned()),
        error: outcome.error.clone(),
        user_agent: ctx.client.user_agent.clone(),
        referer: ctx.client.referer.clone(),
        end_user: ctx.client.end_user.clone(),
        cost_nanos: cost.map_or(0, |c| decimal_to_nanos_ceil(c.amount)),
        generation_time_ms: generation_time_ms(ctx, outcome, latency_ms),
        cancelled: outcome.status == "cancelled",
        byok: ctx.byok,
        local_day: ctx.principal.org.timezone.day_number(ctx.created_ms),
    }
}

/// Metrics, the access log line and the trace span of a finished request.
fn observe(ctx: &RequestCtx, outcome: &Outcome<'_>, usage: &Usage, latency_ms: u64) {
    crate::telemetry::request_finished(ctx, outcome, usage, latency_ms);
    let Some(route) = outcome.route else {
        // Not served by any route: rare, so the label lookup is affordable.
        metrics::counter!("marga_requests_total", "model" => ctx.model.id.clone(), "provider" => "none", "route" => "none", "status" => outcome.status)
            .increment(1);
        return;
    };
    let m = &route.metrics;
    m.requests(outcome.status).increment(1);
    m.duration.record(latency_ms as f64 / 1000.0);
    if let Some(ttft) = outcome.ttft_ms {
        m.ttft.record(ttft as f64 / 1000.0);
    }
    m.prompt_tokens.increment(usage.prompt_tokens);
    m.completion_tokens.increment(usage.completion_tokens);
    if let Some(cost) = outcome.cost {
        let nanos = crate::money::decimal_to_nanos_ceil(cost.amount);
        m.cost(cost.currency).increment(u64::try_from(nanos).unwrap_or(0));
    }
}
