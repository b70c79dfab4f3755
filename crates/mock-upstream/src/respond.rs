//! Response plumbing shared by the three wire formats: the request prelude
//! (count, auth, failure gate, JSON parse), JSON / malformed responses, and
//! the streamed body that honours chunk delays, mid-stream cuts and counts
//! cancelled streams.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::Response;
use bytes::Bytes;
use serde_json::Value;

use crate::{Active, Gate, Kind, Scenario, Shared};

/// Pause before a mid-stream cut when no chunk delay is configured.
const CUT_GRACE: Duration = Duration::from_millis(5);

/// Provider-specific parts of the request prelude.
pub(crate) trait Dialect {
    /// Whether the request carries the credentials the provider requires.
    fn authorized(headers: &HeaderMap, uri: &Uri) -> bool;
    /// The provider's refusal for missing credentials.
    fn auth_error() -> Response;
    /// The provider's error envelope for `status`.
    fn error(status: StatusCode, message: &str) -> Response;
}

/// A request that passed the prelude.
pub(crate) struct Admitted {
    pub(crate) active: Arc<Active>,
    pub(crate) body: Value,
}

impl Admitted {
    pub(crate) fn scenario(&self) -> &Scenario {
        &self.active.scenario
    }
}

/// Counts and records the request, checks auth, applies the scenario's
/// failure gate and delay, parses the JSON body (empty body → `Null`).
pub(crate) async fn admit<D: Dialect>(
    shared: &Shared,
    kind: Kind,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Admitted, Response> {
    let active = gate::<D>(shared, kind, uri, headers, body.clone()).await?;
    let body = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(err) => {
                return Err(D::error(
                    StatusCode::BAD_REQUEST,
                    &format!("invalid JSON body: {err}"),
                ))
            }
        }
    };
    Ok(Admitted { active, body })
}

/// Counts and records the request, checks auth, applies the scenario's
/// failure gate and delay; the body is left as it came.
pub(crate) async fn gate<D: Dialect>(
    shared: &Shared,
    kind: Kind,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Arc<Active>, Response> {
    let authorized = D::authorized(&headers, &uri);
    shared.record(kind, uri, headers, body);
    if !authorized {
        return Err(D::auth_error());
    }
    match shared.gate().await {
        Gate::Go(active) => Ok(active),
        Gate::Fail {
            status,
            retry_after,
        } => {
            let message = format!("mock-upstream injected failure ({})", status.as_u16());
            Err(with_retry_after(D::error(status, &message), retry_after))
        }
    }
}

fn with_retry_after(mut resp: Response, retry_after: Option<u64>) -> Response {
    if let Some(secs) = retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

/// A JSON response from a serde_json value.
pub(crate) fn json(status: StatusCode, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    raw(status, "application/json", Bytes::from(bytes))
}

/// A response with the given content type and body.
pub(crate) fn raw(status: StatusCode, content_type: &'static str, body: Bytes) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// 200 with a body no client can parse.
pub(crate) fn malformed(stream: bool) -> Response {
    if stream {
        let mut resp = raw(
            StatusCode::OK,
            "text/event-stream",
            Bytes::from_static(b"data: {garbage\n\n"),
        );
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        resp
    } else {
        raw(
            StatusCode::OK,
            "application/json",
            Bytes::from_static(br#"{"not":"what you expected"#),
        )
    }
}

/// `data: <json>` + `sep` as one SSE event.
pub(crate) fn sse_data(value: &Value, sep: &str) -> Bytes {
    let mut buf = Vec::with_capacity(128);
    buf.extend_from_slice(b"data: ");
    // Writing a Value to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut buf, value);
    buf.extend_from_slice(sep.as_bytes());
    Bytes::from(buf)
}

/// How a stream ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ending {
    /// All content, then the format's terminator.
    Complete,
    /// Connection aborted after `emit` content chunks, no terminator.
    Cut,
    /// In-band error event after `emit` content chunks, then a clean end.
    Error,
}

/// How many content chunks to send and how to end.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    pub(crate) emit: usize,
    pub(crate) ending: Ending,
    total: usize,
}

impl Plan {
    /// Plan for a stream of `total` content chunks under `sc`.
    pub(crate) fn new(sc: &Scenario, total: usize) -> Plan {
        let limit = |n: u32| total.min(n as usize);
        match (sc.cut_after_chunks, sc.stream_error_after_chunks) {
            (Some(n), _) => Plan {
                emit: limit(n),
                ending: Ending::Cut,
                total,
            },
            (None, Some(n)) => Plan {
                emit: limit(n),
                ending: Ending::Error,
                total,
            },
            (None, None) => Plan {
                emit: total,
                ending: Ending::Complete,
                total,
            },
        }
    }

    /// Whether content chunk `i` is the last one of a complete stream.
    pub(crate) fn is_final(&self, i: usize) -> bool {
        self.ending == Ending::Complete && i + 1 == self.total
    }
}

/// Assembles head, planned content, then tail / error event.
pub(crate) fn assemble(
    plan: Plan,
    head: Vec<Bytes>,
    content: impl FnMut(usize) -> Bytes,
    tail: impl FnOnce() -> Vec<Bytes>,
    error: impl FnOnce() -> Bytes,
) -> Vec<Bytes> {
    let mut events = head;
    events.extend((0..plan.emit).map(content));
    match plan.ending {
        Ending::Complete => events.extend(tail()),
        Ending::Error => events.push(error()),
        Ending::Cut => {}
    }
    events
}

/// A streamed 200 response sending `events` one by one.
pub(crate) fn stream(
    shared: &Arc<Shared>,
    sc: &Scenario,
    content_type: &'static str,
    events: Vec<Bytes>,
    plan: Plan,
) -> Response {
    let feed = Feed {
        events: events.into_iter(),
        delay: (sc.chunk_delay_ms > 0).then(|| Duration::from_millis(sc.chunk_delay_ms)),
        started: false,
        abort: plan.ending == Ending::Cut,
        guard: CancelGuard {
            shared: Arc::clone(shared),
            done: false,
        },
    };
    let body = Body::from_stream(futures::stream::unfold(feed, Feed::step));
    let mut resp = Response::new(body);
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// Counts the stream as cancelled if dropped before its end.
struct CancelGuard {
    shared: Arc<Shared>,
    done: bool,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.done {
            self.shared.stream_cancelled();
        }
    }
}

/// State of a streamed body.
struct Feed {
    events: std::vec::IntoIter<Bytes>,
    delay: Option<Duration>,
    started: bool,
    abort: bool,
    guard: CancelGuard,
}

impl Feed {
    async fn step(mut self) -> Option<(Result<Bytes, io::Error>, Feed)> {
        if self.guard.done {
            return None;
        }
        if let (true, Some(delay)) = (self.started, self.delay) {
            tokio::time::sleep(delay).await;
        }
        self.started = true;
        match self.events.next() {
            Some(event) => {
                if self.events.len() == 0 && !self.abort {
                    self.guard.done = true;
                }
                Some((Ok(event), self))
            }
            None => {
                self.guard.done = true;
                if self.abort {
                    if self.delay.is_none() {
                        // Let hyper flush what came before, so the client
                        // sees a response that breaks off, not no response.
                        tokio::time::sleep(CUT_GRACE).await;
                    }
                    let err = io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "mock-upstream: stream cut",
                    );
                    Some((Err(err), self))
                } else {
                    None
                }
            }
        }
    }
}
