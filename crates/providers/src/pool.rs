//! Connections to an upstream, pooled per thread: the HTTP client under every provider.
//!
//! hyper-util's pooled client did this job before, and cost about 7,800 more instructions
//! per chat request (of ≈ 180,000; BENCHMARKS.md, stop 27): for every HTTP/1 request it
//! spawned a task that waited for the connection to be free again and then put it back into
//! a mutex-guarded, SipHash-keyed pool, and it rebuilt the `Host` header and the request
//! target each time.
//! Here a connection goes back into its thread's list the moment its response body ends,
//! inside the poll that read that end, and the list is a plain vector that only that thread
//! touches.
//!
//! What the pool promises:
//! - **One thread, one list.** A connection made on a thread has its connection task on that
//!   thread's runtime, and goes back to the list of the thread that read its body to the end.
//! - **Only finished connections are reused.** An HTTP/1 connection is put back only after its
//!   response body was read to the end; a body dropped earlier (a client that went away) drops
//!   the connection, which closes it, so the upstream stops generating. A connection is taken
//!   only once hyper says it can carry a request.
//! - **A request that never started is retried.** A reused connection can be closed by the
//!   upstream just as a request is handed to it; when hyper gives the request back unsent,
//!   it goes out on another connection. A request already written is never sent twice.
//! - **Bounded.** At most `max_idle` HTTP/1 connections wait per thread and upstream host; one
//!   idle longer than the idle timeout is closed, when next seen or by a reaper task that a
//!   thread runs while it holds idle connections (one wake-up per idle timeout).
//! - **HTTP/2 when the upstream offers it** (ALPN over TLS): one shared connection per thread
//!   and host, its requests multiplexed.

use std::cell::Cell;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::ThreadId;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, HOST};
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;
use tower_service::Service;

use crate::{ErrorKind, ProviderError};

type Connector = HttpsConnector<HttpConnector>;
type RequestBody = Full<Bytes>;

/// How long a pooled HTTP/1 connection that is not free yet is waited for before it is closed.
const READY_WAIT: Duration = Duration::from_secs(1);

/// A pooled client: the connector and each thread's idle connections.
pub(crate) struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
    connector: Connector,
    /// Each thread's hosts and their idle connections.
    threads: thread_local::ThreadLocal<ThreadHosts>,
    max_idle: usize,
    idle_timeout: Duration,
}

/// One thread's share of the pool.
struct ThreadHosts {
    /// Its hosts: a `Cell` taken and put back, never borrowed across an `.await`.
    hosts: Cell<Vec<Host>>,
    /// Whether a reaper task is closing this thread's expired idle connections.
    reaping: Arc<AtomicBool>,
}

/// One upstream origin's connections on one thread.
struct Host {
    scheme: Scheme,
    authority: Authority,
    /// The `Host` header HTTP/1 requests to it carry.
    host_header: HeaderValue,
    /// Idle HTTP/1 connections, the most recently used last.
    idle: Vec<IdleH1>,
    /// The HTTP/2 connection, when the upstream speaks it.
    h2: Option<http2::SendRequest<RequestBody>>,
}

struct IdleH1 {
    sender: http1::SendRequest<RequestBody>,
    since: Instant,
}

/// A connection taken for one request.
enum Taken {
    H1 { sender: http1::SendRequest<RequestBody>, host_header: HeaderValue },
    H2(http2::SendRequest<RequestBody>),
}

/// An upstream's response body. An HTTP/1 body hands its connection back to the pool once it
/// has been read to the end.
pub(crate) struct ReplyBody {
    inner: Incoming,
    give_back: Option<GiveBack>,
}

struct GiveBack {
    pool: Arc<Shared>,
    sender: http1::SendRequest<RequestBody>,
    scheme: Scheme,
    authority: Authority,
}

/// The connector to every upstream: TCP without Nagle's delay, then TLS (the Web PKI's roots)
/// for `https` URLs, offering HTTP/2 and HTTP/1.1.
pub(crate) fn connector(connect_timeout: Duration) -> Connector {
    let mut tcp = HttpConnector::new();
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(connect_timeout));
    tcp.enforce_http(false);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(tcp)
}

impl Pool {
    pub(crate) fn new(connector: Connector, max_idle: usize, idle_timeout: Duration) -> Self {
        let shared = Shared { connector, threads: thread_local::ThreadLocal::new(), max_idle, idle_timeout };
        Pool { shared: Arc::new(shared) }
    }

