//! Logs, metrics and traces: structured logs through `tracing` (text or JSON, with one access
//! line per request), Prometheus metrics through the `metrics` facade, and OpenTelemetry
//! traces over OTLP ([`otlp`], only when an endpoint is configured). The recorder, the
//! subscriber and the tracer are process-wide and installed once.

pub mod otlp;

use std::sync::OnceLock;
use std::time::Duration;

use marga_protocol::openai::Usage;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::config::LogFormat;
use crate::pipeline::{Outcome, RequestCtx};

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
static LOG_DROPS: OnceLock<tracing_appender::non_blocking::ErrorCounter> = OnceLock::new();

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

/// How often histogram observations are folded into their buckets. The recorder keeps every
/// observation until then (or until a scrape renders them): without this, a gateway that
/// nobody scraped kept 8 bytes per observation, two or more per request, for ever (its
/// resident memory grew by ≈ 15 MB per million requests).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Folds the recorder's pending histogram observations into their buckets every
/// [`UPKEEP_EVERY`], for as long as the task runs.
pub fn spawn_upkeep(handle: PrometheusHandle) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    })
}

/// Keeps the log writer thread alive; dropping it writes what is still buffered.
#[must_use = "log lines buffered when the guard is dropped are written then; keep it until exit"]
pub struct LogGuard {
    _writer: Option<tracing_appender::non_blocking::WorkerGuard>,
}

/// Lines buffered for the log writer thread at most; past it lines are dropped (and counted
/// in `marga_log_lines_dropped_total`) rather than making a request wait for stderr.
const LOG_BUFFER_LINES: usize = 65_536;

/// Structured logs to stderr, as text or one JSON object per line (fields at the top level),
/// written by a thread of their own. The level comes from `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat) -> LogGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .lossy(true)
        .finish(std::io::stderr());
    let drops = writer.error_counter();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    let result = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).with_span_list(false).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    match result {
        Ok(()) => {
            let _ = LOG_DROPS.set(drops);
            LogGuard { _writer: Some(guard) }
        }
        // Already initialised (tests start several apps in one process).
        Err(_) => LogGuard { _writer: None },
    }
}

/// Log lines dropped because the log writer fell behind.
pub fn log_lines_dropped() -> u64 {
    LOG_DROPS.get().map_or(0, |c| c.dropped_lines() as u64)
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
    otlp::export_request(ctx, outcome, usage);
}
