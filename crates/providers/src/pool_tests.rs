//! The pool against real sockets: a raw HTTP/1 upstream that shows the request line and when
//! connections open, the mock upstream for streams, and a TLS upstream that offers HTTP/2.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

fn plain_pool(idle_timeout: Duration) -> Pool {
    Pool::new(connector(Duration::from_secs(5)), 4, idle_timeout)
}

fn post(url: &str, body: &'static str) -> Request<RequestBody> {
    let mut request = Request::new(Full::new(Bytes::from_static(body.as_bytes())));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = Uri::try_from(url).unwrap();
    request
}

async fn read_all(response: Response<ReplyBody>) -> Bytes {
    response.into_body().collect().await.unwrap().to_bytes()
}

/// A raw HTTP/1.1 upstream: answers every request with `ok`, records each request head, counts
/// connections, and closes each connection after its first answer when `close_after` is set
/// (without saying so in a header, as an upstream's idle timeout does).
struct RawUpstream {
    addr: std::net::SocketAddr,
    connections: Arc<AtomicU64>,
    heads: Arc<Mutex<Vec<String>>>,
}

impl RawUpstream {
    async fn start(close_after: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicU64::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (count, record) = (connections.clone(), heads.clone());
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let record = record.clone();
                tokio::spawn(async move {
                    while let Some(head) = read_request(&mut socket).await {
                        record.lock().unwrap().push(head);
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if socket.write_all(answer).await.is_err() || close_after {
                            return;
                        }
                    }
                });
            }
        });
        RawUpstream { addr, connections, heads }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

/// One request's head (its body, by `content-length`, read and dropped); `None` at EOF.
async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut byte = [0_u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if socket.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let length = head
        .lines()
        .find_map(|line| line.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.trim().parse().unwrap()))
        .unwrap_or(0_usize);
    let mut body = vec![0_u8; length];
    socket.read_exact(&mut body).await.ok()?;
    Some(head)
}

#[tokio::test]
async fn requests_in_turn_share_one_connection_and_send_the_origin_form() {
    let upstream = RawUpstream::start(false).await;
    let pool = plain_pool(Duration::from_secs(90));
    for _ in 0..3 {
        let response = pool.send(post(&upstream.url("/v1/chat?x=1"), "{}")).await.unwrap();
        assert_eq!(read_all(response).await, "ok");
    }
    assert_eq!(upstream.connections(), 1);
    let heads = upstream.heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 3);
    for head in heads {
        assert!(head.starts_with("POST /v1/chat?x=1 HTTP/1.1\r\n"), "{head}");
        assert!(head.to_ascii_lowercase().contains(&format!("host: {}\r\n", upstream.addr)), "{head}");
    }
}

#[tokio::test]
async fn a_connection_the_upstream_closed_while_idle_is_replaced() {
    let upstream = RawUpstream::start(true).await;
    let pool = plain_pool(Duration::from_secs(90));
    for round in 1..=3 {
        let response = pool.send(post(&upstream.url("/v1/chat"), "{}")).await.unwrap();
        assert_eq!(read_all(response).await, "ok");
        // Let the connection's task see the upstream's close (generous for a loaded machine).
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(upstream.connections(), round);
    }
}

#[tokio::test]
async fn a_connection_idle_past_the_timeout_is_not_reused() {
    let upstream = RawUpstream::start(false).await;
    let pool = plain_pool(Duration::from_millis(400));
    for _ in 0..2 {
        read_all(pool.send(post(&upstream.url("/v1/chat"), "{}")).await.unwrap()).await;
    }
    assert_eq!(upstream.connections(), 1, "reused within the idle timeout");
    tokio::time::sleep(Duration::from_millis(500)).await;
    read_all(pool.send(post(&upstream.url("/v1/chat"), "{}")).await.unwrap()).await;
    assert_eq!(upstream.connections(), 2, "a fresh connection after it");
}

#[tokio::test]
async fn a_body_dropped_before_its_end_closes_its_connection() {
    let mock = mock_upstream::MockUpstream::start().await.unwrap();
    mock.set_scenario(mock_upstream::Scenario { chunk_delay_ms: 50, ..Default::default() });
    let pool = plain_pool(Duration::from_secs(90));
    let url = format!("{}/chat/completions", mock.openai_base());
    let stream = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let authorized = |body| {
        let mut request = post(&url, body);
        request.headers_mut().insert(http::header::AUTHORIZATION, HeaderValue::from_static("Bearer sk-test"));
        request
    };
    let mut body = pool.send(authorized(stream)).await.unwrap().into_body();
    body.frame().await.unwrap().unwrap();
    drop(body);
    let whole = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let response = pool.send(authorized(whole)).await.unwrap();
    assert_eq!(response.status(), 200);
    read_all(response).await;
    assert_eq!(mock.connections_accepted(), 2, "the cut stream's connection is not reused");
    for _ in 0..100 {
        if mock.streams_cancelled() == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the upstream never saw the stream cancelled");
}

/// A TLS upstream that offers only HTTP/2 and answers with the version and target it saw.
async fn tls_h2_upstream() -> (u16, rustls::pki_types::CertificateDer<'static>, Arc<AtomicU64>) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = certified.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(AtomicU64::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(socket).await else { return };
                let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                    let seen = format!("{:?} {}", request.version(), request.uri());
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(seen))))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (port, cert, connections)
}

#[tokio::test]
async fn an_upstream_that_offers_http2_gets_one_multiplexed_connection() {
    let (port, cert, connections) = tls_h2_upstream().await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .wrap_connector(tcp);
    let pool = Pool::new(https, 4, Duration::from_secs(90));
    let url = format!("https://localhost:{port}/v1/chat?x=1");
    let first = pool.send(post(&url, "{}")).await.unwrap();
    assert_eq!(first.version(), http::Version::HTTP_2);
    assert_eq!(read_all(first).await, format!("HTTP/2.0 {url}"));
    let together = (0..4).map(|_| async { read_all(pool.send(post(&url, "{}")).await.unwrap()).await });
    for seen in futures::future::join_all(together).await {
        assert_eq!(seen, format!("HTTP/2.0 {url}"));
    }
    assert_eq!(connections.load(Ordering::SeqCst), 1, "one connection carries every request");
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_timeout_without_further_requests() {
    let mock = mock_upstream::MockUpstream::start().await.unwrap();
    let pool = plain_pool(Duration::from_millis(100));
    let mut request = post(&format!("{}/models", mock.openai_base()), "");
    *request.method_mut() = http::Method::GET;
    request.headers_mut().insert(http::header::AUTHORIZATION, HeaderValue::from_static("Bearer sk-test"));
    read_all(pool.send(request).await.unwrap()).await;
    assert_eq!(idle_connections(&pool), 1, "the connection waits idle");
    assert!(pool.shared.this_thread().reaping.load(Ordering::Relaxed), "a reaper runs");
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(idle_connections(&pool), 0, "the reaper closed it");
    assert!(!pool.shared.this_thread().reaping.load(Ordering::Relaxed), "and ended");
}

/// This thread's idle connections, counted without closing any.
fn idle_connections(pool: &Pool) -> usize {
    let cell = &pool.shared.this_thread().hosts;
    let hosts = cell.take();
    let count = hosts.iter().map(|host| host.idle.len()).sum();
    cell.set(hosts);
    count
}
