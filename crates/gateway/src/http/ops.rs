//! Operations endpoints: `GET /health` (providers, and every route's breaker) and
//! `GET /metrics` (Prometheus text format; `marga_breaker_state` is 0 closed, 1 half-open, 2 open).
//! Gauges that describe a state (breakers, queue depths) are read at each scrape; every metric
//! is listed in docs/operations.md.

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use crate::routing::BreakerState;

pub async fn health(State(state): State<AppState>) -> Response {
    let providers: Vec<_> = state
        .registry
        .providers()
        .map(|p| json!({ "id": p.id, "name": p.name(), "kind": p.kind().as_str(), "region": p.config.region }))
        .collect();
    let routes: Vec<_> = state
        .registry
        .routes()
        .map(|(m, r)| {
            let h = r.health.view();
            json!({ "model": m.id, "route": r.label(), "breaker": h.breaker, "failure_rate": h.failure_rate,
                    "latency_ms": h.latency_ms, "ttft_ms": h.ttft_ms })
        })
        .collect();
    let body = json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "models": state.registry.models().len(),
        "providers": providers,
        "routes": routes,
    });
    axum::Json(body).into_response()
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    match &state.prometheus {
        Some(handle) => {
            for (model, route) in state.registry.routes() {
                let value = match route.health.view().breaker {
                    BreakerState::Closed => 0.0,
                    BreakerState::HalfOpen => 1.0,
                    BreakerState::Open => 2.0,
                };
                metrics::gauge!("marga_breaker_state", "model" => model.id.clone(), "route" => route.label()).set(value);
            }
            metrics::gauge!("marga_request_log_queue").set(state.log.depth() as f64);
            metrics::gauge!("marga_ledger_queue").set(state.admission.ledger.queue_depth() as f64);
            metrics::counter!("marga_log_lines_dropped_total").absolute(crate::telemetry::log_lines_dropped());
            let content_type = HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");
            ([(header::CONTENT_TYPE, content_type)], handle.render()).into_response()
        }
        None => (StatusCode::SERVICE_UNAVAILABLE, "metrics recorder unavailable\n").into_response(),
    }
}