    /// Sends `request` (an absolute URI) on an idle connection to its origin, else on a new
    /// one; the response whatever its status.
    pub(crate) async fn send(&self, mut request: Request<RequestBody>) -> Result<Response<ReplyBody>, ProviderError> {
        let (scheme, authority) = origin(request.uri())?;
        let target = request.uri().clone();
        loop {
            let (taken, reused) = match self.shared.take_idle(&scheme, &authority).await {
                Some(taken) => (taken, true),
                // Boxed: connecting is rare and its future is large (kilobytes that every
                // request's future would otherwise carry and copy).
                None => (Box::pin(self.connect(&scheme, &authority, &target)).await?, false),
            };
            match self.send_on(taken, request, &scheme, &authority).await {
                Ok(response) => return Ok(response),
                Err(Unsent::Retry(returned, _)) if reused => {
                    tracing::debug!("a pooled upstream connection closed before the request went out; retrying");
                    request = returned;
                    *request.uri_mut() = target.clone();
                }
                Err(Unsent::Retry(_, error)) => return Err(ProviderError::from_connect(error.into())),
                Err(Unsent::Failed(e)) => return Err(e),
            }
        }
    }

    /// Sends on `taken`; a request hyper gives back unsent comes back as [`Unsent::Retry`].
    async fn send_on(
        &self,
        taken: Taken,
        mut request: Request<RequestBody>,
        scheme: &Scheme,
        authority: &Authority,
    ) -> Result<Response<ReplyBody>, Unsent> {
        match taken {
            Taken::H1 { mut sender, host_header } => {
                request.headers_mut().entry(HOST).or_insert(host_header);
                *request.uri_mut() = origin_form(request.uri());
                let response = sender.try_send_request(request).await.map_err(Unsent::from)?;
                let give_back =
                    GiveBack { pool: self.shared.clone(), sender, scheme: scheme.clone(), authority: authority.clone() };
                Ok(response.map(|inner| ReplyBody::new(inner, Some(give_back))))
            }
            Taken::H2(mut sender) => {
                let response = sender.try_send_request(request).await.map_err(Unsent::from)?;
                Ok(response.map(|inner| ReplyBody::new(inner, None)))
            }
        }
    }

    /// Opens a connection to the origin and starts its task on this runtime.
    async fn connect(&self, scheme: &Scheme, authority: &Authority, target: &Uri) -> Result<Taken, ProviderError> {
        let io = self.shared.connector.clone().call(target.clone()).await.map_err(ProviderError::from_connect)?;
        if io.connected().is_negotiated_h2() {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(|e| ProviderError::from_connect(e.into()))?;
            tokio::spawn(log_end(connection));
            self.shared.with_host(scheme, authority, |host| host.h2 = Some(sender.clone()));
            return Ok(Taken::H2(sender));
        }
        let (sender, connection) = http1::handshake(io).await.map_err(|e| ProviderError::from_connect(e.into()))?;
        tokio::spawn(log_end(connection));
        let host_header = self.shared.with_host(scheme, authority, |host| host.host_header.clone());
        Ok(Taken::H1 { sender, host_header })
    }
}

impl Shared {
    /// Runs `f` on this thread's entry for the origin, made if missing.
    fn with_host<R>(&self, scheme: &Scheme, authority: &Authority, f: impl FnOnce(&mut Host) -> R) -> R {
        let cell = &self.this_thread().hosts;
        let mut hosts = cell.take();
        let index = match hosts.iter().position(|h| h.authority == *authority && h.scheme == *scheme) {
            Some(index) => index,
            None => {
                hosts.push(Host::new(scheme.clone(), authority.clone()));
                hosts.len() - 1
            }
        };
        let result = f(&mut hosts[index]);
        cell.set(hosts);
        result
    }

    fn this_thread(&self) -> &ThreadHosts {
        self.threads.get_or(|| ThreadHosts { hosts: Cell::new(Vec::new()), reaping: Arc::new(AtomicBool::new(false)) })
    }

