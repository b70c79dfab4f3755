//! OpenTelemetry traces over OTLP/HTTP (protobuf), when `[telemetry] otlp_endpoint` (or
//! `MARGA_OTLP_ENDPOINT`) is set: one span per request, following the OpenTelemetry GenAI
//! semantic conventions (`gen_ai.operation.name`, `gen_ai.provider.name`,
//! `gen_ai.request.model`, `gen_ai.response.model`, `gen_ai.usage.*`, `error.type`, …).
//!
//! The span is built once the request has finished, from what the request log records, with
//! the request's real start time; spans go to a bounded queue drained by the SDK's batch
//! exporter thread (a full queue drops spans, never waits). A caller's W3C `traceparent`
//! header makes the span its child. When no endpoint is configured the tracer is never
//! installed: [`request_span`] and [`export_request`] are one atomic load each.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use marga_protocol::openai::Usage;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId, TraceState, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Array, Context, KeyValue, StringValue, Value};
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, IdGenerator as _, RandomIdGenerator, SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

use crate::config::TelemetryConfig;
use crate::pipeline::{Endpoint, Outcome, RequestCtx};

static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// How often the batch exporter sends what it holds.
const EXPORT_EVERY: Duration = Duration::from_secs(1);
/// Spans held for export at most (more are dropped).
const MAX_QUEUE: usize = 8192;
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The installed exporter; [`OtlpGuard::shutdown`] sends what is left.
pub struct OtlpGuard {
    provider: SdkTracerProvider,
}

impl OtlpGuard {
    /// Exports the spans still queued and stops the exporter (call outside the async runtime).
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "OpenTelemetry exporter did not shut down cleanly");
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot start the OTLP exporter: {0}")]
pub struct OtlpError(String);

/// Installs the OTLP exporter when an endpoint is configured (once per process). Call it
/// before the async runtime starts.
pub fn init(config: &TelemetryConfig) -> Result<Option<OtlpGuard>, OtlpError> {
    let Some(endpoint) = &config.otlp_endpoint else { return Ok(None) };
    let exporter = SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(traces_url(endpoint))
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| OtlpError(e.to_string()))?;
    let batch = BatchConfigBuilder::default().with_scheduled_delay(EXPORT_EVERY).with_max_queue_size(MAX_QUEUE).build();
    let processor = BatchSpanProcessor::builder(exporter).with_batch_config(batch).build();
    let resource = Resource::builder()
        .with_service_name(config.service_name.clone())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let provider = SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource).build();
    if TRACER.set(provider.tracer("marga")).is_err() {
        tracing::warn!("an OTLP exporter is already installed in this process");
    }
    Ok(Some(OtlpGuard { provider }))
}

/// `endpoint` as the URL of the traces signal: an endpoint given as a base
/// (`http://collector:4318`) gets `/v1/traces`, as `OTEL_EXPORTER_OTLP_ENDPOINT` does.
pub fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    }
}

/// Whether spans are exported.
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

/// A request's span, decided when the request arrives so that its upstream calls can name it
/// as their parent: in the caller's trace (its W3C `traceparent`) or in a new one.
#[derive(Clone, Debug)]
pub struct RequestSpan {
    /// The caller's span, when it sent a valid `traceparent`.
    pub parent: Option<SpanContext>,
    pub trace_id: TraceId,
    pub span_id: SpanId,
    flags: TraceFlags,
}

impl RequestSpan {
    /// The `traceparent` for the upstream calls: this span as their parent.
    pub fn traceparent(&self) -> Option<http::HeaderValue> {
        let value = format!("00-{}-{}-{:02x}", self.trace_id, self.span_id, self.flags.to_u8());
        http::HeaderValue::from_str(&value).ok()
    }
}

/// The request's span, when spans are exported (else `None`, one atomic load).
pub fn request_span(headers: &http::HeaderMap) -> Option<RequestSpan> {
    if !enabled() {
        return None;
    }
    let parent = headers.get("traceparent").and_then(|v| v.to_str().ok()).and_then(parse_traceparent);
    let ids = RandomIdGenerator::default();
    let trace_id = parent.as_ref().map_or_else(|| ids.new_trace_id(), SpanContext::trace_id);
    let span_id = ids.new_span_id();
    let flags = parent.as_ref().map_or(TraceFlags::SAMPLED, SpanContext::trace_flags);
    Some(RequestSpan { parent, trace_id, span_id, flags })
}

/// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`; `None` for anything else.
fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let well_formed = version.len() == 2 && version != "ff" && trace.len() == 32 && span.len() == 16 && flags.len() == 2;
    if !well_formed || (version == "00" && parts.next().is_some()) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok().filter(|id| *id != TraceId::INVALID)?;
    let span_id = SpanId::from_hex(span).ok().filter(|id| *id != SpanId::INVALID)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(SpanContext::new(trace_id, span_id, TraceFlags::new(flags), true, TraceState::default()))
}

/// The GenAI `gen_ai.operation.name` of an endpoint.
fn operation(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::Chat => "chat",
        Endpoint::Completions => "text_completion",
        Endpoint::Embeddings => "embeddings",
    }
}

