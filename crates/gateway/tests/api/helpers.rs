//! The test harness: [`spawn_app`] starts two fake upstreams and a real gateway on port 0
//! with a fresh data directory, and [`TestApp`] wraps the calls tests make against it.
//! [`spawn_app_with`] takes [`Options`]: more `[routing]` keys, providers of their own (one
//! mock upstream each, see [`ProviderSpec`]) and more TOML (models over them, `[fx]`).
//!
//! **Backends.** The store is SQLite in the app's data directory unless the suite runs on
//! Postgres ([`postgres_enabled`]: `MARGA_E2E_POSTGRES=1`, or, when that variable is unset,
//! `MARGA_TEST_POSTGRES=1`). Then every app gets a fresh database `marga_e2e_<uuid>` on
//! `MARGA_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`), kept across
//! [`TestApp::restart`] and dropped with the last [`TestApp`] using it; Postgres being
//! unreachable is then a failure, not a skip. [`spawn_cluster`] starts several apps on one
//! database (Postgres only). The databases themselves are made in `test_db.rs`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use marga_gateway::app::App;
use marga_gateway::auth::MasterKey;
use marga_gateway::config::{Config, Overrides};
use marga_store::{GenerationRecord, Repos};
use mock_upstream::{MockUpstream, Scenario};
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::sync::oneshot;

pub use crate::test_db::{note_skipped, postgres_enabled, TestDatabase};

/// Route prices used by the config, per million tokens.
pub const OPENAI_INPUT: &str = "0.15";
pub const OPENAI_OUTPUT: &str = "0.60";
pub const ANTHROPIC_INPUT: &str = "3";
pub const ANTHROPIC_OUTPUT: &str = "15";
pub const GEMINI_INPUT: &str = "8.25";
pub const GEMINI_OUTPUT: &str = "33";
pub const BACKUP_INPUT: &str = "0.2";
pub const BACKUP_OUTPUT: &str = "0.8";
pub const EMBED_INPUT: &str = "0.02";

/// Knobs a test may turn before the gateway starts.
#[derive(Clone, Debug)]
pub struct Options {
    pub max_body_bytes: usize,
    pub first_token_timeout_ms: u64,
    /// `None`: let the gateway generate a master key.
    pub master_key: Option<String>,
    /// More `[routing]` keys, one `key = value` a line; a key named here replaces the base
    /// config's (`connect_timeout_ms`, `first_token_timeout_ms`, `total_timeout_ms`, `max_attempts`).
    pub routing: String,
    /// Providers of the test's own, each served by a mock upstream of its own
    /// ([`TestApp::upstream`]).
    pub providers: Vec<ProviderSpec>,
    /// TOML appended to the base config: models over `providers`, `[fx]`, ...
    pub extra_toml: String,
    /// More `[server]` keys, one `key = value` a line.
    pub server: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_body_bytes: 8 * 1024 * 1024,
            first_token_timeout_ms: 2_000,
            master_key: Some(format!("marga_mk_test_{}", uuid::Uuid::new_v4().simple())),
            routing: String::new(),
            providers: Vec::new(),
            extra_toml: String::new(),
            server: String::new(),
        }
    }
}

/// A provider (OpenAI kind) served by a mock upstream of its own, so that which provider
/// received a request is simply which mock counted it.
#[derive(Clone, Debug)]
pub struct ProviderSpec {
    pub id: String,
    /// ISO 3166 alpha-2, e.g. `IN` or `US`.
    pub region: String,
    pub zdr: bool,
    pub trains_on_data: bool,
}

/// A provider of the test's own in `region`, without ZDR, not training on data.
pub fn provider(id: &str, region: &str) -> ProviderSpec {
    ProviderSpec { id: id.to_owned(), region: region.to_owned(), zdr: false, trains_on_data: false }
}

impl ProviderSpec {
    pub fn zdr(mut self) -> Self {
        self.zdr = true;
        self
    }

    pub fn trains_on_data(mut self) -> Self {
        self.trains_on_data = true;
        self
    }
}

