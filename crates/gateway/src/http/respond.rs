//! Building responses: the served-by headers every answer carries, JSON and SSE bodies, and
//! the record of a request that failed after it was admitted.

use std::convert::Infallible;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::Stream;

use super::AppState;
use crate::error::ApiError;
use crate::money::{Currency, Money};
use crate::pipeline::plan::Plan;
use crate::pipeline::{record, Candidate, Outcome, RequestCtx};

static X_BR_PROVIDER: HeaderName = HeaderName::from_static("x-br-provider");
static X_BR_MODEL: HeaderName = HeaderName::from_static("x-br-model");
static X_GENERATION_ID: HeaderName = HeaderName::from_static("x-generation-id");
static X_BR_ROUTE: HeaderName = HeaderName::from_static("x-br-route");

static X_BR_COST: HeaderName = HeaderName::from_static("x-br-cost");
static X_BR_COST_CURRENCY: HeaderName = HeaderName::from_static("x-br-cost-currency");
static X_BR_COST_INR: HeaderName = HeaderName::from_static("x-br-cost-inr");
static X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// `x-br-provider` (the provider id that served), `x-br-model`, `x-generation-id`, the compact
/// routing decision `x-br-route`, the cost (`x-br-cost`, exact, in the organisation's currency;
/// unknown yet for streams, whose cost is in the final usage chunk) and the rate-limit standing.
pub fn served_headers(ctx: &RequestCtx, plan: &Plan, candidate: &Candidate, cost: Option<Money>) -> HeaderMap {
    let failed: Vec<(String, &'static str)> = ctx
        .attempts
        .iter()
        .filter(|a| a.outcome != "success")
        .map(|a| (format!("{}/{}", a.provider, a.model), a.outcome))
        .collect();
    // The header takes the string's buffer as it is (no copy).
    let route = HeaderValue::from_maybe_shared(Bytes::from(plan.header(&candidate.route, &failed)));
    // Room for every header a response can carry (four, the cost's three, the rate limit's
    // three, the content type's and the stream's), so that the map never grows.
    let mut headers = HeaderMap::with_capacity(16);
    let pairs = [
        (&X_BR_PROVIDER, candidate.route.provider.id.as_str()),
        (&X_BR_MODEL, candidate.model.id.as_str()),
        (&X_GENERATION_ID, ctx.id.as_str()),
    ];
    for (name, value) in pairs {
        insert(&mut headers, name, value);
    }
    if let Ok(route) = route {
        headers.insert(X_BR_ROUTE.clone(), route);
    }
    if let Some(cost) = cost {
        let amount = cost.amount.normalize().to_string();
        insert(&mut headers, &X_BR_COST, &amount);
        insert(&mut headers, &X_BR_COST_CURRENCY, cost.currency.code());
        if cost.currency == Currency::Inr {
            insert(&mut headers, &X_BR_COST_INR, &amount);
        }
    }
    if ctx.quota.limit > 0 {
        insert(&mut headers, &X_RATELIMIT_LIMIT, &ctx.quota.limit.to_string());
        insert(&mut headers, &X_RATELIMIT_REMAINING, &ctx.quota.remaining.to_string());
        insert(&mut headers, &X_RATELIMIT_RESET, &ctx.quota.reset_s.to_string());
    }
    headers
}

fn insert(headers: &mut HeaderMap, name: &HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name.clone(), value);
    }
}

pub fn json_response(
    body: Result<Vec<u8>, serde_json::Error>,
    ctx: &RequestCtx,
    plan: &Plan,
    candidate: &Candidate,
    cost: Option<Money>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(e) => return ApiError::Internal(e.into()).into_response(),
    };
    let mut headers = served_headers(ctx, plan, candidate, cost);
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    ok_with(headers, Body::from(body))
}

/// A 200 response with exactly `headers` (built in place: no second header map to merge).
fn ok_with(headers: HeaderMap, body: Body) -> Response {
    let mut response = Response::new(body);
    *response.headers_mut() = headers;
    response
}

pub fn sse_response(
    stream: impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
    mut headers: HeaderMap,
) -> Response {
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(HeaderName::from_static("x-accel-buffering"), HeaderValue::from_static("no"));
    ok_with(headers, Body::from_stream(stream))
}

/// Records a request that was admitted but not served, and passes the error on.
pub fn record_failure(state: &AppState, ctx: &RequestCtx, error: ApiError) -> ApiError {
    let outcome = Outcome {
        status: "error",
        http_status: error.status().as_u16(),
        route: None,
        usage: None,
        usage_estimated: false,
        ttft_ms: None,
        finish_reason: None,
        error: Some(error.to_string()),
        cost: None,
    };
    let mut record = record(ctx, &outcome);
    record.provider = ctx.attempts.last().map(|a| a.provider.clone());
    record.upstream_model = ctx.attempts.last().map(|a| a.model.clone());
    state.log.record(record);
    error
}
