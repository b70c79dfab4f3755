//! Usage analytics over the request log: the [`UsageRepo`] queries behind `/v1/generation`,
//! `/me/usage`, `/me/activity`, `/v1/rankings` and `/v1/models/{id}/stats`, and the daily
//! rollups that keep them fast at millions of records.
//!
//! **Rollups.** `usage_daily` holds one row per (organisation, local day, key, model,
//! provider) with exact sums (tokens, cost in nanos, requests, errors); `route_daily` one row
//! per (model, provider, UTC day) with the attempts made on that route and how many failed.
//! Both are updated in the transaction that inserts the generations they count, from the rows
//! that insert actually added (a record written twice is counted once). The activity
//! endpoints read only the rollup, whatever the number of records.
//!
//! **Days.** A record carries `local_day`, its organisation's local day (days since
//! 1970-01-01 in the organisation's zone at the time of the request), computed by the gateway.
//! Zones are fixed offsets (see the gateway's `accounts::timezone`), so a day is exact.
//!
//! SQL here is written once with `?` placeholders; Postgres gets them renumbered (`$1`, …) by
//! [`numbered`].

use std::collections::{BTreeMap, HashSet};

use crate::{BoxFuture, GenerationRecord, StoreError};

const DAY_MS: i64 = 86_400_000;

/// One row of `usage_daily`: a day of one key on one model and provider.
#[derive(Clone, Debug, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct UsageRow {
    pub org_id: String,
    /// The organisation's local day (days since 1970-01-01).
    pub day: i64,
    /// `''` when the request had no key.
    pub key_id: String,
    pub model: String,
    /// `''` when no provider was tried.
    pub provider: String,
    pub requests: i64,
    /// Requests that ended in `error` or `error_midstream`.
    pub errors: i64,
    pub cancelled: i64,
    pub byok_requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub reasoning_tokens: i64,
    pub cached_tokens: i64,
    /// Prompt plus completion tokens of BYOK requests (left out of public rankings).
    pub byok_tokens: i64,
    /// What was charged, in nanos of the organisation's currency.
    pub cost_nanos: i64,
}

/// Which rollup rows to read: one organisation, an inclusive range of its local days, and
/// optionally one model and one key.
#[derive(Clone, Debug)]
pub struct UsageQuery<'a> {
    pub org_id: &'a str,
    pub from_day: i64,
    pub to_day: i64,
    pub model: Option<&'a str>,
    pub key_id: Option<&'a str>,
}

/// Tokens per model over a window, across every organisation (BYOK excluded).
#[derive(Clone, Debug, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct ModelTokens {
    pub model: String,
    pub requests: i64,
    pub tokens: i64,
}

/// One route of one model over a window, from the records it served and the attempts made
/// on it.
#[derive(Clone, Debug, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct RouteStats {
    pub provider: String,
    /// Requests whose record names this provider (it served, or failed last).
    pub requests: i64,
    pub successes: i64,
    pub errors: i64,
    /// Completion tokens and generation time of successes that measured one (tokens/s).
    pub completion_tokens: i64,
    pub generation_ms: i64,
    /// Every attempt on the route (served or failed over) and the failed ones.
    pub attempts: i64,
    pub attempt_failures: i64,
}

/// A page of `/me/activity/events`, newest first.
pub type EventsPage = Vec<GenerationRecord>;

/// Reads for usage analytics; every per-organisation read is scoped by `org_id`.
pub trait UsageRepo: Send + Sync {
    /// A generation of `org_id`, or `None` (also when it belongs to another organisation).
    fn org_generation<'a>(&'a self, org_id: &'a str, id: &'a str)
        -> BoxFuture<'a, Result<Option<GenerationRecord>, StoreError>>;
    /// Up to `limit` generations of `org_id`, newest first, older than generation `before`
    /// when given. `None` when `before` is not a generation of this organisation.
    fn generation_events<'a>(
        &'a self,
        org_id: &'a str,
        before: Option<&'a str>,
        limit: u32,
    ) -> BoxFuture<'a, Result<Option<EventsPage>, StoreError>>;
    /// The rollup rows matching `query`.
    fn usage_rows<'a>(&'a self, query: &'a UsageQuery<'a>) -> BoxFuture<'a, Result<Vec<UsageRow>, StoreError>>;
    /// Requests and tokens per model, every organisation, days `>= since_day`, BYOK excluded.
    fn model_tokens(&self, since_day: i64) -> BoxFuture<'_, Result<Vec<ModelTokens>, StoreError>>;
    /// Per-route statistics of `model` since `since_ms` (attempts from whole UTC days).
    fn route_stats<'a>(&'a self, model: &'a str, since_ms: i64) -> BoxFuture<'a, Result<Vec<RouteStats>, StoreError>>;
    /// `(provider, latency_ms)` of the newest `limit` successful requests of `model` since
    /// `since_ms`, for percentiles.
    fn route_latencies<'a>(
        &'a self,
        model: &'a str,
        since_ms: i64,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<(String, i64)>, StoreError>>;
}

