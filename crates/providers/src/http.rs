//! HTTP plumbing shared by the provider modules: one pooled client per provider, requests
//! with JSON or raw bodies, upstream error classification and SSE decoding.
//!
//! The client is hyper's connections with rustls under Marga's own pool ([`crate::pool`]),
//! used directly: every inference request goes through it, and reqwest's layers on top of
//! hyper (redirect policy, URL re-parsing, header merging) cost about a tenth of Marga's CPU
//! per request.
//!
//! Each thread has its own pool of connections to the upstream. The gateway serves on one
//! single-threaded runtime per core: a connection opened on a thread has its connection task
//! on that thread's runtime, so a request and its upstream call never wake another thread.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri};
use http_body_util::{BodyExt, Full};
use marga_protocol::sse::{Decoder, Event};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::pool::{Pool, ReplyBody};
use crate::{ErrorKind, ProviderError, ProviderSettings};

/// How long an idle upstream connection may wait to be reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// The most of an upstream error body we read (enough for any error message).
const MAX_ERROR_BODY: usize = 64 * 1024;
/// The most of a non-streamed upstream response we accept.
const MAX_RESPONSE_BODY: usize = 64 * 1024 * 1024;
/// The longest upstream error message we pass on.
const MAX_ERROR_MESSAGE: usize = 500;

/// An upstream's response, its body read as it arrives. The helpers below hand callers only
/// 2xx ones; other statuses become a [`ProviderError`].
pub(crate) type Reply = http::Response<ReplyBody>;

/// A pooled HTTP client for one upstream (a pool per thread), with the headers every request
/// to it carries.
pub(crate) struct Client {
    pool: Pool,
    headers: HeaderMap,
}

impl Client {
    pub(crate) fn new(settings: &ProviderSettings) -> Result<Self, ProviderError> {
        let mut headers = HeaderMap::new();
        for (name, value) in &settings.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| ProviderError::new(ErrorKind::InvalidRequest, "invalid header name").with_source(e))?;
            let value = HeaderValue::from_str(value)
                .map_err(|e| ProviderError::new(ErrorKind::InvalidRequest, "invalid header value").with_source(e))?;
            headers.insert(name, value);
        }
        let https = crate::pool::connector(settings.connect_timeout);
        Ok(Client { pool: Pool::new(https, settings.max_idle_connections, IDLE_TIMEOUT), headers })
    }

    /// A request to `uri` (parsed once by the caller when it is used often).
    pub(crate) fn request(&self, method: Method, uri: Uri) -> Outgoing<'_> {
        Outgoing { client: self, method, uri, headers: self.headers.clone() }
    }

    /// A request to a URL given as text, e.g. one an API returned.
    pub(crate) fn request_url(&self, method: Method, url: &str) -> Result<Outgoing<'_>, ProviderError> {
        Ok(self.request(method, parse_uri(url)?))
    }
}

/// Parses an upstream URL; the error never repeats it (keys can live in URLs).
pub(crate) fn parse_uri(url: &str) -> Result<Uri, ProviderError> {
    Uri::try_from(url).map_err(|e| ProviderError::new(ErrorKind::Connect, "invalid upstream URL").with_source(e))
}

/// A request being built: method, URL and headers; [`Outgoing::send`] gives it a body.
pub(crate) struct Outgoing<'a> {
    client: &'a Client,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl Outgoing<'_> {
    pub(crate) fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Sends the request with `body`; the response whatever its status. Within
    /// [`with_traceparent`], it carries the caller's trace context.
    async fn send_raw(mut self, body: Bytes) -> Result<Reply, ProviderError> {
        let _ = TRACEPARENT.try_with(|value| self.headers.insert(TRACEPARENT_HEADER, value.clone()));
        let mut request = http::Request::new(Full::new(body));
        *request.method_mut() = self.method;
        *request.uri_mut() = self.uri;
        *request.headers_mut() = self.headers;
        self.client.pool.send(request).await
    }

    /// Sends the request with `body` and returns the response if its status is 2xx, else the
    /// classified error.
    pub(crate) async fn send(self, body: impl Into<Bytes>) -> Result<Reply, ProviderError> {
        let response = self.send_raw(body.into()).await?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(error_from_response(response).await)
        }
    }
}

const TRACEPARENT_HEADER: HeaderName = HeaderName::from_static("traceparent");

tokio::task_local! {
    /// The W3C `traceparent` every upstream request of the current call carries.
    static TRACEPARENT: HeaderValue;
}

/// Runs `call` with `traceparent` (a W3C trace context: the gateway's span for the request)
/// sent on every upstream request it makes, so that a traced upstream (a self-hosted vLLM,
/// another gateway) joins the caller's trace. `None` runs `call` as it is.
pub async fn with_traceparent<F: std::future::Future>(traceparent: Option<HeaderValue>, call: F) -> F::Output {
    match traceparent {
        Some(value) => TRACEPARENT.scope(value, call).await,
        None => call.await,
    }
}