/// A running gateway with its two upstreams.
pub struct TestApp {
    pub base_url: String,
    pub master_key: String,
    pub client: reqwest::Client,
    /// Serves the providers `openai-main`, `anthropic-main`, `gemini-main` and `nousage`.
    pub mock: MockUpstream,
    /// Serves the provider `backup` (OpenAI kind, region IN): the healthy second route.
    pub backup: MockUpstream,
    /// The mocks of [`Options::providers`], by provider id.
    pub upstreams: Vec<(String, MockUpstream)>,
    pub store: std::sync::Arc<dyn Repos>,
    pub data_dir: TempDir,
    /// The Postgres database the app runs on (`None`: SQLite in `data_dir`).
    pub database: Option<Arc<TestDatabase>>,
    config_path: PathBuf,
    /// Holds the port of the provider `dead`.
    _refusing: tokio::net::TcpSocket,
    shutdown: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(Options::default()).await
}

pub async fn spawn_app_with(options: Options) -> TestApp {
    let database = TestDatabase::if_enabled().await;
    spawn_app_on(options, database).await
}

/// `n` gateways on one Postgres database, sharing one master key (Postgres only: panics
/// otherwise). Each has its own upstream mocks, config file and data directory.
pub async fn spawn_cluster(n: usize) -> Vec<TestApp> {
    assert!(postgres_enabled(), "spawn_cluster needs Postgres");
    let database = Arc::new(TestDatabase::create().await);
    let options = Options::default();
    let mut apps = Vec::with_capacity(n);
    for _ in 0..n {
        apps.push(spawn_app_on(options.clone(), Some(Arc::clone(&database))).await);
    }
    apps
}

/// An app on `database` (`None`: SQLite in its data directory).
pub async fn spawn_app_on(options: Options, database: Option<Arc<TestDatabase>>) -> TestApp {
    let mock = MockUpstream::start().await.expect("start mock");
    let backup = MockUpstream::start().await.expect("start backup mock");
    let mut upstreams = Vec::with_capacity(options.providers.len());
    for spec in &options.providers {
        upstreams.push((spec.id.clone(), MockUpstream::start().await.expect("start provider mock")));
    }
    let data_dir = tempfile::tempdir().expect("temp dir");
    let config_path = data_dir.path().join("marga.toml");
    let refusing = refusing_port();
    let dead_port = refusing.local_addr().expect("addr").port();
    let toml = config_toml(&mock, &backup, dead_port, &options, &upstreams);
    std::fs::write(&config_path, toml).expect("write config");
    let database_url = database.as_ref().map(|db| db.url.clone());
    let running = start_server(&config_path, data_dir.path(), options.master_key.clone(), database_url).await;
    let master_key = match (options.master_key, running.generated_key) {
        (Some(key), _) => key,
        (None, Some(key)) => key,
        (None, None) => panic!("a fresh data dir must generate a master key"),
    };
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client");
    TestApp {
        base_url: running.base_url,
        master_key,
        client,
        mock,
        backup,
        upstreams,
        store: running.store,
        data_dir,
        database,
        config_path,
        _refusing: refusing,
        shutdown: running.shutdown,
        server: running.server,
    }
}

/// A gateway serving in a background task.
struct Running {
    base_url: String,
    generated_key: Option<String>,
    store: std::sync::Arc<dyn Repos>,
    shutdown: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// The secrets key given to apps on Postgres (32 bytes of 0x2a, in base64).
pub const TEST_SECRETS_KEY: &str = "KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio=";

async fn start_server(
    config_path: &Path,
    data_dir: &Path,
    master_key: Option<String>,
    database_url: Option<String>,
) -> Running {
    // Instances sharing Postgres must share the secrets key; on SQLite each app generates its
    // own key file.
    let secrets_key = database_url.as_ref().map(|_| TEST_SECRETS_KEY.to_owned());
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".parse().expect("addr")),
        data_dir: Some(data_dir.join("data")),
        config_file: Some(config_path.to_owned()),
        database_url,
    };
    let lookup = |name: &str| (name == "MARGA_SECRETS_KEY").then(|| secrets_key.clone()).flatten();
    let config = Config::load_with_env(overrides, &lookup).expect("config loads");
    let app = App::build(config, master_key).await.expect("app builds");
    let generated_key = match app.master_key() {
        MasterKey::Generated(key) => Some(key.clone()),
        _ => None,
    };
    let base_url = format!("http://127.0.0.1:{}", app.port());
    let store = app.store();
    let (shutdown, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = rx.await;
    }));
    Running { base_url, generated_key, store, shutdown, server }
}