    /// Makes sure a reaper runs for this thread's idle connections (none is needed while it
    /// holds none, so an idle gateway without upstream connections never wakes for this).
    fn reap_later(self: &Arc<Self>) {
        let reaping = &self.this_thread().reaping;
        if reaping.load(Ordering::Relaxed) || reaping.swap(true, Ordering::Relaxed) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            reaping.store(false, Ordering::Relaxed);
            return;
        };
        runtime.spawn(self.clone().reap(reaping.clone(), std::thread::current().id()));
    }

    /// Every idle timeout, closes this thread's connections idle for longer; ends when none is
    /// left (or when the task finds itself on another thread, which only a multi-threaded
    /// runtime does: the next connection put back starts a new one).
    async fn reap(self: Arc<Self>, reaping: Arc<AtomicBool>, thread: ThreadId) {
        loop {
            tokio::time::sleep(self.idle_timeout).await;
            if std::thread::current().id() != thread || self.close_expired() == 0 {
                break;
            }
        }
        reaping.store(false, Ordering::Relaxed);
    }

    /// Drops this thread's closed and expired idle connections, and the hosts left without any;
    /// how many idle ones remain.
    fn close_expired(&self) -> usize {
        let cell = &self.this_thread().hosts;
        let mut hosts = cell.take();
        let mut left = 0;
        for host in &mut hosts {
            host.idle.retain(|idle| !idle.sender.is_closed() && idle.since.elapsed() < self.idle_timeout);
            left += host.idle.len();
        }
        hosts.retain(|host| !host.idle.is_empty() || host.h2.as_ref().is_some_and(|h2| !h2.is_closed()));
        cell.set(hosts);
        left
    }

    /// A connection to the origin that can take a request now, if this thread holds one.
    async fn take_idle(&self, scheme: &Scheme, authority: &Authority) -> Option<Taken> {
        loop {
            let candidate = self.with_host(scheme, authority, |host| host.take(self.idle_timeout))?;
            match candidate {
                Taken::H1 { mut sender, host_header } => {
                    // A body read to its end has usually let the connection go idle already;
                    // if its task has not run since, it will at once. One that stays busy
                    // (its request still being written to an upstream that stopped reading)
                    // is closed rather than waited for.
                    if sender.is_ready() || matches!(tokio::time::timeout(READY_WAIT, sender.ready()).await, Ok(Ok(()))) {
                        return Some(Taken::H1 { sender, host_header });
                    }
                }
                h2 => return Some(h2),
            }
        }
    }
}

impl Host {
    fn new(scheme: Scheme, authority: Authority) -> Self {
        let host_header = HeaderValue::from_str(authority.as_str()).unwrap_or(HeaderValue::from_static(""));
        Host { scheme, authority, host_header, idle: Vec::new(), h2: None }
    }

    /// The most recently used connection still open and not idle too long.
    fn take(&mut self, idle_timeout: Duration) -> Option<Taken> {
        if let Some(h2) = &self.h2 {
            if !h2.is_closed() {
                return Some(Taken::H2(h2.clone()));
            }
            self.h2 = None;
        }
        while let Some(idle) = self.idle.pop() {
            if !idle.sender.is_closed() && idle.since.elapsed() < idle_timeout {
                return Some(Taken::H1 { sender: idle.sender, host_header: self.host_header.clone() });
            }
        }
        None
    }
}

impl ReplyBody {
    fn new(inner: Incoming, give_back: Option<GiveBack>) -> Self {
        let mut body = ReplyBody { inner, give_back };
        if body.inner.is_end_stream() {
            body.release();
        }
        body
    }

    /// Hands the connection back to this thread's list (or drops it when the list is full).
    fn release(&mut self) {
        let Some(back) = self.give_back.take() else { return };
        let pool = back.pool;
        let kept = pool.with_host(&back.scheme, &back.authority, |host| {
            let keep = host.idle.len() < pool.max_idle && !back.sender.is_closed();
            if keep {
                host.idle.push(IdleH1 { sender: back.sender, since: Instant::now() });
            }
            keep
        });
        if kept {
            pool.reap_later();
        }
    }
}

impl Body for ReplyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Err(_)) => self.give_back = None,
            None => self.release(),
            Some(Ok(_)) if self.inner.is_end_stream() => self.release(),
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why a request did not get a response: given back unsent (safe to send elsewhere), or
/// failed once it may have been written.
enum Unsent {
    Retry(Request<RequestBody>, hyper::Error),
    Failed(ProviderError),
}

impl From<hyper::client::conn::TrySendError<Request<RequestBody>>> for Unsent {
    fn from(mut err: hyper::client::conn::TrySendError<Request<RequestBody>>) -> Self {
        match err.take_message() {
            Some(request) => Unsent::Retry(request, err.into_error()),
            None => Unsent::Failed(ProviderError::from_exchange(err.into_error())),
        }
    }
}

/// The scheme and authority of an absolute URI.
fn origin(uri: &Uri) -> Result<(Scheme, Authority), ProviderError> {
    match (uri.scheme(), uri.authority()) {
        (Some(scheme), Some(authority)) => Ok((scheme.clone(), authority.clone())),
        _ => Err(ProviderError::new(ErrorKind::Connect, "invalid upstream URL")),
    }
}

/// The path and query alone, as an HTTP/1 request line carries them.
fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(path) => Uri::from(path.clone()),
        None => Uri::from_static("/"),
    }
}

/// Drives a connection until it closes; how it ended is only worth a debug line.
async fn log_end<F: std::future::Future<Output = Result<(), hyper::Error>>>(connection: F) {
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "upstream connection ended");
    }
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;