/// A value bound to a `?` of the shared SQL.
#[derive(Clone, Debug)]
pub(crate) enum Bind {
    Text(String),
    Int(i64),
}

/// `?` → `$1`, `$2`, … (the SQL here never has a `?` inside a literal).
pub(crate) fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

pub(crate) const USAGE_COLUMNS: &str = "org_id, day, key_id, model, provider, requests, errors, cancelled, \
    byok_requests, prompt_tokens, completion_tokens, reasoning_tokens, cached_tokens, byok_tokens, cost_nanos";

/// The rollup rows of a [`UsageQuery`], and what to bind.
pub(crate) fn usage_rows_sql(query: &UsageQuery<'_>) -> (String, Vec<Bind>) {
    let mut sql = format!("SELECT {USAGE_COLUMNS} FROM usage_daily WHERE org_id = ? AND day >= ? AND day <= ?");
    let mut binds = vec![Bind::Text(query.org_id.to_owned()), Bind::Int(query.from_day), Bind::Int(query.to_day)];
    if let Some(model) = query.model {
        sql.push_str(" AND model = ?");
        binds.push(Bind::Text(model.to_owned()));
    }
    if let Some(key) = query.key_id {
        sql.push_str(" AND key_id = ?");
        binds.push(Bind::Text(key.to_owned()));
    }
    sql.push_str(" ORDER BY day, model, key_id, provider");
    (sql, binds)
}

pub(crate) const MODEL_TOKENS_SQL: &str = "SELECT model, \
    CAST(COALESCE(SUM(requests - byok_requests), 0) AS BIGINT) AS requests, \
    CAST(COALESCE(SUM(prompt_tokens + completion_tokens - byok_tokens), 0) AS BIGINT) AS tokens \
    FROM usage_daily WHERE day >= ? GROUP BY model";

/// Per provider: records (served or failed last) and successes' tokens and time.
pub(crate) const ROUTE_RECORDS_SQL: &str = "SELECT COALESCE(provider, '') AS provider, \
    CAST(COUNT(*) AS BIGINT) AS requests, \
    CAST(COALESCE(SUM(CASE WHEN status = 'success' THEN 1 ELSE 0 END), 0) AS BIGINT) AS successes, \
    CAST(COALESCE(SUM(CASE WHEN status IN ('error', 'error_midstream') THEN 1 ELSE 0 END), 0) AS BIGINT) AS errors, \
    CAST(COALESCE(SUM(CASE WHEN status = 'success' AND generation_time_ms > 0 THEN completion_tokens ELSE 0 END), 0) AS BIGINT) AS completion_tokens, \
    CAST(COALESCE(SUM(CASE WHEN status = 'success' AND generation_time_ms > 0 THEN generation_time_ms ELSE 0 END), 0) AS BIGINT) AS generation_ms, \
    CAST(0 AS BIGINT) AS attempts, CAST(0 AS BIGINT) AS attempt_failures \
    FROM generations WHERE model = ? AND created_at_ms >= ? GROUP BY COALESCE(provider, '')";

pub(crate) const ROUTE_ATTEMPTS_SQL: &str = "SELECT provider, \
    CAST(COALESCE(SUM(attempts), 0) AS BIGINT), CAST(COALESCE(SUM(failures), 0) AS BIGINT) \
    FROM route_daily WHERE model = ? AND day >= ? GROUP BY provider";

pub(crate) const ROUTE_LATENCIES_SQL: &str = "SELECT COALESCE(provider, ''), latency_ms FROM generations \
    WHERE model = ? AND created_at_ms >= ? AND status = 'success' ORDER BY created_at_ms DESC LIMIT ?";

