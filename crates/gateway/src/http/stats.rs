//! Public statistics, anonymous and cached: `GET /v1/rankings?period=7d|30d` (the most-used
//! catalog models by tokens, every organisation, BYOK left out) and `GET /v1/models/{id}/stats`
//! (7-day success rate, p50/p95 latency and tokens/s, per route).
//!
//! Each answer is rendered once per [`TTL`] and served from memory in between: a call costs a
//! hash-map lookup. A miss computes under the cache's lock, so concurrent misses wait for one
//! computation instead of each querying the database. Entries are keyed by catalog model ids
//! (validated first), so the cache is bounded by the catalog.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use marga_store::RouteStats;
use serde::Serialize;

use super::keys::internal;
use super::AppState;
use crate::error::ApiError;
use crate::pipeline::unix_now_ms;

/// How long a rendered answer is served before it is computed again.
pub const TTL: Duration = Duration::from_secs(60);
/// Model stats look back this many UTC days (today included).
const STATS_DAYS: i64 = 7;
const DAY_MS: i64 = 86_400_000;
/// Latency percentiles are taken over at most this many of the newest successes.
const LATENCY_SAMPLE: u32 = 100_000;
/// Models listed per rankings window.
const RANKED: usize = 100;

/// Rendered public answers by cache key.
#[derive(Default)]
pub struct PublicStats {
    cache: tokio::sync::Mutex<HashMap<String, (Instant, Bytes)>>,
}

impl PublicStats {
    /// The cached body under `key`, or `compute`'s, stored for [`TTL`].
    async fn get_or_compute<F, Fut>(&self, key: &str, compute: F) -> Result<Bytes, ApiError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Bytes, ApiError>>,
    {
        let mut cache = self.cache.lock().await;
        if let Some((at, body)) = cache.get(key) {
            if at.elapsed() < TTL {
                return Ok(body.clone());
            }
        }
        let body = compute().await?;
        cache.insert(key.to_owned(), (Instant::now(), body.clone()));
        Ok(body)
    }
}

fn cached_json(body: Bytes) -> Response {
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static("application/json")),
        (header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=60")),
    ];
    (headers, body).into_response()
}

fn to_bytes(value: &impl Serialize) -> Result<Bytes, ApiError> {
    serde_json::to_vec(value).map(Bytes::from).map_err(|e| ApiError::Internal(e.into()))
}

#[derive(Serialize)]
struct Ranked {
    rank: usize,
    model: String,
    name: String,
    tokens: i64,
    requests: i64,
}

/// The catalog models with the most tokens over the `days` UTC days ending today.
async fn ranking(state: &AppState, days: i64) -> Result<Vec<Ranked>, ApiError> {
    let today = unix_now_ms().div_euclid(DAY_MS);
    let mut rows = state.usage.repo.model_tokens(today - (days - 1)).await.map_err(internal)?;
    rows.retain(|r| r.tokens > 0 && state.registry.model(&r.model).is_some_and(|m| m.id == r.model));
    rows.sort_by(|a, b| b.tokens.cmp(&a.tokens).then(b.requests.cmp(&a.requests)).then(a.model.cmp(&b.model)));
    Ok(rows
        .into_iter()
        .take(RANKED)
        .enumerate()
        .map(|(i, r)| {
            let name = state.registry.model(&r.model).and_then(|m| m.config.name.clone()).unwrap_or_else(|| r.model.clone());
            Ranked { rank: i + 1, model: r.model, name, tokens: r.tokens, requests: r.requests }
        })
        .collect())
}

/// `GET /v1/rankings?period=7d|30d`: both windows (`windows`), or one (`period`, `data`).
pub async fn rankings(
    State(state): State<AppState>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = query.map_err(|e| ApiError::invalid(format!("invalid query string: {e}"), None))?;
    let period = params.get("period").map(String::as_str);
    let key = match period {
        None => "rankings",
        Some("7d") => "rankings:7d",
        Some("30d") => "rankings:30d",
        Some(other) => {
            return Err(ApiError::invalid(format!("`period` must be 7d or 30d, not `{other}`"), Some("period".into())))
        }
    };
    let body = state
        .usage
        .public
        .get_or_compute(key, || async {
            #[derive(Serialize)]
            struct Windows {
                #[serde(rename = "7d")]
                week: Vec<Ranked>,
                #[serde(rename = "30d")]
                month: Vec<Ranked>,
            }
            match period {
                Some(p) => {
                    let data = ranking(&state, if p == "7d" { 7 } else { 30 }).await?;
                    to_bytes(&serde_json::json!({ "period": p, "data": data }))
                }
                None => {
                    let windows = Windows { week: ranking(&state, 7).await?, month: ranking(&state, 30).await? };
                    to_bytes(&serde_json::json!({ "windows": windows }))
                }
            }
        })
        .await?;
    Ok(cached_json(body))
}