/// A local port that refuses connections: bound (so no other test can take it) but never
/// listening.
fn refusing_port() -> tokio::net::TcpSocket {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
    socket
}

/// One route as an inline TOML table, for `routes = [...]`.
pub fn route(provider: &str, model: &str, input: &str, output: &str, currency: &str) -> String {
    format!(
        r#"{{ provider = "{provider}", model = "{model}", input_per_mtok = "{input}", output_per_mtok = "{output}", currency = "{currency}" }}"#
    )
}

/// The `[routing]` section: the base keys unless `extra` names them, then `extra`.
fn routing_section(options: &Options) -> String {
    let first_token = options.first_token_timeout_ms.to_string();
    let base = [
        ("connect_timeout_ms", "1000"),
        ("first_token_timeout_ms", first_token.as_str()),
        ("total_timeout_ms", "20000"),
        ("max_attempts", "5"),
    ];
    let overridden = |key: &str| {
        options.routing.lines().any(|l| l.split('=').next().is_some_and(|k| k.trim() == key))
    };
    let mut out = String::from("[routing]\n");
    for (key, value) in base.iter().filter(|(k, _)| !overridden(k)) {
        out.push_str(&format!("{key} = {value}\n"));
    }
    for line in options.routing.lines().map(str::trim).filter(|l| !l.is_empty()) {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// `[providers.<id>]` for each of the test's own providers, each at its own mock.
fn providers_section(specs: &[ProviderSpec], upstreams: &[(String, MockUpstream)]) -> String {
    let mut out = String::new();
    for (spec, (_, mock)) in specs.iter().zip(upstreams) {
        out.push_str(&format!(
            "\n[providers.{id}]\nkind = \"openai\"\nbase_url = \"{base}\"\napi_key = \"sk-{id}\"\nregion = \"{region}\"\nzdr = {zdr}\ntrains_on_data = {trains}\n",
            id = spec.id,
            base = mock.openai_base(),
            region = spec.region,
            zdr = spec.zdr,
            trains = spec.trains_on_data,
        ));
    }
    out
}

fn config_toml(
    mock: &MockUpstream,
    backup: &MockUpstream,
    dead_port: u16,
    options: &Options,
    upstreams: &[(String, MockUpstream)],
) -> String {
    let openai = route("openai-main", "gpt-mock", OPENAI_INPUT, OPENAI_OUTPUT, "USD");
    let anthropic = route("anthropic-main", "claude-mock", ANTHROPIC_INPUT, ANTHROPIC_OUTPUT, "USD");
    let gemini = route("gemini-main", "gemini-mock", GEMINI_INPUT, GEMINI_OUTPUT, "INR");
    let backup_route = route("backup", "gpt-backup", BACKUP_INPUT, BACKUP_OUTPUT, "USD");
    // The first route of each failover model is the cheaper one, so that every strategy that
    // ranks by price keeps the config's order.
    let dead = route("dead", "gpt-dead", "0.01", "0.01", "USD");
    let nousage = route("nousage", "gpt-nousage", OPENAI_INPUT, OPENAI_OUTPUT, "USD");
    let openai_embed = route("openai-main", "embed-mock", EMBED_INPUT, "0", "USD");
    let gemini_embed = route("gemini-main", "gemini-embed-mock", EMBED_INPUT, "0", "USD");
    format!(
        r#"
[server]
max_body_bytes = {max_body}
log_flush_ms = 10
{server}

{routing}
[providers.openai-main]
kind = "openai"
base_url = "{openai_base}"
api_key = "sk-openai-configured"
region = "US"

[providers.anthropic-main]
kind = "anthropic"
base_url = "{anthropic_base}"
api_key = "sk-ant-configured"
region = "US"

[providers.gemini-main]
kind = "gemini"
base_url = "{gemini_base}"
api_key = "gemini-configured"
region = "US"

[providers.nousage]
kind = "openai"
base_url = "{openai_base}"
api_key = "sk-nousage"
region = "US"
supports_stream_usage = false

[providers.backup]
kind = "openai"
base_url = "{backup_base}"
api_key = "sk-backup"
region = "IN"

[providers.dead]
kind = "openai"
base_url = "http://127.0.0.1:{dead_port}/v1"
api_key = "sk-dead"
region = "US"

[models."test/openai-chat"]
routes = [{openai}]

[models."test/anthropic-chat"]
routes = [{anthropic}]

[models."test/gemini-chat"]
routes = [{gemini}]

[models."test/nousage"]
routes = [{nousage}]

[models."test/failover"]
routes = [{openai}, {backup_route}]

[models."test/dead-first"]
routes = [{dead}, {backup_route}]

[models."test/openai-embed"]
type = "embedding"
routes = [{openai_embed}]

[models."test/gemini-embed"]
type = "embedding"
routes = [{gemini_embed}]
{own_providers}
{extra}
"#,
        max_body = options.max_body_bytes,
        server = options.server,
        routing = routing_section(options),
        own_providers = providers_section(&options.providers, upstreams),
        extra = options.extra_toml,
        openai_base = mock.openai_base(),
        anthropic_base = mock.anthropic_base(),
        gemini_base = mock.gemini_base(),
        backup_base = backup.openai_base(),
    )
}

/// A response read in full.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
}

impl Reply {
    async fn read(response: reqwest::Response) -> Reply {
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.expect("read body");
        Reply { status, headers, text }
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `x-br-route`, the routing decision every served answer carries.
    pub fn route(&self) -> &str {
        self.header("x-br-route").unwrap_or_else(|| panic!("no x-br-route header: {:?}", self.headers))
    }

    /// `x-br-provider`, which every served answer carries.
    pub fn provider(&self) -> &str {
        self.header("x-br-provider").unwrap_or_else(|| panic!("no x-br-provider header: {:?}", self.headers))
    }

    /// The SSE `data:` payloads, in order.
    pub fn events(&self) -> Vec<String> {
        sse_data(&self.text)
    }

    /// The error envelope's `error` object, after checking its shape.
    pub fn error(&self) -> Value {
        let body = self.json();
        let error = body.get("error").unwrap_or_else(|| panic!("no error envelope: {body}")).clone();
        for key in ["message", "type", "code", "param"] {
            assert!(error.get(key).is_some(), "error envelope lacks `{key}`: {body}");
        }
        assert!(error["message"].is_string(), "{body}");
        error
    }
}

/// The `data:` payloads of an SSE body.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| {
            let lines: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            (!lines.is_empty()).then(|| lines.join("\n"))
        })
        .collect()
}

