//! HTTP plumbing shared by the provider modules: one pooled client per provider, JSON POSTs,
//! upstream error classification and SSE decoding.

use std::time::Duration;

use eventsource_stream::{Event, Eventsource};
use futures::{Stream, StreamExt};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{ErrorKind, ProviderError, ProviderSettings};

/// The most of an upstream error body we read (enough for any error message).
const MAX_ERROR_BODY: usize = 64 * 1024;
/// The most of a non-streamed upstream response we accept.
const MAX_RESPONSE_BODY: usize = 64 * 1024 * 1024;
/// The longest upstream error message we pass on.
const MAX_ERROR_MESSAGE: usize = 500;

/// A pooled HTTP client for one upstream.
pub(crate) fn client(settings: &ProviderSettings) -> Result<reqwest::Client, ProviderError> {
    let mut headers = HeaderMap::new();
    for (name, value) in &settings.headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| ProviderError::new(ErrorKind::InvalidRequest, "invalid header name").with_source(e))?;
        let value = HeaderValue::from_str(value)
            .map_err(|e| ProviderError::new(ErrorKind::InvalidRequest, "invalid header value").with_source(e))?;
        headers.insert(name, value);
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .connect_timeout(settings.connect_timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| ProviderError::new(ErrorKind::Connect, "could not build HTTP client").with_source(e))
}

/// A header value for a secret, marked sensitive so it never shows in debug output.
pub(crate) fn secret_header(value: &str) -> Result<HeaderValue, ProviderError> {
    let mut v = HeaderValue::from_str(value)
        .map_err(|_| ProviderError::new(ErrorKind::Auth, "the upstream key contains invalid characters"))?;
    v.set_sensitive(true);
    Ok(v)
}

/// POSTs `body` as JSON and returns the response if its status is 2xx, else the classified error.
pub(crate) async fn post_json(
    request: reqwest::RequestBuilder,
    body: &impl Serialize,
) -> Result<reqwest::Response, ProviderError> {
    let bytes = serde_json::to_vec(body)
        .map_err(|e| ProviderError::new(ErrorKind::InvalidRequest, "could not encode request").with_source(e))?;
    let response = request
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(bytes)
        .send()
        .await
        .map_err(ProviderError::from_transport)?;
    if response.status().is_success() {
        Ok(response)
    } else {
        Err(error_from_response(response).await)
    }
}

/// Sends a request (any method, body already set) and returns the response if its status is
/// 2xx, else the classified error.
pub(crate) async fn send_checked(request: reqwest::RequestBuilder) -> Result<reqwest::Response, ProviderError> {
    let response = request.send().await.map_err(ProviderError::from_transport)?;
    if response.status().is_success() {
        Ok(response)
    } else {
        Err(error_from_response(response).await)
    }
}

/// Reads a 2xx body whole (bounded), e.g. a JSONL results file.
pub(crate) async fn read_bytes(response: reqwest::Response) -> Result<Vec<u8>, ProviderError> {
    read_limited(response, MAX_RESPONSE_BODY).await
}

/// Reads a non-2xx response into a [`ProviderError`], keeping the upstream's message.
async fn error_from_response(response: reqwest::Response) -> ProviderError {
    let status = response.status().as_u16();
    let retry_after = retry_after(response.headers());
    let body = read_limited(response, MAX_ERROR_BODY).await.unwrap_or_default();
    ProviderError::from_status(status, upstream_message(status, &body), retry_after)
}

/// `retry-after` in seconds (the HTTP-date form is rare from LLM APIs and is ignored).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
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

async fn read_limited(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, ProviderError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(ProviderError::from_transport)? {
        if body.len() + chunk.len() > limit {
            return Err(ProviderError::new(ErrorKind::Malformed, "upstream response too large"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Reads and parses a 2xx JSON body.
pub(crate) async fn read_json<T: DeserializeOwned>(
    response: reqwest::Response,
    protocol: &'static str,
) -> Result<T, ProviderError> {
    let body = read_limited(response, MAX_RESPONSE_BODY).await?;
    serde_json::from_slice(&body).map_err(|e| ProviderError::malformed(protocol, e))
}

/// The SSE events of a streamed response; a transport error ends the stream with one `Err`.
pub(crate) fn sse_events(
    response: reqwest::Response,
) -> impl Stream<Item = Result<Event, ProviderError>> + Send + 'static {
    response.bytes_stream().eventsource().map(|r| {
        r.map_err(|e| {
            let kind = ErrorKind::StreamInterrupted;
            ProviderError::new(kind, "upstream stream was interrupted").with_source(SseError(e.to_string()))
        })
    })
}

/// A stream decoding error, kept as text (the decoder's error type is not `Sync`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct SseError(String);

/// An in-band error event inside a stream (the upstream's own message, trimmed).
pub(crate) fn in_band_error(data: &str) -> ProviderError {
    ProviderError::new(ErrorKind::StreamInterrupted, upstream_message(200, data.as_bytes()))
}

/// What one upstream SSE event means to a stream decoder.
pub(crate) enum Step<T> {
    /// Zero or more items to pass on.
    Items(Vec<T>),
    /// The upstream's terminator (`[DONE]`, `message_stop`): end the stream.
    Done,
    /// A failure: yield it and end the stream.
    Fail(ProviderError),
}

/// Decodes a streamed response event by event with `decode` (which may keep state, as the
/// Anthropic and Gemini translators do). The stream ends after `Done`, after the first error,
/// or when the upstream closes.
pub(crate) fn decode_sse<T, F>(
    response: reqwest::Response,
    mut decode: F,
) -> impl Stream<Item = Result<T, ProviderError>> + Send + 'static
where
    T: Send + 'static,
    F: FnMut(Event) -> Step<T> + Send + 'static,
{
    sse_events(response)
        .scan(false, move |finished, event| {
            if *finished {
                return futures::future::ready(None);
            }
            let items = match event.map(&mut decode) {
                Ok(Step::Items(items)) => items.into_iter().map(Ok).collect(),
                Ok(Step::Done) => return futures::future::ready(None),
                Ok(Step::Fail(e)) | Err(e) => {
                    *finished = true;
                    vec![Err(e)]
                }
            };
            futures::future::ready(Some(futures::stream::iter(items)))
        })
        .flatten()
}