/// The cursor of an events page: the `before` generation's time, if it is the org's.
pub(crate) const EVENT_CURSOR_SQL: &str = "SELECT created_at_ms FROM generations WHERE org_id = ? AND id = ?";

/// Events older than `(created_at_ms, id)`: binds org, t, t, id, limit. The range on
/// `created_at_ms` walks the `(org_id, created_at_ms, id)` index backwards.
pub(crate) fn events_sql(columns: &str, after_cursor: bool) -> String {
    let cursor = if after_cursor { " AND created_at_ms <= ? AND (created_at_ms < ? OR id < ?)" } else { "" };
    format!("SELECT {columns} FROM generations WHERE org_id = ?{cursor} ORDER BY created_at_ms DESC, id DESC LIMIT ?")
}

/// Merges the attempts rollup into per-provider record statistics.
pub(crate) fn merge_attempts(mut stats: Vec<RouteStats>, attempts: Vec<(String, i64, i64)>) -> Vec<RouteStats> {
    for (provider, total, failed) in attempts {
        match stats.iter_mut().find(|s| s.provider == provider) {
            Some(s) => {
                s.attempts = total;
                s.attempt_failures = failed;
            }
            None => stats.push(RouteStats { provider, attempts: total, attempt_failures: failed, ..RouteStats::default() }),
        }
    }
    stats.retain(|s| !s.provider.is_empty());
    stats.sort_by(|a, b| a.provider.cmp(&b.provider));
    stats
}

/// What one batch adds to the rollups.
#[derive(Default)]
pub(crate) struct RollupDeltas {
    pub usage: Vec<UsageRow>,
    /// `(model, provider, utc_day, attempts, failures)`.
    pub routes: Vec<(String, String, i64, i64, i64)>,
}

#[derive(serde::Deserialize)]
struct AttemptOutcome {
    provider: String,
    outcome: String,
}

/// Sums the records that `inserted` names (those the insert added) into rollup deltas, one
/// per key, sorted (so that concurrent writers lock rows in one order).
pub(crate) fn rollup_deltas(records: &[GenerationRecord], inserted: &HashSet<String>) -> RollupDeltas {
    type UsageKey = (String, i64, String, String, String);
    let mut usage: BTreeMap<UsageKey, UsageRow> = BTreeMap::new();
    let mut routes: BTreeMap<(String, String, i64), (i64, i64)> = BTreeMap::new();
    for r in records.iter().filter(|r| inserted.contains(&r.id)) {
        let key = (
            r.org_id.clone().unwrap_or_default(),
            r.local_day,
            r.key_id.clone().unwrap_or_default(),
            r.model.clone(),
            r.provider.clone().unwrap_or_default(),
        );
        let row = usage.entry(key).or_default();
        add_record(row, r);
        let attempts: Vec<AttemptOutcome> = serde_json::from_str(&r.attempts).unwrap_or_default();
        for a in attempts {
            let entry = routes.entry((r.model.clone(), a.provider, r.created_at_ms.div_euclid(DAY_MS))).or_default();
            entry.0 += 1;
            entry.1 += i64::from(a.outcome != "success");
        }
    }
    RollupDeltas {
        usage: usage
            .into_iter()
            .map(|((org_id, day, key_id, model, provider), row)| UsageRow { org_id, day, key_id, model, provider, ..row })
            .collect(),
        routes: routes.into_iter().map(|((m, p, d), (n, f))| (m, p, d, n, f)).collect(),
    }
}

fn add_record(row: &mut UsageRow, r: &GenerationRecord) {
    row.requests += 1;
    row.errors += i64::from(r.status == "error" || r.status == "error_midstream");
    row.cancelled += i64::from(r.cancelled);
    row.byok_requests += i64::from(r.byok);
    row.prompt_tokens = row.prompt_tokens.saturating_add(r.prompt_tokens);
    row.completion_tokens = row.completion_tokens.saturating_add(r.completion_tokens);
    row.reasoning_tokens = row.reasoning_tokens.saturating_add(r.reasoning_tokens);
    row.cached_tokens = row.cached_tokens.saturating_add(r.cached_tokens);
    if r.byok {
        row.byok_tokens = row.byok_tokens.saturating_add(r.prompt_tokens.saturating_add(r.completion_tokens));
    }
    row.cost_nanos = row.cost_nanos.saturating_add(r.cost_nanos);
}

