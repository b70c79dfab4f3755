//! Fake OpenAI, Anthropic and Gemini upstreams for end-to-end tests and
//! benchmarks, with typed failure injection.
//!
//! [`MockUpstream::start`] binds a local port and serves the three wire
//! formats in a background task, plus the OpenAI and Anthropic batch APIs
//! (see `batches.rs`; [`MockUpstream::batches_created`]). Behaviour is steered by a [`Scenario`]
//! (failures, delays, stream cuts, malformed bodies...), set in process with
//! [`MockUpstream::set_scenario`] or over HTTP:
//!
//! * `POST /__mock/scenario` — JSON [`Scenario`]; fields left out keep the
//!   server's defaults (the binary's `--latency-ms`, ...).
//! * `POST /__mock/reset` — counters, recorded request and scenario back to
//!   the defaults.
//! * `GET /__mock/stats` — `{"requests", "by_path", "streams_cancelled",
//!   "last_request"}`.
//!
//! The request path is kept cheap for benchmarks: atomics for counters, one
//! uncontended `RwLock` read per request for the scenario, a non-blocking
//! `try_lock` to remember the last request, no logging.

mod anthropic;
mod batches;
mod gemini;
mod openai;
mod respond;
mod text;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt as _;
use axum::Router;
use bytes::Bytes;
use serde_json::{json, Value};

/// Largest request body accepted (images inline as base64 can be big).
const BODY_LIMIT: usize = 64 * 1024 * 1024;

/// Failure injection and timing knobs; applies to requests that follow.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Scenario {
    /// Fail the first N requests (counted from when the scenario was set)
    /// with `fail_status`, then succeed. `u64::MAX` = always fail.
    pub fail_first: u64,
    /// Status of injected failures; 0 means 503.
    pub fail_status: u16,
    /// Sets a `retry-after` header (seconds) on injected failures.
    pub retry_after_s: Option<u64>,
    /// Delay before the response headers are sent.
    pub delay_ms: u64,
    /// Delay between stream events.
    pub chunk_delay_ms: u64,
    /// Stream: abort the connection (no terminator) after N content chunks.
    pub cut_after_chunks: Option<u32>,
    /// Stream: send the provider's in-band error event after N content
    /// chunks, then end the body.
    pub stream_error_after_chunks: Option<u32>,
    /// 200 with a body that is not valid JSON for the format (garbage SSE
    /// data for streams).
    pub malformed: bool,
    /// Overrides the assistant text.
    pub reply: Option<String>,
    /// OpenAI: never send the usage chunk, even with `include_usage`.
    pub omit_stream_usage: bool,
    /// Batch APIs: how long after its creation a batch ends (0: at the first poll).
    pub batch_delay_ms: u64,
}

/// An API request as the mock received it.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedRequest {
    /// Request path, e.g. `/v1/chat/completions`.
    pub path: String,
    /// Raw query string, if any.
    pub query: Option<String>,
    /// Headers in arrival order; names are lowercase.
    pub headers: Vec<(String, String)>,
    /// JSON body; `Null` when empty, a JSON string when not valid JSON.
    pub body: Value,
}

impl RecordedRequest {
    /// First value of the header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn from_raw(raw: &RawRequest) -> Self {
        let headers = raw
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = if raw.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&raw.body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&raw.body).into_owned()))
        };
        RecordedRequest {
            path: raw.uri.path().to_owned(),
            query: raw.uri.query().map(str::to_owned),
            headers,
            body,
        }
    }

    fn to_json(&self) -> Value {
        let mut headers = serde_json::Map::new();
        for (k, v) in &self.headers {
            let merged = match headers.get(k).and_then(Value::as_str) {
                Some(prev) => format!("{prev}, {v}"),
                None => v.clone(),
            };
            headers.insert(k.clone(), Value::String(merged));
        }
        json!({ "path": self.path, "query": self.query, "headers": headers, "body": self.body })
    }
}

/// The API routes, each with its own counter.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Kind {
    ChatCompletions,
    Completions,
    Embeddings,
    Models,
    Messages,
    GenerateContent,
    StreamGenerateContent,
    EmbedContent,
    BatchEmbedContents,
    Files,
    Batches,
    MessageBatches,
}

impl Kind {
    const ALL: [Kind; 12] = [
        Kind::ChatCompletions,
        Kind::Completions,
        Kind::Embeddings,
        Kind::Models,
        Kind::Messages,
        Kind::GenerateContent,
        Kind::StreamGenerateContent,
        Kind::EmbedContent,
        Kind::BatchEmbedContents,
        Kind::Files,
        Kind::Batches,
        Kind::MessageBatches,
    ];

    /// Canonical path; `requests_for` matches suffixes of it.
    fn path(self) -> &'static str {
        match self {
            Kind::ChatCompletions => "/v1/chat/completions",
            Kind::Completions => "/v1/completions",
            Kind::Embeddings => "/v1/embeddings",
            Kind::Models => "/v1/models",
            Kind::Messages => "/v1/messages",
            Kind::GenerateContent => "/v1beta/models/{model}:generateContent",
            Kind::StreamGenerateContent => "/v1beta/models/{model}:streamGenerateContent",
            Kind::EmbedContent => "/v1beta/models/{model}:embedContent",
            Kind::BatchEmbedContents => "/v1beta/models/{model}:batchEmbedContents",
            Kind::Files => "/v1/files",
            Kind::Batches => "/v1/batches",
            Kind::MessageBatches => "/v1/messages/batches",
        }
    }
}

