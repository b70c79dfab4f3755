//! The usage-query benchmark: writes generated generation records through the real write
//! path (`insert_generations`, rollups included, batches of 1,000 as the request log writes
//! them), then times every usage query, and the raw-table aggregate the rollup replaces.
//!
//! ```sh
//! cargo run --release -p marga-store --example activity_bench            # SQLite, 1,000,000 rows
//! cargo run --release -p marga-store --example activity_bench -- 200000  # fewer rows
//! MARGA_BENCH_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/bench \
//!   cargo run --release -p marga-store --example activity_bench          # Postgres (database must exist, empty)
//! ```
//!
//! Traffic: 30 days, written in time order (as the request log writes it), 10 organisations
//! (the first makes half the requests), 20 keys each, 12 models with 3 providers each, every
//! combination in use every day; 5 % errors, 10 % streamed, 2 % failed over, 1 % BYOK.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use marga_store::{GenerationRecord, Repos, UsageGroup, UsageQuery};

const DAY: i64 = 86_400_000;
const BATCH: usize = 1_000;

/// A small deterministic generator (xorshift), so runs are comparable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn record(i: u64, rows: u64, now: i64, rng: &mut Rng) -> GenerationRecord {
    let org = if rng.below(2) == 0 { 0 } else { rng.below(10) };
    let model = rng.below(12);
    let provider = rng.below(3);
    let t = now - 30 * DAY + i64::try_from(u128::from(i) * 30 * DAY as u128 / u128::from(rows)).unwrap();
    let error = rng.below(100) < 5;
    let failed_over = rng.below(100) < 2;
    let prompt = 50 + i64::try_from(rng.below(2_000)).unwrap();
    let completion = if error { 0 } else { 10 + i64::try_from(rng.below(800)).unwrap() };
    let cost_nanos = if error { 0 } else { prompt * 150 + completion * 600 };
    let served = format!(r#"{{"provider":"p{provider}","model":"u","outcome":"{}","status":null,"latency_ms":300}}"#, if error { "http_error" } else { "success" });
    let attempts = if failed_over {
        format!(r#"[{{"provider":"p{}","model":"u","outcome":"timeout","status":null,"latency_ms":900}},{served}]"#, (provider + 1) % 3)
    } else {
        format!("[{served}]")
    };
    let latency = 200 + i64::try_from(rng.below(3_000)).unwrap();
    GenerationRecord {
        id: format!("gen-{t:013}-{i:08}"),
        created_at_ms: t,
        org_id: Some(format!("org-{org}")),
        key_id: Some(format!("key-{org}-{}", rng.below(20))),
        endpoint: "chat".into(),
        model: format!("vendor/model-{model}"),
        provider: Some(format!("p{provider}")),
        upstream_model: Some("u".into()),
        streamed: rng.below(10) == 0,
        status: if error { "error" } else { "success" }.into(),
        http_status: if error { 502 } else { 200 },
        prompt_tokens: prompt,
        completion_tokens: completion,
        cost: format!("{}", cost_nanos as f64 / 1e9),
        cost_nanos,
        currency: "INR".into(),
        latency_ms: latency,
        ttft_ms: Some(latency / 3),
        generation_time_ms: (!error).then_some(latency - latency / 4),
        attempts,
        byok: rng.below(100) == 0,
        // IST: the organisations' local day.
        local_day: (t + 330 * 60_000).div_euclid(DAY),
        ..GenerationRecord::default()
    }
}

async fn fill(store: &dyn Repos, rows: u64, now: i64) -> Duration {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let started = Instant::now();
    let mut batch = Vec::with_capacity(BATCH);
    for i in 0..rows {
        batch.push(record(i, rows, now, &mut rng));
        if batch.len() == BATCH {
            store.insert_generations(&batch).await.unwrap();
            batch.clear();
        }
    }
    store.insert_generations(&batch).await.unwrap();
    started.elapsed()
}

/// Runs `f` `runs` times and prints the median and the worst.
async fn time<T, F, Fut>(label: &str, runs: usize, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut times = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        let started = Instant::now();
        last = Some(f().await);
        times.push(started.elapsed());
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("| {label} | {:.2} | {:.2} |", ms(times[runs / 2]), ms(times[runs - 1]));
    last.unwrap()
}

async fn run_queries(store: &dyn Repos, now: i64) {
    let today = (now + 330 * 60_000).div_euclid(DAY);
    let utc_today = now.div_euclid(DAY);
    let g = |day, key, model, provider| UsageGroup { day, key, model, provider };
    let q = |from_day, group| UsageQuery { org_id: "org-0", from_day, to_day: today, model: None, key_id: None, group };
    let activity = |from_day: i64, model: Option<&'static str>, key_id: Option<&'static str>| async move {
        let mut rows = 0;
        for group in [g(true, false, false, false), g(false, false, true, false), g(false, true, false, false), g(false, false, true, true)] {
            let query = UsageQuery { model, key_id, ..q(from_day, group) };
            rows += store.usage_rows(&query).await.unwrap().len();
        }
        rows
    };
    println!("| query (biggest organisation: 500,000 records) | median ms | worst ms |\n|---|---:|---:|");
    time("`/me/activity`, 30 days (4 grouped rollup reads)", 20, || activity(today - 29, None, None)).await;
    time("`/me/activity`, 366 days", 20, || activity(today - 365, None, None)).await;
    time("`/me/activity`, 30 days, model + key filter", 20, || activity(today - 29, Some("vendor/model-3"), Some("key-0-7"))).await;
    let (usage, daily, openrouter) =
        (q(today - 29, g(true, true, false, false)), q(today - 29, g(true, false, true, false)), q(today - 30, g(true, false, true, true)));
    time("`/me/usage` (day × key, 30 days)", 20, || store.usage_rows(&usage)).await.unwrap();
    time("`/me/usage/daily` (day × model, 30 days)", 20, || store.usage_rows(&daily)).await.unwrap();
    time("`/v1/activity` (day × model × provider, 31 days)", 20, || store.usage_rows(&openrouter)).await.unwrap();
    let page = time("`/me/activity/events`, first page of 200", 20, || store.generation_events("org-0", None, 200)).await.unwrap().unwrap();
    let cursor = page.last().map(|r| r.id.clone()).unwrap();
    time("`/me/activity/events`, next page of 200 (keyset)", 20, || store.generation_events("org-0", Some(&cursor), 200)).await.unwrap().unwrap();
    time("`/v1/generation` (by id, org-scoped)", 20, || store.org_generation("org-0", &cursor)).await.unwrap().unwrap();
    println!("\n| query (every organisation: 1,000,000 records) | median ms | worst ms |\n|---|---:|---:|");
    time("`/v1/rankings` 7 days", 20, || store.model_tokens(utc_today - 6)).await.unwrap();
    time("`/v1/rankings` 30 days", 20, || store.model_tokens(utc_today - 29)).await.unwrap();
    time("`/v1/models/{id}/stats`: per-route sums, 7 days", 20, || store.route_stats("vendor/model-3", utc_today - 6)).await.unwrap();
    let since = (utc_today - 6) * DAY;
    let sample = time("`/v1/models/{id}/stats`: latency sample (≤ 100,000)", 5, || store.route_latencies("vendor/model-3", since, 100_000)).await.unwrap();
    println!("\nlatency sample size: {}", sample.len());
}

/// The aggregate `/me/activity` would need without the rollup (SQLite only).
async fn raw_aggregate(dir: &std::path::Path, now: i64) {
    use sqlx::Connection;
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", dir.join("marga.db").display())).await.unwrap();
    let since = now - 30 * DAY;
    let sql = "SELECT local_day, model, key_id, provider, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_nanos) \
               FROM generations WHERE org_id = ? AND created_at_ms >= ? GROUP BY local_day, model, key_id, provider";
    let started = Instant::now();
    type RawRow = (i64, String, String, String, i64, i64, i64, i64);
    let rows: Vec<RawRow> =
        sqlx::query_as(sql).bind("org-0").bind(since).fetch_all(&mut conn).await.unwrap();
    println!("without the rollup, one 30-day aggregate of the biggest organisation over the raw log: {:.0} ms", started.elapsed().as_secs_f64() * 1000.0);
    assert!(!rows.is_empty());
}

#[tokio::main]
async fn main() {
    let rows: u64 = std::env::args().nth(1).map_or(1_000_000, |n| n.parse().expect("a row count"));
    let now = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pg = std::env::var("MARGA_BENCH_POSTGRES_URL").ok();
    let store = marga_store::open(pg.as_deref(), dir.path()).await.unwrap();
    let backend = if pg.is_some() { "Postgres" } else { "SQLite" };
    let took = fill(store.as_ref(), rows, now).await;
    println!(
        "{backend}: wrote {rows} records in {:.1} s ({:.0} records/s, batches of {BATCH}, rollups included)\n",
        took.as_secs_f64(),
        rows as f64 / took.as_secs_f64()
    );
    run_queries(store.as_ref(), now).await;
    if pg.is_none() {
        raw_aggregate(dir.path(), now).await;
    }
}