/// A header value for a secret, marked sensitive so it never shows in debug output.
pub(crate) fn secret_header(value: &str) -> Result<HeaderValue, ProviderError> {
    let mut v = HeaderValue::from_str(value)
        .map_err(|_| ProviderError::new(ErrorKind::Auth, "the upstream key contains invalid characters"))?;
    v.set_sensitive(true);
    Ok(v)
}

/// POSTs `body` as JSON and returns the response if its status is 2xx, else the classified error.
pub(crate) async fn post_json(request: Outgoing<'_>, body: &impl Serialize) -> Result<Reply, ProviderError> {
    let bytes = serde_json::to_vec(body)
        .map_err(|e| ProviderError::new(ErrorKind::InvalidRequest, "could not encode request").with_source(e))?;
    request.header(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json")).send(bytes).await
}

/// Sends a request without a body (GET, or a POST that takes none) and returns the response if
/// its status is 2xx, else the classified error.
pub(crate) async fn send_checked(request: Outgoing<'_>) -> Result<Reply, ProviderError> {
    request.send(Bytes::new()).await
}

/// Reads a 2xx body whole (bounded), e.g. a JSONL results file.
pub(crate) async fn read_bytes(response: Reply) -> Result<Vec<u8>, ProviderError> {
    read_limited(response, MAX_RESPONSE_BODY).await
}

/// Reads a non-2xx response into a [`ProviderError`], keeping the upstream's message.
async fn error_from_response(response: Reply) -> ProviderError {
    let status = response.status().as_u16();
    let retry_after = retry_after(response.headers());
    let body = read_limited(response, MAX_ERROR_BODY).await.unwrap_or_default();
    ProviderError::from_status(status, upstream_message(status, &body), retry_after)
}

/// `retry-after` in seconds (the HTTP-date form is rare from LLM APIs and is ignored).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    let secs: f64 = value.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)))
}

/// The message inside `{"error": {"message": …}}` (OpenAI, Anthropic and Gemini all use this
/// path), else a generic one. Trimmed to a bounded length.
pub(crate) fn upstream_message(status: u16, body: &[u8]) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let message = parsed
        .as_ref()
        .and_then(|v| v.pointer("/error/message").or_else(|| v.pointer("/message")))
        .and_then(|m| m.as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| format!("upstream returned HTTP {status}"));
    truncate(message, MAX_ERROR_MESSAGE)
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

async fn read_limited(response: Reply, limit: usize) -> Result<Vec<u8>, ProviderError> {
    let mut incoming = response.into_body();
    let mut body = Vec::new();
    while let Some(frame) = incoming.frame().await {
        let frame = frame.map_err(ProviderError::from_body)?;
        let Ok(chunk) = frame.into_data() else { continue };
        if body.len() + chunk.len() > limit {
            return Err(ProviderError::new(ErrorKind::Malformed, "upstream response too large"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Reads and parses a 2xx JSON body.
pub(crate) async fn read_json<T: DeserializeOwned>(
    response: Reply,
    protocol: &'static str,
) -> Result<T, ProviderError> {
    let body = read_limited(response, MAX_RESPONSE_BODY).await?;
    serde_json::from_slice(&body).map_err(|e| ProviderError::malformed(protocol, e))
}

/// The SSE events of a streamed response, its bytes read in batches of what arrived together
/// ([`crate::coalesce`]) and decoded by [`marga_protocol::sse::Decoder`]; a transport error or
/// an undecodable stream ends it with one `Err`.
pub(crate) fn sse_events(response: Reply) -> SseEvents {
    SseEvents {
        body: Some(crate::coalesce::coalesce(response.into_body()).boxed()),
        decoder: Decoder::new(),
        ready: VecDeque::new(),
    }
}

/// The stream [`sse_events`] returns: the body (gone once it ended or failed), the decoder,
/// and events decoded but not handed on yet. Written as a `Stream` by hand rather than with
/// `unfold`, which moves its state into a new future and out again for every event.
pub(crate) struct SseEvents {
    body: Option<futures::stream::BoxStream<'static, Result<Bytes, hyper::Error>>>,
    decoder: Decoder,
    ready: VecDeque<Event>,
}

impl Stream for SseEvents {
    type Item = Result<Event, ProviderError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(event) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(event)));
            }
            let Some(body) = this.body.as_mut() else { return Poll::Ready(None) };
            let failure = match ready!(body.poll_next_unpin(cx)) {
                None => {
                    this.body = None;
                    return Poll::Ready(None);
                }
                Some(Ok(bytes)) => match this.decoder.push(&bytes, &mut this.ready) {
                    Ok(()) => continue,
                    Err(e) => ProviderError::new(ErrorKind::StreamInterrupted, "upstream stream was undecodable").with_source(e),
                },
                Some(Err(e)) => ProviderError::from_body(e),
            };
            this.body = None;
            return Poll::Ready(Some(Err(failure)));
        }
    }
}

/// An in-band error event inside a stream (the upstream's own message, trimmed).
pub(crate) fn in_band_error(data: &str) -> ProviderError {
    ProviderError::new(ErrorKind::StreamInterrupted, upstream_message(200, data.as_bytes()))
}