/// The last API request, kept raw (cheap to store) and decoded on demand.
struct RawRequest {
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

/// The scenario in force plus its own "failures so far" counter, swapped
/// together so a new scenario always starts counting from zero.
pub(crate) struct Active {
    pub(crate) scenario: Scenario,
    failed: AtomicU64,
}

/// Outcome of the per-request failure gate.
pub(crate) enum Gate {
    Go(Arc<Active>),
    Fail {
        status: StatusCode,
        retry_after: Option<u64>,
    },
}

/// State shared by the server task and the [`MockUpstream`] handle.
pub(crate) struct Shared {
    active: RwLock<Arc<Active>>,
    defaults: Scenario,
    counters: [AtomicU64; Kind::ALL.len()],
    last: Mutex<Option<RawRequest>>,
    cancelled: AtomicU64,
    /// TCP connections accepted since start (never reset: a client's pool outlives scenarios).
    connections: AtomicU64,
    /// Files and batches of the batch APIs.
    batches: batches::Store,
}

impl Shared {
    fn new(defaults: Scenario) -> Self {
        Shared {
            active: RwLock::new(Arc::new(Active {
                scenario: defaults.clone(),
                failed: AtomicU64::new(0),
            })),
            defaults,
            counters: Default::default(),
            last: Mutex::new(None),
            cancelled: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            batches: batches::Store::default(),
        }
    }

    fn set(&self, scenario: Scenario) {
        let next = Arc::new(Active {
            scenario,
            failed: AtomicU64::new(0),
        });
        let old = std::mem::replace(
            &mut *self.active.write().unwrap_or_else(PoisonError::into_inner),
            next,
        );
        drop(old);
    }

    fn current(&self) -> Arc<Active> {
        Arc::clone(&self.active.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Counts the request and remembers it as the last one. Never blocks:
    /// under contention the recording is skipped (the count never is).
    pub(crate) fn record(&self, kind: Kind, uri: Uri, headers: HeaderMap, body: Bytes) {
        self.counters[kind as usize].fetch_add(1, Ordering::Relaxed);
        let raw = RawRequest { uri, headers, body };
        let old = match self.last.try_lock() {
            Ok(mut slot) => slot.replace(raw),
            Err(_) => None,
        };
        drop(old);
    }

    /// Applies the scenario's failure injection and `delay_ms`.
    pub(crate) async fn gate(&self) -> Gate {
        let active = self.current();
        let sc = &active.scenario;
        let fail =
            sc.fail_first > 0 && active.failed.fetch_add(1, Ordering::Relaxed) < sc.fail_first;
        if sc.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(sc.delay_ms)).await;
        }
        if !fail {
            return Gate::Go(active);
        }
        let status = match sc.fail_status {
            0 => StatusCode::SERVICE_UNAVAILABLE,
            s => StatusCode::from_u16(s).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
        };
        Gate::Fail {
            status,
            retry_after: sc.retry_after_s,
        }
    }

    /// Called by a stream body dropped before its end.
    pub(crate) fn stream_cancelled(&self) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
    }

    fn total(&self) -> u64 {
        self.counters
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    fn count_for(&self, suffix: &str) -> u64 {
        Kind::ALL
            .iter()
            .filter(|k| k.path().ends_with(suffix))
            .map(|k| self.counters[*k as usize].load(Ordering::Relaxed))
            .sum()
    }

    fn last_request(&self) -> Option<RecordedRequest> {
        let slot = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        slot.as_ref().map(RecordedRequest::from_raw)
    }

    fn reset(&self) {
        for c in &self.counters {
            c.store(0, Ordering::Relaxed);
        }
        self.cancelled.store(0, Ordering::Relaxed);
        let old = self
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(old);
        self.set(self.defaults.clone());
    }

    fn stats(&self) -> Value {
        let by_path: serde_json::Map<String, Value> = Kind::ALL
            .iter()
            .map(|k| {
                (
                    k.path().to_owned(),
                    json!(self.counters[*k as usize].load(Ordering::Relaxed)),
                )
            })
            .collect();
        json!({
            "requests": self.total(),
            "by_path": by_path,
            "streams_cancelled": self.cancelled.load(Ordering::Relaxed),
            "connections_accepted": self.connections.load(Ordering::Relaxed),
            "last_request": self.last_request().map(|r| r.to_json()),
        })
    }
}

/// A running mock server. Dropping it stops accepting connections.
pub struct MockUpstream {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl MockUpstream {
    /// Binds `127.0.0.1:0` and serves in a background tokio task.
    pub async fn start() -> std::io::Result<MockUpstream> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Binds `addr` and serves in a background tokio task.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<MockUpstream> {
        Self::start_with(addr, Scenario::default()).await
    }

