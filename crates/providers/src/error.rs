//! [`ProviderError`]: an upstream failure, classified once so that failover, breakers and
//! metrics read attributes instead of parsing strings.

use std::time::Duration;

use thiserror::Error;

/// What went wrong, from the gateway's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Could not connect (DNS, refused, TLS). Nothing reached the upstream.
    Connect,
    /// The upstream did not answer in time.
    Timeout,
    /// 429 from the upstream.
    RateLimited,
    /// 5xx (or 529 overloaded) from the upstream.
    Server,
    /// 401/403: the upstream refused our credentials.
    Auth,
    /// 4xx other than the above: the request itself was refused. Not retryable.
    InvalidRequest,
    /// The upstream answered 2xx with a body we could not parse.
    Malformed,
    /// The stream broke (transport error or in-band error event) after it started.
    StreamInterrupted,
    /// The provider cannot do this operation (e.g. embeddings on Anthropic).
    Unsupported,
}

impl ErrorKind {
    /// A low-cardinality label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Server => "server",
            ErrorKind::Auth => "auth",
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::Malformed => "malformed",
            ErrorKind::StreamInterrupted => "stream_interrupted",
            ErrorKind::Unsupported => "unsupported",
        }
    }
}

/// An upstream failure. `message` is the upstream's own error message (trimmed) or ours; it
/// never contains a key or a URL with a key.
#[derive(Debug, Error)]
#[error("{message}")]
pub struct ProviderError {
    pub kind: ErrorKind,
    /// The upstream's HTTP status, when it answered.
    pub status: Option<u16>,
    /// The upstream's `retry-after`, when it sent one.
    pub retry_after: Option<Duration>,
    pub message: String,
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ProviderError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ProviderError { kind, status: None, retry_after: None, message: message.into(), source: None }
    }

    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    pub fn malformed(protocol: &str, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        ProviderError::new(ErrorKind::Malformed, format!("malformed {protocol} response: {source}"))
            .with_source(source)
    }

    pub fn unsupported(what: &str) -> Self {
        ProviderError::new(ErrorKind::Unsupported, format!("{what} is not supported by this provider"))
    }

    /// Worth trying another route (or the same one later): the request may succeed elsewhere.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Connect
                | ErrorKind::Timeout
                | ErrorKind::RateLimited
                | ErrorKind::Server
                | ErrorKind::Malformed
                | ErrorKind::StreamInterrupted
                | ErrorKind::Auth
                | ErrorKind::Unsupported
        )
    }

    /// Counts against the route's health (breaker, uptime): the upstream misbehaved.
    pub fn is_upstream_fault(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Connect
                | ErrorKind::Timeout
                | ErrorKind::Server
                | ErrorKind::Malformed
                | ErrorKind::StreamInterrupted
        )
    }

    /// Classifies an HTTP error status with the upstream's error message.
    pub fn from_status(status: u16, message: String, retry_after: Option<Duration>) -> Self {
        let kind = match status {
            429 => ErrorKind::RateLimited,
            401 | 403 => ErrorKind::Auth,
            408 => ErrorKind::Timeout,
            400..=499 => ErrorKind::InvalidRequest,
            _ => ErrorKind::Server,
        };
        ProviderError { kind, status: Some(status), retry_after, message, source: None }
    }

    /// A failure to open a connection to the upstream (resolving, connecting, TLS, the HTTP
    /// handshake): a timeout or a connect error, both safe to try elsewhere.
    pub fn from_connect(err: Box<dyn std::error::Error + Send + Sync>) -> Self {
        let (kind, what) = if caused_by_timeout(&*err) {
            (ErrorKind::Timeout, "upstream timed out")
        } else {
            (ErrorKind::Connect, "could not connect to upstream")
        };
        // Say little: the URL is not repeated (Gemini keys can live in URLs).
        ProviderError { source: Some(err), ..ProviderError::new(kind, what) }
    }

    /// A failure on an open connection before a response arrived (the upstream closed it or
    /// sent something that is not HTTP); the request may have been written.
    pub fn from_exchange(err: hyper::Error) -> Self {
        ProviderError::new(ErrorKind::Server, "upstream transport error").with_source(err)
    }

    /// An error while reading a response body: the upstream cut the connection.
    pub fn from_body(err: hyper::Error) -> Self {
        let kind = if err.is_timeout() { ErrorKind::Timeout } else { ErrorKind::StreamInterrupted };
        ProviderError::new(kind, "upstream response was interrupted").with_source(err)
    }
}

/// Whether an I/O timeout is somewhere in the error's chain (a connect timeout).
fn caused_by_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(err);
    while let Some(e) = cause {
        if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut) {
            return true;
        }
        cause = e.source();
    }
    false
}