/// A parsed stream: the JSON events before `[DONE]`, and whether `[DONE]` came (last).
pub struct Stream {
    pub chunks: Vec<Value>,
    pub done: bool,
}

impl Stream {
    pub fn parse(reply: &Reply) -> Stream {
        let events = reply.events();
        let done_at = events.iter().position(|e| e == "[DONE]");
        if let Some(i) = done_at {
            assert_eq!(i, events.len() - 1, "[DONE] must be the last event: {events:?}");
        }
        let chunks = events
            .iter()
            .filter(|e| *e != "[DONE]")
            .map(|e| serde_json::from_str(e).unwrap_or_else(|err| panic!("bad event {e}: {err}")))
            .collect();
        Stream { chunks, done: done_at.is_some() }
    }

    /// Concatenated `delta.content` of every chunk.
    pub fn content(&self) -> String {
        self.chunks
            .iter()
            .filter_map(|c| c.pointer("/choices/0/delta/content").and_then(Value::as_str))
            .collect()
    }

    /// Concatenated `text` of legacy completion chunks.
    pub fn completion_text(&self) -> String {
        self.chunks.iter().filter_map(|c| c.pointer("/choices/0/text").and_then(Value::as_str)).collect()
    }

    pub fn role_chunks(&self) -> usize {
        self.chunks.iter().filter(|c| c.pointer("/choices/0/delta/role").is_some_and(|r| !r.is_null())).count()
    }

