//! The attempt loop: walk the planned candidates until one answers. A retryable failure
//! (connect, timeout, 429, 5xx, malformed answer) moves to the next candidate while the retry
//! budget allows; a refusal of the request itself stops at once. Every attempt is recorded in
//! the context, in metrics and in the route's health (breaker, 429 parking).

use std::future::Future;
use std::time::{Duration, Instant};

use marga_providers::{ErrorKind, ProviderError};
use tokio::time::Instant as Deadline;

use super::{AttemptRecord, Candidate, RequestCtx};
use crate::error::ApiError;
use crate::routing::Routing;

/// A successful attempt: the value, the candidate that produced it, and how long it took.
pub struct Served<T> {
    pub value: T,
    pub candidate: Candidate,
    pub elapsed: Duration,
}

/// Tries `op` on each candidate in order, at most `max_attempts` times, each try bounded by
/// the first-token timeout and all of them by the total timeout. Success is not recorded in
/// the route's health here: the caller knows when the answer is complete.
pub async fn first_success<T, F, Fut>(
    ctx: &mut RequestCtx,
    candidates: &[Candidate],
    routing: &Routing,
    mut op: F,
) -> Result<Served<T>, ApiError>
where
    F: FnMut(Candidate) -> Fut,
    Fut: Future<Output = Result<T, ProviderError>>,
{
    let settings = &routing.settings;
    let deadline = Deadline::now() + settings.total_timeout;
    let mut last: Option<(String, ProviderError)> = None;
    routing.budget.deposit();
    let traceparent = ctx.client.span.as_ref().and_then(crate::telemetry::otlp::RequestSpan::traceparent);
    for (i, candidate) in candidates.iter().take(settings.max_attempts).enumerate() {
        let remaining = deadline.saturating_duration_since(Deadline::now());
        if remaining.is_zero() || (i > 0 && !routing.budget.withdraw()) {
            break;
        }
        let started = Instant::now();
        let limit = settings.first_token_timeout.min(remaining);
        candidate.route.health.begin_attempt();
        let attempt = marga_providers::with_traceparent(traceparent.clone(), op(candidate.clone()));
        let result = match tokio::time::timeout(limit, attempt).await {
            Ok(result) => result,
            Err(_) => Err(ProviderError::new(ErrorKind::Timeout, format!("no answer within {limit:?}"))),
        };
        note_attempt(ctx, candidate, &result, started);
        match result {
            Ok(value) => return Ok(Served { value, candidate: candidate.clone(), elapsed: started.elapsed() }),
            Err(error) if !error.is_retryable() => {
                return Err(ApiError::from_upstream(&candidate.route.provider.id, error));
            }
            Err(error) => {
                tracing::debug!(route = %candidate.route.label(), kind = error.kind.as_str(), "attempt failed; trying next route");
                last = Some((candidate.route.provider.id.clone(), error));
            }
        }
    }
    Err(match last {
        Some((provider, error)) => ApiError::from_upstream(&provider, error),
        None => ApiError::Timeout(settings.total_timeout),
    })
}

fn note_attempt<T>(ctx: &mut RequestCtx, candidate: &Candidate, result: &Result<T, ProviderError>, started: Instant) {
    let route = &candidate.route;
    let (outcome, status) = match result {
        Ok(_) => ("success", None),
        Err(e) => {
            if e.kind == ErrorKind::RateLimited {
                route.health.record_rate_limited(e.retry_after);
            } else if e.is_upstream_fault() {
                route.health.record_fault();
            }
            (e.kind.as_str(), e.status)
        }
    };
    if outcome == "success" {
        route.metrics.attempt_success.increment(1);
    } else {
        metrics::counter!("marga_upstream_attempts_total", "provider" => route.provider.id.clone(), "outcome" => outcome)
            .increment(1);
    }
    ctx.attempts.push(AttemptRecord {
        provider: route.provider.id.clone(),
        model: route.upstream_model.clone(),
        outcome,
        status,
        latency_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        started_ms: u64::try_from(started.saturating_duration_since(ctx.started).as_millis()).unwrap_or(u64::MAX),
    });
}
