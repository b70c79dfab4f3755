//! Logs, metrics and traces: structured logs through `tracing` (text or JSON, with one access
//! line per request), Prometheus metrics through the `metrics` facade, and OpenTelemetry
//! traces over OTLP ([`otlp`], only when an endpoint is configured). The recorder, the
//! subscriber and the tracer are process-wide and installed once.

pub mod otlp;

use std::sync::OnceLock;

use marga_protocol::openai::Usage;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::config::LogFormat;
use crate::pipeline::{Outcome, RequestCtx};

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Latency buckets in seconds, from 100 µs to 2 minutes.
const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// The target of the access log lines (`RUST_LOG=info,marga::access=off` silences them).
pub const ACCESS_TARGET: &str = "marga::access";

/// Installs the Prometheus recorder (once per process) and returns its handle.
pub fn prometheus() -> Option<PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
                .ok()?;
            match builder.install_recorder() {
                Ok(handle) => Some(handle),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        })
        .clone()
}

/// Structured logs to stderr, as text or one JSON object per line (fields at the top level).
/// The level comes from `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).with_span_list(false).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    if result.is_err() {
        // Already initialised (tests start several apps in one process).
    }
}

/// A request has finished: its access log line, and its span when traces are exported.
/// Identifiers only (the key's public id, never the key; no prompt, no upstream message).
pub fn request_finished(ctx: &RequestCtx, outcome: &Outcome<'_>, usage: &Usage, latency_ms: u64) {
    let (provider, upstream_model) = match outcome.route {
        Some(route) => (route.provider.id.as_str(), route.upstream_model.as_str()),
        None => ctx.attempts.last().map_or(("none", ""), |a| (a.provider.as_str(), a.model.as_str())),
    };
    tracing::info!(
        target: ACCESS_TARGET,
        id = %ctx.id,
        org = %ctx.principal.org.id,
        key_id = %ctx.principal.key.id,
        endpoint = ctx.endpoint.as_str(),
        model = %ctx.model.id,
        provider,
        upstream_model,
        status = outcome.status,
        http_status = outcome.http_status,
        streamed = ctx.streamed,
        latency_ms,
        ttft_ms = outcome.ttft_ms,
        prompt_tokens = usage.prompt_tokens,
        completion_tokens = usage.completion_tokens,
        attempts = ctx.attempts.len(),
        "request"
    );
    otlp::export_request(ctx, outcome, usage, latency_ms);
}