    pub fn last(&self) -> &Value {
        self.chunks.last().expect("at least one chunk")
    }

    /// Checks the ending every successful stream has: a usage chunk with no choices, then
    /// `[DONE]`; returns the usage.
    pub fn assert_usage_then_done(&self) -> Value {
        assert!(self.done, "stream must end with [DONE]");
        let last = self.last();
        assert_eq!(last["choices"], json!([]), "last chunk before [DONE] must have no choices: {last}");
        let usage = last["usage"].clone();
        assert!(usage["prompt_tokens"].as_u64().is_some(), "usage chunk: {last}");
        assert!(usage["completion_tokens"].as_u64().is_some(), "usage chunk: {last}");
        usage
    }
}

pub fn user_chat(model: &str, text: &str) -> Value {
    json!({ "model": model, "messages": [{ "role": "user", "content": text }] })
}

pub fn user_chat_stream(model: &str, text: &str) -> Value {
    json!({ "model": model, "messages": [{ "role": "user", "content": text }], "stream": true })
}

/// What the mock answers to `text`: `"Mock reply to: "` and its first 40 characters.
pub fn mock_reply(text: &str) -> String {
    format!("Mock reply to: {}", text.chars().take(40).collect::<String>())
}

pub fn failing(status: u16) -> Scenario {
    Scenario { fail_first: u64::MAX, fail_status: status, ..Scenario::default() }
}

pub fn decimal(s: &str) -> Decimal {
    s.parse().unwrap_or_else(|_| panic!("not a decimal: {s}"))
}