#[derive(Serialize, Default)]
struct Latency {
    p50: Option<i64>,
    p95: Option<i64>,
}

/// Nearest-rank percentiles of `sorted`.
fn latency(sorted: &[i64]) -> Latency {
    let at = |q: f64| {
        let n = sorted.len();
        (n > 0).then(|| sorted[((q * n as f64).ceil() as usize).clamp(1, n) - 1])
    };
    Latency { p50: at(0.50), p95: at(0.95) }
}

fn ratio(part: i64, whole: i64) -> Option<f64> {
    (whole > 0).then(|| (part as f64 / whole as f64 * 10_000.0).round() / 10_000.0)
}

fn tokens_per_second(tokens: i64, ms: i64) -> Option<f64> {
    (ms > 0).then(|| (tokens as f64 * 1000.0 / ms as f64 * 100.0).round() / 100.0)
}

#[derive(Serialize)]
struct RouteView {
    provider: String,
    requests: i64,
    successes: i64,
    errors: i64,
    /// Successes ÷ (successes + errors) of the requests this route served or failed last.
    success_rate: Option<f64>,
    /// Every attempt on the route, including those that were failed over.
    attempts: i64,
    attempt_success_rate: Option<f64>,
    latency_ms: Latency,
    tokens_per_second: Option<f64>,
}

#[derive(Serialize)]
struct ModelStats {
    model: String,
    window: &'static str,
    requests: i64,
    successes: i64,
    errors: i64,
    success_rate: Option<f64>,
    latency_ms: Latency,
    tokens_per_second: Option<f64>,
    routes: Vec<RouteView>,
}

fn model_stats(model: &str, routes: Vec<RouteStats>, mut latencies: Vec<(String, i64)>) -> ModelStats {
    latencies.sort_by_key(|(_, ms)| *ms);
    let all: Vec<i64> = latencies.iter().map(|(_, ms)| *ms).collect();
    let sum = |f: fn(&RouteStats) -> i64| routes.iter().map(f).sum::<i64>();
    let (successes, errors) = (sum(|r| r.successes), sum(|r| r.errors));
    let views = routes
        .iter()
        .map(|r| {
            let mine: Vec<i64> = latencies.iter().filter(|(p, _)| *p == r.provider).map(|(_, ms)| *ms).collect();
            RouteView {
                provider: r.provider.clone(),
                requests: r.requests,
                successes: r.successes,
                errors: r.errors,
                success_rate: ratio(r.successes, r.successes + r.errors),
                attempts: r.attempts,
                attempt_success_rate: ratio(r.attempts - r.attempt_failures, r.attempts),
                latency_ms: latency(&mine),
                tokens_per_second: tokens_per_second(r.completion_tokens, r.generation_ms),
            }
        })
        .collect();
    ModelStats {
        model: model.to_owned(),
        window: "7d",
        requests: sum(|r| r.requests),
        successes,
        errors,
        success_rate: ratio(successes, successes + errors),
        latency_ms: latency(&all),
        tokens_per_second: tokens_per_second(sum(|r| r.completion_tokens), sum(|r| r.generation_ms)),
        routes: views,
    }
}

/// `GET /v1/models/{id}/stats` (reached through the `/models/{*id}` route).
pub async fn model(state: &AppState, name: &str) -> Result<Response, ApiError> {
    let model = state.registry.model(name).ok_or_else(|| ApiError::ModelNotFound { model: name.to_owned() })?;
    let id = model.id.clone();
    let body = state
        .usage
        .public
        .get_or_compute(&format!("stats:{id}"), || async {
            let since_day = unix_now_ms().div_euclid(DAY_MS) - (STATS_DAYS - 1);
            let since = since_day * DAY_MS;
            let repo = &state.usage.repo;
            let routes = repo.route_stats(&id, since_day).await.map_err(internal)?;
            let latencies = repo.route_latencies(&id, since, LATENCY_SAMPLE).await.map_err(internal)?;
            to_bytes(&serde_json::json!({ "data": model_stats(&id, routes, latencies) }))
        })
        .await?;
    Ok(cached_json(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<i64> = (1..=100).collect();
        let l = latency(&v);
        assert_eq!((l.p50, l.p95), (Some(50), Some(95)));
        let one = latency(&[7]);
        assert_eq!((one.p50, one.p95), (Some(7), Some(7)));
        assert!(latency(&[]).p50.is_none());
    }

    #[test]
    fn rates_and_throughput() {
        assert_eq!(ratio(3, 4), Some(0.75));
        assert_eq!(ratio(0, 0), None);
        assert_eq!(tokens_per_second(500, 250), Some(2000.0));
    }
}
