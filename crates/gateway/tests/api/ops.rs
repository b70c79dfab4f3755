//! `GET /health`, `GET /metrics`, and the master key kept only as a hash.

use marga_gateway::auth::MasterKey;

use crate::helpers::{files_under, spawn_app, spawn_app_with, user_chat, Options, TestDatabase};

#[tokio::test]
async fn health_is_200() {
    let app = spawn_app().await;
    let reply = app.client.get(app.url("/health")).send().await.unwrap();
    assert_eq!(reply.status(), 200);
    let body: serde_json::Value = reply.json().await.unwrap();
    assert_eq!(body["status"], "ok");
}

/// Checks one Prometheus text-format sample line: `name{labels} value`.
fn check_sample(line: &str) {
    let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
    let value = value.trim();
    let parsed = match value {
        "+Inf" | "-Inf" | "NaN" => true,
        v => v.parse::<f64>().is_ok(),
    };
    assert!(parsed, "not a float value: {line}");
    let name_end = series.find('{').unwrap_or(series.len());
    let name = &series[..name_end];
    assert!(!name.is_empty(), "{line}");
    assert!(
        name.chars().enumerate().all(|(i, c)| c == '_' || c == ':' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit())),
        "bad metric name: {line}"
    );
    if name_end < series.len() {
        let labels = series[name_end..].strip_prefix('{').and_then(|l| l.strip_suffix('}'));
        let labels = labels.unwrap_or_else(|| panic!("unbalanced labels: {line}"));
        // label="value" pairs, values quoted (commas may appear inside quotes).
        let mut rest = labels;
        while !rest.is_empty() {
            let (label, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("bad label: {line}"));
            assert!(label.chars().all(|c| c == '_' || c.is_ascii_alphanumeric()), "bad label name {label}: {line}");
            let mut end = None;
            let mut escaped = false;
            for (i, c) in after.char_indices() {
                match c {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    '"' => {
                        end = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let end = end.unwrap_or_else(|| panic!("unterminated label value: {line}"));
            rest = after[end + 1..].strip_prefix(',').unwrap_or(&after[end + 1..]);
        }
    }
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_request_counts() {
    let app = spawn_app().await;
    let reply = app.post_chat(&user_chat("test/openai-chat", "count me")).await;
    assert_eq!(reply.status, 200);
    let response = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = response.text().await.unwrap();
    assert!(text.contains("marga_requests_total"), "{text}");
    // The recorder is process-wide: other tests' requests show up too.
    let sample = text
        .lines()
        .find(|l| {
            l.starts_with("marga_requests_total{")
                && l.contains("model=\"test/openai-chat\"")
                && l.contains("provider=\"openai-main\"")
                && l.contains("status=\"success\"")
        })
        .unwrap_or_else(|| panic!("no success sample for the model: {text}"));
    assert!(sample.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap() >= 1.0, "{sample}");
    for line in text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')) {
        check_sample(line);
    }
}

#[tokio::test]
async fn a_generated_master_key_works_and_is_stored_only_as_a_hash() {
    let app = spawn_app_with(Options { master_key: None, ..Options::default() }).await;
    assert!(app.master_key.starts_with(marga_gateway::auth::MASTER_KEY_PREFIX), "{}", app.master_key);
    let reply = app.post_chat(&user_chat("sandbox/echo", "who am i")).await;
    assert_eq!(reply.status, 200, "the generated key is a bearer: {}", reply.text);
    app.record(reply.header("x-generation-id").unwrap()).await;

    let files = files_under(app.data_dir.path());
    if app.database.is_none() {
        assert!(files.iter().any(|f| f.ends_with("marga.db")), "{files:?}");
    }
    // Its hash is stored (in the SQLite files, or in a row of the Postgres database) and the
    // key itself nowhere.
    let hash = marga_gateway::keys::KeyHash::of(&app.master_key).to_hex();
    assert!(!app.stored_in_plaintext(&hash).await.is_empty(), "the master key's hash is not stored: {files:?}");
    let found = app.stored_in_plaintext(&app.master_key).await;
    assert!(found.is_empty(), "the master key is stored in plaintext: {found:?}");
}

#[tokio::test]
async fn a_second_gateway_on_a_port_in_use_is_refused() {
    use marga_gateway::app::{App, StartError};
    use marga_gateway::config::{Config, Overrides};

    let dir = tempfile::tempdir().unwrap();
    let config = |listen: std::net::SocketAddr, data: &str| {
        let overrides = Overrides {
            listen: Some(listen),
            data_dir: Some(dir.path().join(data)),
            config_file: None,
            database_url: None,
        };
        let key = |name: &str| (name == "MARGA_SECRETS_KEY").then(|| crate::helpers::TEST_SECRETS_KEY.to_owned());
        Config::load_with_env(overrides, &key).unwrap()
    };
    let first = App::build(config("127.0.0.1:0".parse().unwrap(), "first"), None).await.unwrap();
    // Another gateway (whose serving sockets set SO_REUSEPORT) must not join the first one's.
    match App::build(config(first.local_addr(), "second"), None).await {
        Err(StartError::Bind { source, .. }) => assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse),
        Err(other) => panic!("expected a bind error, got {other}"),
        Ok(_) => panic!("a second gateway started on a port in use"),
    }
    // Nor share another program's port.
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let refused = App::build(config(other.local_addr().unwrap(), "third"), None).await;
    assert!(matches!(refused, Err(StartError::Bind { .. })));
}

#[tokio::test]
async fn a_restart_on_the_same_data_dir_keeps_the_generated_key() {
    use marga_gateway::app::App;
    use marga_gateway::config::{Config, Overrides};

    let dir = tempfile::tempdir().unwrap();
    // On Postgres, the same database (the data dir then holds nothing).
    let database = TestDatabase::if_enabled().await;
    let config = || {
        let overrides = Overrides {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            data_dir: Some(dir.path().to_owned()),
            config_file: None,
            database_url: database.as_ref().map(|db| db.url.clone()),
        };
        let key = |name: &str| (name == "MARGA_SECRETS_KEY").then(|| crate::helpers::TEST_SECRETS_KEY.to_owned());
        Config::load_with_env(overrides, &key).unwrap()
    };
    let first = App::build(config(), None).await.unwrap();
    let MasterKey::Generated(key) = first.master_key() else { panic!("first start generates a key") };
    let key = key.clone();
    drop(first);
    let second = App::build(config(), None).await.unwrap();
    assert!(matches!(second.master_key(), MasterKey::Stored));
    let base = format!("http://127.0.0.1:{}", second.port());
    let (_tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(second.run_until_stopped(async move {
        let _ = rx.await;
    }));
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&user_chat("sandbox/echo", "again"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// A burst of `n` overlapping requests to the test's own provider `pool`, answered after a
/// delay so that each needs a connection of its own; returns the connections the upstream
/// accepted meanwhile.
async fn burst(app: &crate::helpers::TestApp, n: usize) -> u64 {
    let upstream = app.upstream("pool");
    let before = upstream.connections_accepted();
    let bodies: Vec<_> = (0..n).map(|i| user_chat("pool/chat", &format!("burst {i}"))).collect();
    let replies = futures::future::join_all(bodies.iter().map(|body| app.post_chat(body))).await;
    for reply in replies {
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    upstream.connections_accepted() - before
}

/// Connections to an upstream go back to the serving thread's pool when their request ends;
/// past `[server] upstream_idle_connections` they are closed, so that a burst does not leave
/// its connections (and their buffers) open for the idle timeout.
#[tokio::test]
async fn a_burst_keeps_only_the_idle_allowance_of_upstream_connections() {
    for (allowance, reopened) in [(1_u64, 3_u64), (8, 0)] {
        let app = spawn_app_with(Options {
            providers: vec![crate::helpers::provider("pool", "US")],
            extra_toml: format!(
                "\n[models.\"pool/chat\"]\nroutes = [{}]\n",
                crate::helpers::route("pool", "m", "0.1", "0.1", "USD")
            ),
            server: format!("threads = 1\nupstream_idle_connections = {allowance}\n"),
            ..Options::default()
        })
        .await;
        app.upstream("pool").set_scenario(mock_upstream::Scenario { delay_ms: 300, ..Default::default() });
        assert_eq!(burst(&app, 4).await, 4, "allowance {allowance}: the first burst opens a connection per request");
        assert_eq!(burst(&app, 4).await, reopened, "allowance {allowance}: connections opened by the second burst");
    }
}