/// `(prompt × input + completion × output) / 1e6`, as the request log writes it.
pub fn expected_cost(prompt: u64, completion: u64, input: &str, output: &str) -> String {
    let amount = (Decimal::from(prompt) * decimal(input) + Decimal::from(completion) * decimal(output))
        / Decimal::from(1_000_000);
    amount.normalize().to_string()
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// The mock serving the test's own provider `id`.
    pub fn upstream(&self, id: &str) -> &MockUpstream {
        self.upstreams
            .iter()
            .find(|(p, _)| p == id)
            .map(|(_, m)| m)
            .unwrap_or_else(|| panic!("no provider `{id}` in Options::providers"))
    }

    /// Requests received by each of the test's own providers, in `Options::providers` order.
    pub fn calls(&self) -> Vec<(&str, u64)> {
        self.upstreams.iter().map(|(id, m)| (id.as_str(), m.requests())).collect()
    }

    /// Stops the gateway (draining it and flushing its request log) and starts a new one on
    /// the same config file, data directory (or Postgres database), master key and mock
    /// upstreams.
    pub async fn restart(self) -> TestApp {
        let TestApp {
            master_key, client, mock, backup, upstreams, data_dir, database, config_path, _refusing, shutdown, server, ..
        } = self;
        let _ = shutdown.send(());
        match tokio::time::timeout(Duration::from_secs(5), server).await {
            Ok(joined) => joined.expect("server task").expect("server stopped cleanly"),
            Err(_) => panic!("the gateway did not stop within 5 s"),
        }
        let database_url = database.as_ref().map(|db| db.url.clone());
        let running = start_server(&config_path, data_dir.path(), Some(master_key.clone()), database_url).await;
        TestApp {
            base_url: running.base_url,
            master_key,
            client,
            mock,
            backup,
            upstreams,
            store: running.store,
            data_dir,
            database,
            config_path,
            _refusing,
            shutdown: running.shutdown,
            server: running.server,
        }
    }

    /// Where `secret` is stored in plaintext: files under the data directory and, on
    /// Postgres, rows of the app's database. Empty is good.
    pub async fn stored_in_plaintext(&self, secret: &str) -> Vec<String> {
        let mut found: Vec<String> = files_under(self.data_dir.path())
            .into_iter()
            .filter(|f| std::fs::read(f).unwrap_or_default().windows(secret.len()).any(|w| w == secret.as_bytes()))
            .map(|f| f.display().to_string())
            .collect();
        if let Some(db) = &self.database {
            found.extend(db.dump().await.into_iter().filter(|row| row.contains(secret)).map(|row| format!("row {row}")));
        }
        found
    }

    pub async fn put_json(&self, path: &str, body: &Value) -> Reply {
        let response =
            self.client.put(self.url(path)).bearer_auth(&self.master_key).json(body).send().await.expect("send");
        Reply::read(response).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        let response = self.client.delete(self.url(path)).bearer_auth(&self.master_key).send().await.expect("send");
        Reply::read(response).await
    }

    /// The breaker state `GET /health` shows for `route` (`provider/upstream_model`) of `model`.
    pub async fn breaker(&self, model: &str, route: &str) -> String {
        let health = self.get("/health").await.json();
        let routes = health["routes"].as_array().expect("routes in /health");
        let found = routes
            .iter()
            .find(|r| r["model"] == model && r["route"] == route)
            .unwrap_or_else(|| panic!("no route {route} of {model} in /health: {health}"));
        found["breaker"].as_str().expect("breaker is a string").to_owned()
    }

    /// The `/metrics` sample of `name` whose labels include every `key="value"` of `labels`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let text = self.get("/metrics").await.text;
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .find(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
            .map(|l| l.rsplit_once(' ').expect("value").1.parse().expect("float value"))
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Reply {
        let response =
            self.client.post(self.url(path)).bearer_auth(&self.master_key).json(body).send().await.expect("send");
        Reply::read(response).await
    }

    pub async fn post_chat(&self, body: &Value) -> Reply {
        self.post_json("/v1/chat/completions", body).await
    }

    /// POSTs raw bytes as JSON with the master key.
    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> Reply {
        let response = self
            .client
            .post(self.url(path))
            .bearer_auth(&self.master_key)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("send");
        Reply::read(response).await
    }

    /// Opens a request and returns the response unread (for streams read chunk by chunk).
    pub async fn open(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client.post(self.url(path)).bearer_auth(&self.master_key).json(body).send().await.expect("send")
    }

    pub async fn get(&self, path: &str) -> Reply {
        let response = self.client.get(self.url(path)).bearer_auth(&self.master_key).send().await.expect("send");
        Reply::read(response).await
    }

    /// The request log's record of `id`, waiting for the batch writer (up to ~2 s).
    pub async fn record(&self, id: &str) -> GenerationRecord {
        for _ in 0..200 {
            if let Some(record) = self.store.get_generation(id).await.expect("read record") {
                return record;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no request log record for {id} after 2 s");
    }

    /// Waits until the request log holds `n` records (up to ~2 s), then returns the count.
    pub async fn wait_for_records(&self, n: u64) -> u64 {
        let mut count = 0;
        for _ in 0..200 {
            count = self.store.count_generations().await.expect("count");
            if count >= n {
                return count;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        count
    }
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// The attempts of a record, as `(provider, outcome)` pairs.
pub fn attempts(record: &GenerationRecord) -> Vec<(String, String)> {
    let list: Vec<Value> = serde_json::from_str(&record.attempts).expect("attempts is a JSON array");
    list.iter()
        .map(|a| (a["provider"].as_str().unwrap_or("").to_owned(), a["outcome"].as_str().unwrap_or("").to_owned()))
        .collect()
}

/// Checks what every served chat reply shares: generation id, public model, provider, usage.
pub fn assert_served(reply: &Reply, model: &str, provider: &str) -> Value {
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let body = reply.json();
    let id = body["id"].as_str().expect("id");
    assert!(id.starts_with("gen-"), "id {id}");
    assert_eq!(reply.header("x-generation-id"), Some(id));
    assert_eq!(body["model"], model);
    assert_eq!(reply.provider(), provider);
    assert!(body["usage"]["prompt_tokens"].as_u64().is_some_and(|n| n > 0), "usage: {body}");
    assert!(body["usage"]["total_tokens"].as_u64().is_some(), "usage: {body}");
    body
}
