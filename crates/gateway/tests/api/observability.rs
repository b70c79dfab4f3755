//! Operations end to end: `/metrics` read by a real Prometheus text-format parser and counting
//! each request of a model exactly; the request log on the real binary surviving `kill -9`
//! once the (default) flush interval has passed, and SIGTERM at once; JSON logs with one
//! access line per request and no secret in any line; OTLP traces received by a collector
//! started by the test; a Postgres outage (through a relay the test cuts) that delays no answer
//! and loses no record or charge.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mock_upstream::{MockUpstream, Scenario};
use prometheus_parse::{Sample, Scrape, Value as PromValue};
use serde_json::{json, Value};

use crate::accounts::{grant, new_key, new_org};
use crate::crash::{Data, Gateway};
use crate::helpers::{note_skipped, postgres_enabled, provider, route, spawn_app_with, sse_data, Options, TestDatabase};

// ---------------------------------------------------------------------------------------------
// /metrics

async fn scrape(base_url: &str) -> Vec<Sample> {
    let text = reqwest::get(format!("{base_url}/metrics")).await.unwrap().text().await.unwrap();
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap_or_else(|e| panic!("unparsable: {e}\n{text}"));
    scrape.samples
}

fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    samples.iter().find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
}

/// A counter's or gauge's value.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    find(samples, name, labels).map(|s| match &s.value {
        PromValue::Counter(v) | PromValue::Gauge(v) | PromValue::Untyped(v) => *v,
        other => panic!("{name} is not a counter or gauge: {other:?}"),
    })
}

/// How many observations a histogram holds (its `+Inf` bucket).
fn observations(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    find(samples, name, labels).map(|s| match &s.value {
        PromValue::Histogram(buckets) => buckets.iter().find(|b| b.less_than.is_infinite()).map_or(0.0, |b| b.count),
        other => panic!("{name} is not a histogram: {other:?}"),
    })
}

/// What a request came to: its generation id, status, and (when served) usage.
struct Sent {
    id: Option<String>,
    status: u16,
    usage: Option<Value>,
}