/// The GenAI `gen_ai.provider.name` of a provider kind.
fn provider_name(kind: marga_providers::ProviderKind) -> &'static str {
    match kind {
        marga_providers::ProviderKind::Openai => "openai",
        marga_providers::ProviderKind::Anthropic => "anthropic",
        marga_providers::ProviderKind::Gemini => "gcp.gemini",
        marga_providers::ProviderKind::Sandbox => "marga.sandbox",
    }
}

/// `error.type` of a failed request: the HTTP status it ended with, or how a stream ended.
fn error_type(outcome: &Outcome<'_>) -> Option<String> {
    match outcome.status {
        "success" => None,
        "error" => Some(outcome.http_status.to_string()),
        other => Some(other.to_owned()),
    }
}

/// Exports the span of a finished request (nothing when no exporter is installed).
pub fn export_request(ctx: &RequestCtx, outcome: &Outcome<'_>, usage: &Usage) {
    let Some(tracer) = TRACER.get() else { return };
    let end = SystemTime::now();
    let start = end.checked_sub(ctx.started.elapsed()).unwrap_or(end);
    let error = error_type(outcome);
    let mut attributes = attributes(ctx, outcome, usage);
    if let Some(kind) = &error {
        attributes.push(KeyValue::new("error.type", kind.clone()));
    }
    let mut builder = tracer
        .span_builder(format!("{} {}", operation(ctx.endpoint), ctx.model.id))
        .with_kind(SpanKind::Client)
        .with_start_time(start)
        .with_attributes(attributes);
    let request_span = ctx.client.span.as_ref();
    // The ids the upstream calls were told (their `traceparent`), so that their spans are
    // this span's children.
    builder.trace_id = request_span.map(|s| s.trace_id);
    builder.span_id = request_span.map(|s| s.span_id);
    let mut span = match request_span.and_then(|s| s.parent.as_ref()) {
        Some(parent) => builder.start_with_context(tracer, &Context::new().with_remote_span_context(parent.clone())),
        None => builder.start(tracer),
    };
    if let Some(kind) = error {
        span.set_status(Status::error(kind));
    }
    span.end_with_timestamp(end);
}

/// The span's attributes: GenAI conventions first, then Marga's own.
fn attributes(ctx: &RequestCtx, outcome: &Outcome<'_>, usage: &Usage) -> Vec<KeyValue> {
    let mut attributes = vec![
        KeyValue::new("gen_ai.operation.name", operation(ctx.endpoint)),
        KeyValue::new("gen_ai.request.model", ctx.model.id.clone()),
        KeyValue::new("gen_ai.response.id", ctx.id.clone()),
        KeyValue::new("gen_ai.usage.input_tokens", to_i64(usage.prompt_tokens)),
        KeyValue::new("gen_ai.usage.output_tokens", to_i64(usage.completion_tokens)),
        KeyValue::new("http.response.status_code", i64::from(outcome.http_status)),
        KeyValue::new("marga.status", outcome.status),
        KeyValue::new("marga.streamed", ctx.streamed),
        KeyValue::new("marga.org.id", ctx.principal.org.id.clone()),
        KeyValue::new("marga.key.id", ctx.principal.key.id.clone()),
        KeyValue::new("marga.attempts", ctx.attempts.len() as i64),
    ];
    if let Some(route) = outcome.route {
        let provider = provider_name(route.provider.kind());
        attributes.push(KeyValue::new("gen_ai.provider.name", provider));
        attributes.push(KeyValue::new("gen_ai.system", provider));
        attributes.push(KeyValue::new("gen_ai.response.model", route.upstream_model.clone()));
        attributes.push(KeyValue::new("marga.provider.id", route.provider.id.clone()));
        attributes.push(KeyValue::new("marga.route", route.label()));
    }
    if let Some(reason) = &outcome.finish_reason {
        let reasons = Array::String(vec![StringValue::from(reason.clone())]);
        attributes.push(KeyValue::new("gen_ai.response.finish_reasons", Value::Array(reasons)));
    }
    if let Some(ttft) = outcome.ttft_ms {
        attributes.push(KeyValue::new("marga.ttft_ms", to_i64(ttft)));
    }
    if let Some(cost) = outcome.cost {
        attributes.push(KeyValue::new("marga.cost", cost.amount.to_string()));
        attributes.push(KeyValue::new("marga.currency", cost.currency.code()));
    }
    attributes
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_endpoint_gets_the_traces_path() {
        assert_eq!(traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/v1/traces"), "http://c:4318/v1/traces");
        assert!(!enabled(), "no exporter is installed unless configured");
    }

    #[test]
    fn traceparent_is_parsed_strictly() {
        let parsed = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let parsed = parsed.as_ref().map(|p| (p.trace_id().to_string(), p.span_id().to_string(), p.is_sampled(), p.is_remote()));
        let expected = ("4bf92f3577b34da6a3ce929d0e0e4736".to_owned(), "00f067aa0ba902b7".to_owned(), true, true);
        assert_eq!(parsed, Some(expected));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-xyz92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
        assert!(request_span(&http::HeaderMap::new()).is_none(), "no span when no exporter is installed");
    }
}
