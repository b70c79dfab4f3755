//! `kill -9` in the middle of traffic: the real `marga` binary, killed with SIGKILL while about
//! a hundred chat requests (whole and streamed; instant, slow and very slow) are under way,
//! then started again on the same data. Every response a client received in full has exactly one charge in
//! the ledger, the balance is the grant minus the charges, and once the lease TTL has passed
//! no credit is left reserved by the dead instance. On SQLite always; on Postgres too when the
//! suite runs on it (see `helpers::postgres_enabled`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use marga_store::{LedgerEntry, Repos};
use mock_upstream::{MockUpstream, Scenario};
use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::helpers::{decimal, note_skipped, postgres_enabled, sse_data, TestDatabase};

/// `[billing] lease_ttl_s` of the gateway under test.
const LEASE_TTL: Duration = Duration::from_secs(2);
/// `[server] log_flush_ms`.
const LOG_FLUSH_MS: u64 = 20;
const REQUESTS: usize = 100;
/// Requests start one every `STAGGER` (0 … ~400 ms); the kill comes at `KILL_AT`, or later
/// if fewer than `COMPLETED_BEFORE_KILL` responses have completed by then (a loaded machine).
/// Every fifth request goes to an upstream that takes seconds, so some are always in flight.
const STAGGER: Duration = Duration::from_millis(4);
const KILL_AT: Duration = Duration::from_millis(800);
const COMPLETED_BEFORE_KILL: usize = 25;
/// Responses completed at least this long before the kill must have their request-log record
/// (flushed every `LOG_FLUSH_MS`, plus the write itself, which a loaded machine can stall for
/// a few hundred ms); a record queued just before the kill may be lost.
const RECORD_MARGIN: Duration = Duration::from_millis(400);
const GRANTED: &str = "10";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_on_sqlite_loses_no_acknowledged_charge_and_strands_no_credit() {
    kill_9_mid_traffic(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_on_postgres_loses_no_acknowledged_charge_and_strands_no_credit() {
    if !postgres_enabled() {
        note_skipped("crash::kill_9_on_postgres_loses_no_acknowledged_charge_and_strands_no_credit");
        return;
    }
    kill_9_mid_traffic(Some(TestDatabase::create().await)).await;
}

/// Where a gateway keeps its state: `dir/data` (SQLite) or a Postgres database.
pub(crate) struct Data {
    pub dir: tempfile::TempDir,
    pub database: Option<TestDatabase>,
}

impl Data {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn args(&self) -> Vec<String> {
        let mut args = vec!["--data-dir".to_owned(), self.data_dir().display().to_string()];
        if let Some(db) = &self.database {
            args.extend(["--database-url".to_owned(), db.url.clone()]);
        }
        args
    }

    /// On Postgres, the shared secrets key (required there); on SQLite none (a key file).
    fn secrets_env(&self) -> Vec<(&'static str, &'static str)> {
        match self.database {
            Some(_) => vec![("MARGA_SECRETS_KEY", crate::helpers::TEST_SECRETS_KEY)],
            None => Vec::new(),
        }
    }

    /// The store, opened from the test (as another process would).
    pub async fn store(&self) -> Arc<dyn Repos> {
        marga_store::open(self.database.as_ref().map(|db| db.url.as_str()), &self.data_dir()).await.expect("open the store")
    }
}

/// A `marga serve` child process; killed (SIGKILL) when dropped.
pub(crate) struct Gateway {
    pub child: Child,
    pub base_url: String,
    /// Its stderr.
    pub log: PathBuf,
}

impl Gateway {
    /// Starts the binary on a free port (picked by binding port 0; on a lost race for it, with
    /// another) and waits for `/health`.
    pub async fn start(config: &Path, data: &Data, master_key: &str, name: &str) -> Gateway {
        Gateway::start_with_env(config, data, master_key, name, &[("RUST_LOG", "warn")]).await
    }

    /// [`Gateway::start`] with more environment variables (`RUST_LOG`, `MARGA_LOG_FORMAT`, …).
    pub async fn start_with_env(config: &Path, data: &Data, master_key: &str, name: &str, env: &[(&str, &str)]) -> Gateway {
        let client = reqwest::Client::new();
        for attempt in 0..5 {
            let port = free_port();
            let log = data.dir.path().join(format!("{name}-{attempt}.log"));
            let stderr = std::fs::File::create(&log).expect("log file");
            let child = Command::new(env!("CARGO_BIN_EXE_marga"))
                .arg("serve")
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .arg("--config")
                .arg(config)
                .args(data.args())
                .env("MARGA_MASTER_KEY", master_key)
                .env_remove("MARGA_LOG_FORMAT")
                .env_remove("MARGA_OTLP_ENDPOINT")
                .env("RUST_LOG", "warn")
                .envs(env.iter().copied())
                .env_remove("MARGA_DATABASE_URL")
                .env_remove("MARGA_LISTEN")
                .env_remove("MARGA_DATA_DIR")
                .env_remove("MARGA_CONFIG")
                .env_remove("MARGA_SECRETS_KEY")
                .envs(data.secrets_env())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .expect("start marga");
            let mut gateway = Gateway { child, base_url: format!("http://127.0.0.1:{port}"), log };
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if gateway.child.try_wait().expect("child status").is_some() {
                    break; // exited: most likely the port was taken meanwhile; try another
                }
                let health = client.get(format!("{}/health", gateway.base_url)).send().await;
                if health.is_ok_and(|r| r.status() == 200) {
                    return gateway;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            eprintln!("marga did not come up (attempt {attempt}): {}", gateway.log_tail());
        }
        panic!("could not start marga");
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(4000);
        text.get(start..).unwrap_or_default().to_owned()
    }

    /// SIGKILL, and reaps the process.
    pub fn kill_9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free a moment ago (bound to port 0, read, released).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("addr").port()
}

fn config_toml(slow: &MockUpstream, stuck: &MockUpstream) -> String {
    let route = |provider: &str| {
        format!(r#"{{ provider = "{provider}", model = "gpt-{provider}", input_per_mtok = "0.10", output_per_mtok = "0.40", currency = "USD" }}"#)
    };
    format!(
        r#"
[server]
log_flush_ms = {LOG_FLUSH_MS}

[billing]
lease_ttl_s = {ttl}

[providers.slow]
kind = "openai"
base_url = "{base}"
api_key = "sk-slow"
region = "US"

[providers.stuck]
kind = "openai"
base_url = "{stuck_base}"
api_key = "sk-stuck"
region = "US"

[models."test/slow"]
routes = [{slow_route}]

[models."test/stuck"]
routes = [{stuck_route}]
"#,
        ttl = LEASE_TTL.as_secs(),
        base = slow.openai_base(),
        stuck_base = stuck.openai_base(),
        slow_route = route("slow"),
        stuck_route = route("stuck"),
    )
}

/// What one request came to.
struct Sent {
    streamed: bool,
    /// Received in full: a 200 with its whole JSON body, or a stream through `[DONE]`.
    completed: Option<Completed>,
    /// A status other than 200, if one was received, with its body.
    other_status: Option<(u16, String)>,
}

struct Completed {
    at: Instant,
    generation: String,
    cost: Decimal,
}

fn cost_of(usage: &Value) -> Decimal {
    usage["cost"].to_string().parse().unwrap_or_else(|_| panic!("no exact usage.cost: {usage}"))
}

async fn send(client: reqwest::Client, url: String, key: String, body: Value, done: Arc<AtomicUsize>) -> Sent {
    let sent = send_one(client, url, key, body).await;
    if sent.completed.is_some() {
        done.fetch_add(1, Ordering::SeqCst);
    }
    sent
}

async fn send_one(client: reqwest::Client, url: String, key: String, body: Value) -> Sent {
    let streamed = body["stream"] == true;
    let mut sent = Sent { streamed, completed: None, other_status: None };
    let Ok(response) = client.post(url).bearer_auth(key).json(&body).send().await else { return sent };
    if response.status() != 200 {
        let status = response.status().as_u16();
        sent.other_status = Some((status, response.text().await.unwrap_or_default()));
        return sent;
    }
    let header_id = response.headers().get("x-generation-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    if !streamed {
        let Ok(bytes) = response.bytes().await else { return sent };
        let at = Instant::now();
        let Ok(json) = serde_json::from_slice::<Value>(&bytes) else { return sent };
        let generation = json["id"].as_str().expect("id").to_owned();
        assert_eq!(header_id.as_deref(), Some(generation.as_str()));
        sent.completed = Some(Completed { at, generation, cost: cost_of(&json["usage"]) });
        return sent;
    }
    let mut text = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => text.extend_from_slice(&bytes),
            Err(_) => return sent,
        }
    }
    let at = Instant::now();
    let events = sse_data(&String::from_utf8_lossy(&text));
    if events.last().map(String::as_str) != Some("[DONE]") {
        return sent;
    }
    let usage_chunk: Value = serde_json::from_str(&events[events.len() - 2]).expect("usage chunk");
    let generation = usage_chunk["id"].as_str().expect("chunk id").to_owned();
    assert_eq!(header_id.as_deref(), Some(generation.as_str()));
    sent.completed = Some(Completed { at, generation, cost: cost_of(&usage_chunk["usage"]) });
    sent
}

fn nanos(amount: i64) -> Decimal {
    Decimal::from(amount) / Decimal::from(1_000_000_000)
}

async fn kill_9_mid_traffic(database: Option<TestDatabase>) {
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let slow = MockUpstream::start_with(local, Scenario { delay_ms: 150, chunk_delay_ms: 10, ..Scenario::default() })
        .await
        .expect("start the slow upstream");
    let stuck = MockUpstream::start_with(local, Scenario { delay_ms: 3_000, chunk_delay_ms: 500, ..Scenario::default() })
        .await
        .expect("start the stuck upstream");
    let data = Data { dir: tempfile::tempdir().expect("temp dir"), database };
    let config = data.dir.path().join("marga.toml");
    std::fs::write(&config, config_toml(&slow, &stuck)).expect("write config");
    let master_key = format!("marga_mk_test_{}", uuid::Uuid::new_v4().simple());
    let mut gateway = Gateway::start(&config, &data, &master_key, "first").await;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().expect("client");

    // An organisation (INR, so every charge goes through the FX conversion), a grant, a key.
    let created: Value = client
        .post(gateway.url("/admin/orgs"))
        .bearer_auth(&master_key)
        .json(&json!({"name": "Crash", "currency": "INR"}))
        .send()
        .await
        .expect("create org")
        .json()
        .await
        .expect("org JSON");
    let org = created["id"].as_str().expect("org id").to_owned();
    let management = created["management_key"].as_str().expect("management key").to_owned();
    let granted = client
        .post(gateway.url(&format!("/admin/orgs/{org}/credits")))
        .bearer_auth(&master_key)
        .json(&json!({"amount": GRANTED}))
        .send()
        .await
        .expect("grant");
    assert_eq!(granted.status(), 201);
    let made: Value = client
        .post(gateway.url("/v1/keys"))
        .bearer_auth(&management)
        .json(&json!({"name": "crash", "rpm_limit": 100_000}))
        .send()
        .await
        .expect("create key")
        .json()
        .await
        .expect("key JSON");
    let key = made["key"].as_str().expect("key").to_owned();

    // 100 requests, one every 4 ms, whole and streamed, from the instant sandbox, from an
    // upstream that takes 150 ms to answer (and 10 ms per stream event), and from one that
    // takes seconds.
    let started = Instant::now();
    let done = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let model = match i % 5 {
                0 | 1 => "sandbox/echo",
                2 | 3 => "test/slow",
                _ => "test/stuck",
            };
            let body = json!({
                "model": model,
                "max_tokens": 32,
                "stream": i % 2 == 1,
                "messages": [{"role": "user", "content": format!("request number {i}")}],
            });
            let (client, url, key) = (client.clone(), gateway.url("/v1/chat/completions"), key.clone());
            let done = Arc::clone(&done);
            tokio::spawn(async move {
                tokio::time::sleep_until((started + STAGGER * i as u32).into()).await;
                send(client, url, key, body, done).await
            })
        })
        .collect();
    tokio::time::sleep_until((started + KILL_AT).into()).await;
    let patience = Instant::now() + Duration::from_secs(15);
    while done.load(Ordering::SeqCst) < COMPLETED_BEFORE_KILL && Instant::now() < patience {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let killed_at = Instant::now();
    gateway.kill_9();
    let mut sent = Vec::with_capacity(REQUESTS);
    for task in tasks {
        sent.push(task.await.expect("request task"));
    }
    let first_log = gateway.log_tail();
    drop(gateway);

    let completed: Vec<&Completed> = sent.iter().filter_map(|s| s.completed.as_ref()).collect();
    let others: Vec<&(u16, String)> = sent.iter().filter_map(|s| s.other_status.as_ref()).collect();
    assert!(others.is_empty(), "statuses other than 200 before the kill: {others:?}\n{first_log}");
    let streams_done = sent.iter().filter(|s| s.streamed && s.completed.is_some()).count();
    let interrupted = REQUESTS - completed.len();
    assert!(completed.len() >= COMPLETED_BEFORE_KILL && streams_done > 0, "too little completed before the kill: {}", completed.len());
    assert!(interrupted >= REQUESTS / 5, "the kill interrupted too little: {interrupted} of {REQUESTS}");

    // The same data, a new process.
    let restarted = Gateway::start(&config, &data, &master_key, "restarted").await;
    let store = data.store().await;
    let mut entries: Vec<LedgerEntry> = store.entries(&org, None, 100_000).await.expect("ledger entries");
    entries.sort_by_key(|e| e.id);
    let charges: Vec<&LedgerEntry> = entries.iter().filter(|e| e.kind == "charge").collect();
    let mut references: Vec<&str> = charges.iter().map(|c| c.reference.as_str()).collect();
    references.sort_unstable();
    let before_dedup = references.len();
    references.dedup();
    assert_eq!(references.len(), before_dedup, "a generation was charged twice");

    for done in &completed {
        let lines: Vec<&&LedgerEntry> = charges.iter().filter(|c| c.reference == done.generation).collect();
        assert_eq!(lines.len(), 1, "acknowledged {} has {} charge lines", done.generation, lines.len());
        assert_eq!(nanos(-lines[0].amount_nanos), done.cost, "the charge of {} is what its client was told", done.generation);
    }
    let charged: Decimal = charges.iter().map(|c| nanos(-c.amount_nanos)).sum();
    let balance = nanos(store.balance(&org).await.expect("balance"));
    assert_eq!(balance, decimal(GRANTED) - charged, "balance = granted − charges");
    let credits: Value = client
        .get(restarted.url("/v1/credits"))
        .bearer_auth(&management)
        .send()
        .await
        .expect("credits")
        .json()
        .await
        .expect("credits JSON");
    assert_eq!(credits["data"]["balance"].to_string().parse::<Decimal>().ok(), Some(balance), "{credits}");

    // The request log flushes every 20 ms: a response completed RECORD_MARGIN before the kill
    // has been recorded (one completed just before the kill may not have been).
    let mut unrecorded = Vec::new();
    let old_enough: Vec<_> = completed.iter().filter(|c| killed_at.duration_since(c.at) >= RECORD_MARGIN).collect();
    assert!(!old_enough.is_empty(), "no response completed {RECORD_MARGIN:?} before the kill: the check proves nothing");
    for done in old_enough {
        if store.get_generation(&done.generation).await.expect("read record").is_none() {
            unrecorded.push(format!("{} (completed {:?} before the kill)", done.generation, killed_at.duration_since(done.at)));
        }
    }
    assert!(
        unrecorded.is_empty(),
        "completed ≥ RECORD_MARGIN before the kill but not in the request log: {unrecorded:?}\nthe killed gateway's log:\n{first_log}"
    );

    // Credit the dead instance had leased comes back once its leases expire (TTL 2 s, renewed
    // every TTL/3: at most 2 s after the kill); the restarted instance has served nothing, so
    // it holds no lease.
    let reserved_at_restart = balance - nanos(store.available(&org, marga_gateway::pipeline::unix_now_ms()).await.expect("available"));
    if killed_at.elapsed() < LEASE_TTL * 2 / 3 {
        assert!(reserved_at_restart > Decimal::ZERO, "the killed instance held no lease: the test proves nothing");
    }
    tokio::time::sleep_until((killed_at + LEASE_TTL + Duration::from_millis(500)).into()).await;
    let available = nanos(store.available(&org, marga_gateway::pipeline::unix_now_ms()).await.expect("available"));
    assert_eq!(available, balance, "credit still reserved {:?} after the kill", killed_at.elapsed());
    drop(restarted);
}