    /// Like [`start_on`](Self::start_on), with `defaults` as the scenario
    /// in force at start and after [`reset`](Self::reset).
    pub async fn start_with(addr: SocketAddr, defaults: Scenario) -> std::io::Result<MockUpstream> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(defaults));
        let app = router(Arc::clone(&shared));
        let counted = Arc::clone(&shared);
        let listener = listener.tap_io(move |tcp| {
            counted.connections.fetch_add(1, Ordering::Relaxed);
            // Best effort: without it small SSE events wait on Nagle.
            let _ = tcp.set_nodelay(true);
        });
        let server = tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                tracing::error!(%err, "mock-upstream server stopped");
            }
        });
        Ok(MockUpstream {
            shared,
            addr,
            server,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// OpenAI base URL (`…/v1`).
    pub fn openai_base(&self) -> String {
        format!("{}/v1", self.base_url())
    }

    /// Anthropic base URL (`…/v1`; clients append `/messages`).
    pub fn anthropic_base(&self) -> String {
        format!("{}/v1", self.base_url())
    }

    /// Gemini base URL (`…/v1beta`).
    pub fn gemini_base(&self) -> String {
        format!("{}/v1beta", self.base_url())
    }

    /// Replaces the scenario for the requests that follow.
    pub fn set_scenario(&self, s: Scenario) {
        self.shared.set(s);
    }

    /// Total requests received on API routes (control routes excluded).
    pub fn requests(&self) -> u64 {
        self.shared.total()
    }

    /// Requests on the routes whose canonical path ends with `path_suffix`:
    /// `"/chat/completions"`, `"/messages"`, `":generateContent"`,
    /// `":streamGenerateContent"`, `"/embeddings"`, ... (`"/completions"`
    /// matches both chat and legacy completions).
    pub fn requests_for(&self, path_suffix: &str) -> u64 {
        self.shared.count_for(path_suffix)
    }

    /// The last API request received.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.shared.last_request()
    }

    /// Stream bodies dropped before their end (client went away).
    pub fn streams_cancelled(&self) -> u64 {
        self.shared.cancelled.load(Ordering::Relaxed)
    }

    /// TCP connections accepted since the mock started: how a client's connection pool
    /// behaves (a reused connection is not counted again).
    pub fn connections_accepted(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Batches created through either batch API (OpenAI or Anthropic).
    pub fn batches_created(&self) -> u64 {
        self.shared.batches.created.load(Ordering::Relaxed)
    }

    /// Batches cancelled (before they ended) through either batch API.
    pub fn batches_cancelled(&self) -> u64 {
        self.shared.batches.cancelled.load(Ordering::Relaxed)
    }

    /// Counters, recorded request and scenario back to the defaults.
    pub fn reset(&self) {
        self.shared.reset();
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl std::fmt::Debug for MockUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockUpstream")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/models", get(openai::models))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/files", post(batches::upload))
        .route("/v1/files/{id}/content", get(batches::file_content))
        .route("/v1/batches", post(batches::create_openai))
        .route("/v1/batches/{id}", get(batches::get_openai))
        .route("/v1/batches/{id}/cancel", post(batches::cancel_openai))
        .route("/v1/messages/batches", post(batches::create_anthropic))
        .route("/v1/messages/batches/{id}", get(batches::get_anthropic))
        .route("/v1/messages/batches/{id}/results", get(batches::anthropic_results))
        .route("/v1/messages/batches/{id}/cancel", post(batches::cancel_anthropic))
        .route("/v1beta/models/{*rest}", post(gemini::dispatch))
        .route("/__mock/scenario", post(control_scenario))
        .route("/__mock/reset", post(control_reset))
        .route("/__mock/stats", get(control_stats))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(shared)
}

/// `POST /__mock/scenario`: the body's fields over the server defaults.
async fn control_scenario(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let patch: Value = match serde_json::from_slice(&body) {
        Ok(Value::Object(map)) => Value::Object(map),
        Ok(_) => return control_error("scenario must be a JSON object"),
        Err(err) => return control_error(&format!("invalid JSON: {err}")),
    };
    let mut merged = match serde_json::to_value(&shared.defaults) {
        Ok(Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    if let Value::Object(fields) = patch {
        merged.extend(fields);
    }
    match serde_json::from_value::<Scenario>(Value::Object(merged)) {
        Ok(scenario) => {
            let echo = serde_json::to_value(&scenario).unwrap_or(Value::Null);
            shared.set(scenario);
            axum::Json(echo).into_response()
        }
        Err(err) => control_error(&format!("invalid scenario: {err}")),
    }
}

async fn control_reset(State(shared): State<Arc<Shared>>) -> Response {
    shared.reset();
    axum::Json(json!({ "ok": true })).into_response()
}

async fn control_stats(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(shared.stats()).into_response()
}

fn control_error(message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({ "error": { "message": message } })),
    )
        .into_response()
}

async fn not_found(uri: Uri) -> Response {
    let message = format!("mock-upstream: no route for {}", uri.path());
    let body = json!({ "error": { "message": message, "type": "invalid_request_error", "code": "not_found" } });
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}