/// The upsert that adds usage deltas (`?` placeholders for `rows` rows of 15 values).
pub(crate) fn usage_upsert_sql(rows: usize) -> String {
    let one = format!("({})", vec!["?"; 15].join(", "));
    let values = vec![one; rows].join(", ");
    let add = |c: &str| format!("{c} = usage_daily.{c} + excluded.{c}");
    let sets: Vec<String> = [
        "requests", "errors", "cancelled", "byok_requests", "prompt_tokens", "completion_tokens",
        "reasoning_tokens", "cached_tokens", "byok_tokens", "cost_nanos",
    ]
    .iter()
    .map(|c| add(c))
    .collect();
    format!(
        "INSERT INTO usage_daily ({USAGE_COLUMNS}) VALUES {values} \
         ON CONFLICT (org_id, day, key_id, model, provider) DO UPDATE SET {}",
        sets.join(", ")
    )
}

/// The binds of [`usage_upsert_sql`], row by row.
pub(crate) fn usage_upsert_binds(rows: &[UsageRow]) -> Vec<Bind> {
    let mut binds = Vec::with_capacity(rows.len() * 15);
    for r in rows {
        binds.extend([
            Bind::Text(r.org_id.clone()),
            Bind::Int(r.day),
            Bind::Text(r.key_id.clone()),
            Bind::Text(r.model.clone()),
            Bind::Text(r.provider.clone()),
        ]);
        binds.extend(
            [
                r.requests, r.errors, r.cancelled, r.byok_requests, r.prompt_tokens, r.completion_tokens,
                r.reasoning_tokens, r.cached_tokens, r.byok_tokens, r.cost_nanos,
            ]
            .map(Bind::Int),
        );
    }
    binds
}

/// The upsert that adds route attempt deltas (`rows` rows of 5 values).
pub(crate) fn routes_upsert_sql(rows: usize) -> String {
    let values = vec!["(?, ?, ?, ?, ?)"; rows].join(", ");
    format!(
        "INSERT INTO route_daily (model, provider, day, attempts, failures) VALUES {values} \
         ON CONFLICT (model, provider, day) DO UPDATE SET attempts = route_daily.attempts + excluded.attempts, \
         failures = route_daily.failures + excluded.failures"
    )
}

pub(crate) fn routes_upsert_binds(rows: &[(String, String, i64, i64, i64)]) -> Vec<Bind> {
    rows.iter()
        .flat_map(|(m, p, d, n, f)| [Bind::Text(m.clone()), Bind::Text(p.clone()), Bind::Int(*d), Bind::Int(*n), Bind::Int(*f)])
        .collect()
}

/// Rollup rows per upsert statement (15 values each: well within both databases' limits).
pub(crate) const ROLLUP_ROWS_PER_UPSERT: usize = 500;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_for_postgres() {
        assert_eq!(numbered("a = ? AND b IN (?, ?)"), "a = $1 AND b IN ($2, $3)");
    }

    #[test]
    fn deltas_count_only_inserted_records_and_every_attempt() {
        let record = |id: &str, status: &str, cost: i64| GenerationRecord {
            id: id.into(),
            org_id: Some("o".into()),
            model: "m".into(),
            provider: Some("b".into()),
            status: status.into(),
            prompt_tokens: 10,
            completion_tokens: 5,
            cost_nanos: cost,
            local_day: 3,
            created_at_ms: 3 * DAY_MS + 5,
            attempts: r#"[{"provider":"a","outcome":"http_error"},{"provider":"b","outcome":"success"}]"#.into(),
            ..GenerationRecord::default()
        };
        let records = [record("1", "success", 7), record("2", "error", 0), record("3", "success", 9)];
        let inserted: HashSet<String> = ["1".to_owned(), "2".to_owned()].into();
        let deltas = rollup_deltas(&records, &inserted);
        assert_eq!(deltas.usage.len(), 1);
        let row = &deltas.usage[0];
        assert_eq!((row.requests, row.errors, row.prompt_tokens, row.cost_nanos, row.day), (2, 1, 20, 7, 3));
        assert_eq!(
            deltas.routes,
            vec![("m".into(), "a".into(), 3, 2, 2), ("m".into(), "b".into(), 3, 2, 0)]
        );
    }
}