async fn send(client: &reqwest::Client, base_url: &str, key: &str, body: &Value) -> Sent {
    let response = client.post(format!("{base_url}/v1/chat/completions")).bearer_auth(key).json(body).send().await.unwrap();
    let status = response.status().as_u16();
    let id = response.headers().get("x-generation-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let text = response.text().await.unwrap();
    let usage = if status != 200 {
        None
    } else if body["stream"] == true {
        let events = sse_data(&text);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
        let chunk: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        Some(chunk["usage"].clone())
    } else {
        Some(serde_json::from_str::<Value>(&text).unwrap()["usage"].clone())
    };
    Sent { id, status, usage }
}

fn chat(model: &str, stream: bool, text: &str) -> Value {
    json!({"model": model, "stream": stream, "max_tokens": 16, "messages": [{"role": "user", "content": text}]})
}

fn nanos(cost: &Value) -> f64 {
    let nanos = marga_gateway::money::parse_nanos(&cost.to_string()).unwrap_or_else(|| panic!("not a cost: {cost}"));
    nanos as f64
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_count_each_request_of_a_model_exactly() {
    // A model of this test's own, so that other tests (same process, same recorder) do not move its series.
    let options = Options {
        providers: vec![provider("metrics-up", "US")],
        extra_toml: format!("[models.\"test/metrics\"]\nroutes = [{}]\n", route("metrics-up", "gpt-metrics", "1", "2", "USD")),
        ..Options::default()
    };
    let app = spawn_app_with(options).await;
    let (org, management) = new_org(&app, "USD").await;
    grant(&app, &org, "10").await;
    let (key, _) = new_key(&app, &management, json!({"name": "metrics"})).await;
    let series = [("model", "test/metrics"), ("provider", "metrics-up"), ("route", "metrics-up/gpt-metrics")];
    let with = |extra: &[(&'static str, &'static str)]| -> Vec<(&'static str, &'static str)> {
        series.iter().chain(extra).copied().collect()
    };

    let before = scrape(&app.base_url).await;
    assert_eq!(value(&before, "marga_requests_total", &with(&[("status", "success")])), Some(0.0), "registered at start, at zero");
    assert_eq!(value(&before, "marga_breaker_state", &[("model", "test/metrics"), ("route", "metrics-up/gpt-metrics")]), Some(0.0));

    // Two whole answers and one stream, paid by an organisation's key.
    let (mut prompt, mut completion, mut cost) = (0.0, 0.0, 0.0);
    for (i, stream) in [false, false, true].into_iter().enumerate() {
        let sent = send(&app.client, &app.base_url, &key, &chat("test/metrics", stream, &format!("count me {i}"))).await;
        assert_eq!(sent.status, 200);
        let usage = sent.usage.unwrap();
        prompt += usage["prompt_tokens"].as_f64().unwrap();
        completion += usage["completion_tokens"].as_f64().unwrap();
        cost += nanos(&usage["cost"]);
    }
    // One refused by the upstream (400: no failover), recorded as an error of the model.
    app.upstream("metrics-up").set_scenario(Scenario { fail_first: 1, fail_status: 400, ..Scenario::default() });
    assert_eq!(send(&app.client, &app.base_url, &key, &chat("test/metrics", false, "refused")).await.status, 400);
    assert_eq!(app.wait_for_records(4).await, 4, "every request is in the request log");

    let after = scrape(&app.base_url).await;
    assert_eq!(value(&after, "marga_requests_total", &with(&[("status", "success")])), Some(3.0));
    let failed: f64 = after
        .iter()
        .filter(|s| s.metric == "marga_requests_total" && s.labels.get("model") == Some("test/metrics") && s.labels.get("status") == Some("error"))
        .map(|s| if let PromValue::Counter(v) = s.value { v } else { 0.0 })
        .sum();
    assert_eq!(failed, 1.0, "the refused request counts as an error");
    assert_eq!(value(&after, "marga_tokens_total", &with(&[("direction", "prompt")])), Some(prompt));
    assert_eq!(value(&after, "marga_tokens_total", &with(&[("direction", "completion")])), Some(completion));
    assert!(cost > 0.0, "an organisation's key pays");
    assert_eq!(value(&after, "marga_cost_nanos_total", &with(&[("currency", "USD")])), Some(cost));
    assert_eq!(observations(&after, "marga_request_duration_seconds", &series), Some(3.0));
    assert_eq!(observations(&after, "marga_time_to_first_token_seconds", &series), Some(1.0), "the stream's first token");
    assert!(value(&after, "marga_upstream_attempts_total", &[("provider", "metrics-up"), ("outcome", "success")]).unwrap() >= 3.0);
    for gauge in ["marga_request_log_queue", "marga_request_log_queue_capacity", "marga_ledger_queue", "marga_request_log_spill_bytes"] {
        assert!(value(&after, gauge, &[]).is_some(), "no {gauge}");
    }
    assert!(value(&after, "marga_request_log_written_total", &[]).unwrap() >= 1.0);
    // No label carries what a client typed (the prompts above are not label values).
    assert!(after.iter().all(|s| s.labels.values().all(|v| !v.contains("count me"))));
}

// ---------------------------------------------------------------------------------------------
// The real binary

/// A gateway's config and data, an upstream, and the master key.
struct Setup {
    data: Data,
    config: PathBuf,
    master_key: String,
    upstream_key: String,
    upstream: MockUpstream,
}

async fn setup(database: Option<TestDatabase>, more_toml: &str) -> Setup {
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let upstream = MockUpstream::start_with(local, Scenario { chunk_delay_ms: 2, ..Scenario::default() }).await.unwrap();
    let data = Data { dir: tempfile::tempdir().unwrap(), database };
    let upstream_key = format!("sk-upstream-secret-{}", uuid::Uuid::new_v4().simple());
    let toml = format!(
        "{more_toml}\n[providers.up]\nkind = \"openai\"\nbase_url = \"{}\"\napi_key = \"{upstream_key}\"\nregion = \"US\"\n\n[models.\"test/obs\"]\nroutes = [{}]\n",
        upstream.openai_base(),
        route("up", "gpt-obs", "0.5", "1.5", "USD"),
    );
    let config = data.dir.path().join("marga.toml");
    std::fs::write(&config, toml).unwrap();
    let master_key = format!("marga_mk_test_{}", uuid::Uuid::new_v4().simple());
    Setup { data, config, master_key, upstream_key, upstream }
}

/// An organisation with credit, its management key, and an inference key (with its id).
struct Tenant {
    org: String,
    management: String,
    key: String,
    key_id: String,
}

async fn tenant(gateway: &Gateway, master_key: &str) -> Tenant {
    let client = reqwest::Client::new();
    let post = |path: &str, key: &str, body: Value| client.post(gateway.url(path)).bearer_auth(key.to_owned()).json(&body).send();
    let created: Value = post("/admin/orgs", master_key, json!({"name": "Obs", "currency": "USD"})).await.unwrap().json().await.unwrap();
    let org = created["id"].as_str().unwrap().to_owned();
    let management = created["management_key"].as_str().unwrap().to_owned();
    let granted = post(&format!("/admin/orgs/{org}/credits"), master_key, json!({"amount": "100"})).await.unwrap();
    assert_eq!(granted.status(), 201);
    let made: Value = post("/v1/keys", &management, json!({"name": "obs", "rpm_limit": 100_000})).await.unwrap().json().await.unwrap();
    let key = made["key"].as_str().unwrap().to_owned();
    let key_id = made["data"]["hash"].as_str().unwrap().to_owned();
    Tenant { org, management, key, key_id }
}

/// `n` requests at once, whole and streamed; all must be answered; returns their ids.
async fn traffic(gateway: &Gateway, key: &str, n: usize) -> Vec<String> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
    let sends = (0..n).map(|i| {
        let (client, base, key) = (client.clone(), gateway.base_url.clone(), key.to_owned());
        tokio::spawn(async move { send(&client, &base, &key, &chat("test/obs", i % 2 == 1, &format!("durable {i}"))).await })
    });
    let mut ids = Vec::with_capacity(n);
    for task in sends.collect::<Vec<_>>() {
        let sent = task.await.unwrap();
        assert_eq!(sent.status, 200, "{}", gateway.log_tail());
        ids.push(sent.id.expect("x-generation-id"));
    }
    ids
}

async fn assert_all_recorded(data: &Data, ids: &[String]) {
    let store = data.store().await;
    let mut missing = Vec::new();
    for id in ids {
        if store.get_generation(id).await.unwrap().is_none() {
            missing.push(id.clone());
        }
    }
    assert!(missing.is_empty(), "{} of {} acknowledged requests have no record: {missing:?}", missing.len(), ids.len());
    assert_eq!(store.count_generations().await.unwrap(), ids.len() as u64);
}

/// SIGTERM, then waits (bounded) for the process to exit; returns whether it exited with 0.
fn terminate(gateway: &mut Gateway) -> bool {
    let pid = gateway.child.id().to_string();
    let sent = std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some(status) = gateway.child.try_wait().unwrap() {
            return status.success();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("marga did not exit within 20 s of SIGTERM: {}", gateway.log_tail());
}

async fn kill_9_after_the_flush_interval(database: Option<TestDatabase>) {
    // The default flush interval (no `[log]` section): 200 ms.
    let setup = setup(database, "").await;
    let mut gateway = Gateway::start(&setup.config, &setup.data, &setup.master_key, "first").await;
    let tenant = tenant(&gateway, &setup.master_key).await;
    let ids = traffic(&gateway, &tenant.key, 40).await;
    // Past the flush interval (200 ms) with room for the write on a loaded machine.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    gateway.kill_9();
    drop(gateway);
    let _restarted = Gateway::start(&setup.config, &setup.data, &setup.master_key, "restarted").await;
    assert_all_recorded(&setup.data, &ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_the_flush_interval_loses_no_record_on_sqlite() {
    kill_9_after_the_flush_interval(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_the_flush_interval_loses_no_record_on_postgres() {
    if !postgres_enabled() {
        note_skipped("observability::kill_9_after_the_flush_interval_loses_no_record_on_postgres");
        return;
    }
    kill_9_after_the_flush_interval(Some(TestDatabase::create().await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_right_after_requests_flushes_every_record() {
    // A flush interval of a minute: only the shutdown can have written the records.
    let database = if postgres_enabled() { Some(TestDatabase::create().await) } else { None };
    let setup = setup(database, "[log]\nflush_interval_ms = 60000\n").await;
    let mut gateway = Gateway::start(&setup.config, &setup.data, &setup.master_key, "first").await;
    let tenant = tenant(&gateway, &setup.master_key).await;
    let ids = traffic(&gateway, &tenant.key, 40).await;
    assert!(terminate(&mut gateway), "SIGTERM is a clean exit: {}", gateway.log_tail());
    assert_all_recorded(&setup.data, &ids).await;
    let _restarted = Gateway::start(&setup.config, &setup.data, &setup.master_key, "restarted").await;
    assert_all_recorded(&setup.data, &ids).await;
}

/// Where transparent huge pages are on for all memory, half the binary's idle memory would be
/// 2 MiB pages holding a few live blocks each: it opts out at start.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_runs_without_transparent_huge_pages() {
    let setup = setup(None, "").await;
    let gateway = Gateway::start(&setup.config, &setup.data, &setup.master_key, "thp").await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", gateway.child.id())).unwrap();
    // Kernels before 5.0 do not say: the test is then reported as skipped, not passed.
    let Some(line) = status.lines().find(|l| l.starts_with("THP_enabled:")) else {
        note_skipped("observability::the_binary_runs_without_transparent_huge_pages (no THP_enabled in /proc)");
        return;
    };
    assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_have_one_access_line_per_request_and_no_secret() {
    let setup = setup(None, "[log]\nformat = \"json\"\n").await;
    let env = [("RUST_LOG", "debug")];
    let mut gateway = Gateway::start_with_env(&setup.config, &setup.data, &setup.master_key, "json", &env).await;
    let tenant = tenant(&gateway, &setup.master_key).await;
    let client = reqwest::Client::new();
    let mut sent = Vec::new();
    for (i, stream) in [false, true, false].into_iter().enumerate() {
        sent.push(send(&client, &gateway.base_url, &tenant.key, &chat("test/obs", stream, &format!("log me {i}"))).await);
    }
    // A wrong key (refused before admission: not a request of the log, and never written).
    let wrong_key = format!("marga_sk_{}", uuid::Uuid::new_v4().simple());
    assert_eq!(send(&client, &gateway.base_url, &wrong_key, &chat("test/obs", false, "x")).await.status, 401);
    assert!(terminate(&mut gateway));

    let text = std::fs::read_to_string(&gateway.log).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}")))
        .collect();
    for secret in [&setup.master_key, &tenant.management, &tenant.key, &wrong_key, &setup.upstream_key] {
        assert!(!text.contains(secret.as_str()), "a secret is in the log: {secret}");
    }
    let access: HashMap<String, &Value> = lines
        .iter()
        .filter(|l| l["target"] == "marga::access")
        .map(|l| (l["id"].as_str().unwrap_or_default().to_owned(), l))
        .collect();
    assert_eq!(access.len(), sent.len(), "one access line per request: {text}");
    for request in &sent {
        let line = access[request.id.as_ref().unwrap()];
        assert_eq!(line["org"], tenant.org.as_str());
        assert_eq!(line["key_id"], tenant.key_id.as_str());
        assert_eq!((line["model"].as_str(), line["provider"].as_str()), (Some("test/obs"), Some("up")));
        assert_eq!((line["status"].as_str(), line["http_status"].as_u64()), (Some("success"), Some(200)));
        assert!(line["latency_ms"].is_u64() && line["level"] == "INFO", "{line}");
    }
}

// ---------------------------------------------------------------------------------------------
// OpenTelemetry

type Spans = Arc<Mutex<Vec<opentelemetry_proto::tonic::trace::v1::Span>>>;

/// A minimal OTLP/HTTP collector on port 0: decodes each protobuf `POST /v1/traces`.
async fn collector() -> (String, Spans) {
    use axum::body::Bytes;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;

    let spans: Spans = Arc::default();
    let received = Arc::clone(&spans);
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let received = Arc::clone(&received);
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf request");
                let mut spans = received.lock().unwrap();
                for resource in request.resource_spans {
                    for scope in resource.scope_spans {
                        spans.extend(scope.spans);
                    }
                }
                ([("content-type", "application/x-protobuf")], Vec::<u8>::new())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, spans)
}

fn attribute(span: &opentelemetry_proto::tonic::trace::v1::Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
    let value = span.attributes.iter().find(|a| a.key == key)?.value.as_ref()?.value.as_ref()?;
    Some(match value {
        Any::StringValue(s) => s.clone(),
        Any::IntValue(i) => i.to_string(),
        Any::BoolValue(b) => b.to_string(),
        Any::DoubleValue(d) => d.to_string(),
        Any::ArrayValue(a) => format!("{:?}", a.values.iter().filter_map(|v| v.value.as_ref()).collect::<Vec<_>>()),
        other => format!("{other:?}"),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_export_sends_one_gen_ai_span_per_request() {
    let (endpoint, spans) = collector().await;
    let setup = setup(None, "").await;
    let env = [("MARGA_OTLP_ENDPOINT", endpoint.as_str())];
    let mut gateway = Gateway::start_with_env(&setup.config, &setup.data, &setup.master_key, "otlp", &env).await;
    let tenant = tenant(&gateway, &setup.master_key).await;
    let client = reqwest::Client::new();
    let ok = send(&client, &gateway.base_url, &tenant.key, &chat("test/obs", false, "trace me")).await;
    let usage = ok.usage.clone().unwrap();
    let upstream_traceparent = || setup.upstream.last_request().unwrap().header("traceparent").map(str::to_owned);
    let ok_upstream = upstream_traceparent();
    let streamed = send(&client, &gateway.base_url, &tenant.key, &chat("test/obs", true, "trace me too")).await;
    // A caller that traces: its span becomes the parent.
    let (trace_id, parent_id) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let child = client
        .post(gateway.url("/v1/chat/completions"))
        .bearer_auth(&tenant.key)
        .header("traceparent", format!("00-{trace_id}-{parent_id}-01"))
        .json(&chat("test/obs", false, "a child span"))
        .send()
        .await
        .unwrap();
    assert_eq!(child.status(), 200);
    let child_upstream = upstream_traceparent();
    let child_id = child.headers().get("x-generation-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    // Exported about every second; the shutdown sends what is left.
    let deadline = Instant::now() + Duration::from_secs(5);
    while spans.lock().unwrap().len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(terminate(&mut gateway));
    let spans = spans.lock().unwrap().clone();
    assert_eq!(spans.len(), 3, "one span per request: {spans:?}");
    let by_id = |id: &Option<String>| {
        spans.iter().find(|s| attribute(s, "gen_ai.response.id") == *id).unwrap_or_else(|| panic!("no span for {id:?}: {spans:?}"))
    };
    let span = by_id(&ok.id);
    assert_eq!(span.name, "chat test/obs");
    assert_eq!(span.kind, opentelemetry_proto::tonic::trace::v1::span::SpanKind::Client as i32);
    assert!(span.end_time_unix_nano > span.start_time_unix_nano);
    for (key, expected) in [
        ("gen_ai.operation.name", "chat".to_owned()),
        ("gen_ai.provider.name", "openai".to_owned()),
        ("gen_ai.request.model", "test/obs".to_owned()),
        ("gen_ai.response.model", "gpt-obs".to_owned()),
        ("gen_ai.usage.input_tokens", usage["prompt_tokens"].to_string()),
        ("gen_ai.usage.output_tokens", usage["completion_tokens"].to_string()),
        ("marga.org.id", tenant.org.clone()),
        ("marga.key.id", tenant.key_id.clone()),
        ("marga.streamed", "false".to_owned()),
    ] {
        assert_eq!(attribute(span, key).as_deref(), Some(expected.as_str()), "{key} of {span:?}");
    }
    assert_eq!(attribute(span, "error.type"), None);
    assert_eq!(attribute(by_id(&streamed.id), "marga.streamed").as_deref(), Some("true"));
    assert!(attribute(by_id(&streamed.id), "marga.ttft_ms").is_some());
    assert!(span.parent_span_id.is_empty(), "without traceparent, a root span");
    let child = by_id(&child_id);
    assert_eq!((hex::encode(&child.trace_id), hex::encode(&child.parent_span_id)), (trace_id.to_owned(), parent_id.to_owned()));
    // The upstream calls carry each request's own span as their parent (W3C trace context),
    // so that a traced upstream joins the trace.
    let as_parent = |s: &opentelemetry_proto::tonic::trace::v1::Span| {
        Some(format!("00-{}-{}-01", hex::encode(&s.trace_id), hex::encode(&s.span_id)))
    };
    assert_eq!(ok_upstream, as_parent(span), "a root span's id reaches the upstream");
    assert_eq!(child_upstream, as_parent(child), "in the caller's trace, with Marga's span as the parent");
}

// ---------------------------------------------------------------------------------------------
// The database unavailable

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_database_never_delays_an_answer_and_its_records_arrive_through_the_spill_file() {
    use sqlx::Connection;

    let app = crate::helpers::spawn_app().await;
    if app.database.is_some() {
        note_skipped("observability::a_locked_database_…: it locks the SQLite file (runs in the SQLite pass)");
        return;
    }
    let data = app.data_dir.path().join("data");
    assert_eq!(app.post_chat(&crate::helpers::user_chat("sandbox/echo", "before")).await.status, 200);
    assert_eq!(app.wait_for_records(1).await, 1);

    // Another process's write transaction: every write of the gateway now waits on SQLite's
    // busy timeout (5 s) and fails.
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(data.join("marga.db"));
    let mut lock = sqlx::SqliteConnection::connect_with(&options).await.unwrap();
    sqlx::query("BEGIN EXCLUSIVE").execute(&mut lock).await.unwrap();
    let mut ids = Vec::new();
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let started = Instant::now();
        let reply = app.post_chat(&crate::helpers::user_chat("sandbox/echo", &format!("while locked {i}"))).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert!(started.elapsed() < Duration::from_secs(2), "an answer waited {:?} on the database", started.elapsed());
        slowest = slowest.max(started.elapsed());
        ids.push(reply.header("x-generation-id").unwrap().to_owned());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("slowest answer while the database was locked: {slowest:?}");
    let spill = data.join("requests.spill");
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::fs::metadata(&spill).map_or(0, |m| m.len()) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(std::fs::metadata(&spill).unwrap().len() > 0, "the records went to the spill file");

    sqlx::query("ROLLBACK").execute(&mut lock).await.unwrap();
    drop(lock);
    let unlocked = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.store.count_generations().await.unwrap() < 21 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in &ids {
        assert!(app.store.get_generation(id).await.unwrap().is_some(), "{id} never reached the database");
    }
    assert_eq!(app.store.count_generations().await.unwrap(), 21);
    eprintln!("every record in the database {:?} after the lock was released", unlocked.elapsed());
}

/// A TCP relay between the gateway and Postgres that the test can cut: while it is down,
/// live connections are dropped and new ones are closed at once (as when the database host
/// goes away).
struct Relay {
    port: u16,
    down: Arc<std::sync::atomic::AtomicBool>,
    live: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Relay {
    async fn start(target: std::net::SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let live: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (is_down, tasks) = (down.clone(), live.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if is_down.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                tasks.lock().unwrap().push(task.abort_handle());
            }
        });
        Relay { port, down, live }
    }

    fn cut(&self) {
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
        for task in self.live.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    fn restore(&self) {
        self.down.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Postgres goes away under a running gateway: answers keep coming without waiting on it (the
/// request log spills to its file, charges wait in the journal), and once the database is back
/// every record and every charge reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_never_delays_an_answer_and_loses_no_record_or_charge() {
    if !postgres_enabled() {
        note_skipped("observability::a_postgres_outage_…: it needs Postgres");
        return;
    }
    let mut database = TestDatabase::create().await;
    let direct_url = database.url.clone();
    let relay = Relay::start("127.0.0.1:5432".parse().unwrap()).await;
    database.url = direct_url.replacen("127.0.0.1:5432", &format!("127.0.0.1:{}", relay.port), 1);
    assert_ne!(database.url, direct_url, "the database URL goes through the relay");
    // No per-minute key limit: a new minute's rate-limit allowance is claimed from the
    // database and fails closed (503) while it is down, which is a different promise
    // (`limits/shared.rs`); with the default limit this test failed whenever a minute began
    // during the outage.
    let options = Options { extra_toml: "[limits]\ndefault_key_rpm = 0\n".into(), ..Options::default() };
    let app = crate::helpers::spawn_app_on(options, Some(Arc::new(database))).await;
    let (org, management) = new_org(&app, "USD").await;
    grant(&app, &org, "5").await;
    let (key, _) = new_key(&app, &management, json!({"name": "outage"})).await;
    let send = |i: usize| {
        let (app, key) = (&app, key.clone());
        async move {
            let body = crate::helpers::user_chat("sandbox/echo", &format!("during the outage {i}"));
            let started = Instant::now();
            let reply = app.client.post(app.url("/v1/chat/completions")).bearer_auth(key).json(&body).send().await.unwrap();
            let status = reply.status().as_u16();
            let id = reply.headers().get("x-generation-id").map(|v| v.to_str().unwrap().to_owned());
            (status, id, started.elapsed())
        }
    };
    assert_eq!(send(0).await.0, 200, "before the outage (opens the credit lease)");

    relay.cut();
    let mut ids = Vec::new();
    let mut slowest = Duration::ZERO;
    for i in 1..=20 {
        let (status, id, took) = send(i).await;
        assert_eq!(status, 200, "request {i} during the outage");
        slowest = slowest.max(took);
        ids.push(id.expect("x-generation-id"));
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(slowest < Duration::from_secs(1), "an answer waited {slowest:?} on the database");
    let spill = app.data_dir.path().join("data").join("requests.spill");
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::fs::metadata(&spill).map_or(0, |m| m.len()) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(std::fs::metadata(&spill).map_or(0, |m| m.len()) > 0, "the records went to the spill file");

    relay.restore();
    let pool = sqlx::PgPool::connect(&direct_url).await.unwrap();
    let count = |sql: &'static str| {
        let (pool, ids) = (&pool, &ids);
        async move { sqlx::query_scalar::<_, i64>(sql).bind(ids).fetch_one(pool).await.unwrap() }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut records, mut charges) = (0, 0);
    while Instant::now() < deadline {
        records = count("SELECT COUNT(*) FROM generations WHERE id = ANY($1)").await;
        charges = count("SELECT COUNT(*) FROM ledger_entries WHERE kind = 'charge' AND reference = ANY($1)").await;
        if records == 20 && charges == 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!((records, charges), (20, 20), "every record and every charge of the outage reached Postgres");
    eprintln!("slowest answer during the Postgres outage: {slowest:?}");
}
