//! Usage analytics over the request log: the [`UsageRepo`] queries behind `/v1/generation`,
//! `/me/usage`, `/me/activity`, `/v1/rankings` and `/v1/models/{id}/stats`, and the daily
//! rollups that keep them fast at millions of records.
//!
//! **Rollups.** `usage_daily` holds one row per (organisation, local day, key, model,
//! provider) with exact sums (tokens, cost in nanos, requests, errors); `route_daily` one row
//! per (model, provider, UTC day) with the attempts made on that route, how many failed, and
//! the records it served (for rankings and model statistics).
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

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};

use crate::sql::{first_inserted, MultiRowSql};
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
/// optionally one model and one key; summed over the dimensions `group` leaves out.
#[derive(Clone, Debug)]
pub struct UsageQuery<'a> {
    pub org_id: &'a str,
    pub from_day: i64,
    pub to_day: i64,
    pub model: Option<&'a str>,
    pub key_id: Option<&'a str>,
    pub group: UsageGroup,
}

/// The dimensions a usage query keeps; the others are summed over (and read back as `-1`
/// for the day, `''` for the rest).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsageGroup {
    pub day: bool,
    pub key: bool,
    pub model: bool,
    pub provider: bool,
}

impl UsageGroup {
    /// Every dimension: the rollup rows as stored.
    pub const ALL: UsageGroup = UsageGroup { day: true, key: true, model: true, provider: true };
}

/// Tokens per model over a window, across every organisation (BYOK excluded).
#[derive(Clone, Debug, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct ModelTokens {
    pub model: String,
    pub requests: i64,
    pub tokens: i64,
}

/// One route of one model over whole UTC days, from the records it served and the attempts
/// made on it.
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
    /// Requests and tokens per model, every organisation, UTC days `>= since_day`, BYOK
    /// excluded.
    fn model_tokens(&self, since_day: i64) -> BoxFuture<'_, Result<Vec<ModelTokens>, StoreError>>;
    /// Per-route statistics of `model` over the UTC days `>= since_day`.
    fn route_stats<'a>(&'a self, model: &'a str, since_day: i64) -> BoxFuture<'a, Result<Vec<RouteStats>, StoreError>>;
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
    let g = query.group;
    let dim = |keep: bool, column: &'static str, none: &'static str| if keep { column } else { none };
    let (day, key, model, provider) = (
        dim(g.day, "day", "CAST(-1 AS BIGINT)"),
        dim(g.key, "key_id", "''"),
        dim(g.model, "model", "''"),
        dim(g.provider, "provider", "''"),
    );
    let sums: Vec<String> = SUMMED.iter().map(|c| format!("CAST(SUM({c}) AS BIGINT) AS {c}")).collect();
    let mut sql = format!(
        "SELECT org_id, {day} AS day, {key} AS key_id, {model} AS model, {provider} AS provider, {} \
         FROM usage_daily WHERE org_id = ? AND day >= ? AND day <= ?",
        sums.join(", ")
    );
    let mut binds = vec![Bind::Text(query.org_id.to_owned()), Bind::Int(query.from_day), Bind::Int(query.to_day)];
    if let Some(model) = query.model {
        sql.push_str(" AND model = ?");
        binds.push(Bind::Text(model.to_owned()));
    }
    if let Some(key) = query.key_id {
        sql.push_str(" AND key_id = ?");
        binds.push(Bind::Text(key.to_owned()));
    }
    let kept: Vec<&str> = [(g.day, "day"), (g.key, "key_id"), (g.model, "model"), (g.provider, "provider")]
        .iter()
        .filter(|(keep, _)| *keep)
        .map(|(_, c)| *c)
        .collect();
    let group = std::iter::once("org_id").chain(kept.iter().copied()).collect::<Vec<_>>().join(", ");
    sql.push_str(&format!(" GROUP BY {group} ORDER BY {group}"));
    (sql, binds)
}

/// The summed columns of `usage_daily`.
const SUMMED: [&str; 10] = [
    "requests", "errors", "cancelled", "byok_requests", "prompt_tokens", "completion_tokens",
    "reasoning_tokens", "cached_tokens", "byok_tokens", "cost_nanos",
];

pub(crate) const MODEL_TOKENS_SQL: &str = "SELECT model, \
    CAST(COALESCE(SUM(ranked_requests), 0) AS BIGINT) AS requests, \
    CAST(COALESCE(SUM(ranked_tokens), 0) AS BIGINT) AS tokens \
    FROM route_daily WHERE day >= ? GROUP BY model";

/// Per provider of one model: records (served or failed last) and attempts.
pub(crate) const ROUTE_STATS_SQL: &str = "SELECT provider, \
    CAST(SUM(requests) AS BIGINT) AS requests, CAST(SUM(successes) AS BIGINT) AS successes, \
    CAST(SUM(errors) AS BIGINT) AS errors, CAST(SUM(gen_tokens) AS BIGINT) AS completion_tokens, \
    CAST(SUM(gen_ms) AS BIGINT) AS generation_ms, CAST(SUM(attempts) AS BIGINT) AS attempts, \
    CAST(SUM(failures) AS BIGINT) AS attempt_failures \
    FROM route_daily WHERE model = ? AND day >= ? AND provider <> '' GROUP BY provider ORDER BY provider";

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

/// What one batch adds to one `route_daily` row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct RouteDelta {
    pub model: String,
    pub provider: String,
    pub day: i64,
    /// attempts, failures, requests, successes, errors, ranked_requests, ranked_tokens,
    /// gen_tokens, gen_ms: the columns of `route_daily` after the key, in order.
    pub counts: [i64; 9],
}

const ROUTE_COUNTS: [&str; 9] = [
    "attempts", "failures", "requests", "successes", "errors", "ranked_requests", "ranked_tokens", "gen_tokens", "gen_ms",
];

/// What one batch adds to the rollups.
#[derive(Default)]
pub(crate) struct RollupDeltas {
    pub usage: Vec<UsageRow>,
    pub routes: Vec<RouteDelta>,
}

#[derive(serde::Deserialize)]
struct AttemptOutcome<'a> {
    #[serde(borrow)]
    provider: Cow<'a, str>,
    #[serde(borrow)]
    outcome: Cow<'a, str>,
}

/// [`first_inserted`] for request-log records, by id.
pub(crate) fn new_records(records: &[GenerationRecord], inserted: &HashSet<String>) -> Vec<bool> {
    first_inserted(records, |r| r.id.as_str(), |id| inserted.contains(*id))
}

/// Sums the records the insert added (`new`, as [`new_records`] gives it) into rollup deltas,
/// one per key, sorted (so that concurrent writers lock rows in one order). Keys borrow from
/// the records while summing: one owned copy per distinct key, not per record.
pub(crate) fn rollup_deltas(records: &[GenerationRecord], new: &[bool]) -> RollupDeltas {
    type UsageKey<'a> = (&'a str, i64, &'a str, &'a str, &'a str);
    let mut usage: BTreeMap<UsageKey<'_>, UsageRow> = BTreeMap::new();
    let mut routes: BTreeMap<(&str, Cow<'_, str>, i64), [i64; 9]> = BTreeMap::new();
    for (r, _) in records.iter().zip(new).filter(|(_, new)| **new) {
        let provider = r.provider.as_deref().unwrap_or_default();
        let key = (r.org_id.as_deref().unwrap_or_default(), r.local_day, r.key_id.as_deref().unwrap_or_default(), r.model.as_str(), provider);
        add_record(usage.entry(key).or_default(), r);
        let day = r.created_at_ms.div_euclid(DAY_MS);
        let served = routes.entry((r.model.as_str(), Cow::Borrowed(provider), day)).or_default();
        add_served(served, r);
        let attempts: Vec<AttemptOutcome<'_>> = serde_json::from_str(&r.attempts).unwrap_or_default();
        for a in attempts {
            let counts = routes.entry((r.model.as_str(), a.provider, day)).or_default();
            counts[0] += 1;
            counts[1] += i64::from(a.outcome != "success");
        }
    }
    RollupDeltas {
        usage: usage
            .into_iter()
            .map(|((org_id, day, key_id, model, provider), row)| UsageRow {
                org_id: org_id.to_owned(),
                day,
                key_id: key_id.to_owned(),
                model: model.to_owned(),
                provider: provider.to_owned(),
                ..row
            })
            .collect(),
        routes: routes
            .into_iter()
            .map(|((model, provider, day), counts)| RouteDelta {
                model: model.to_owned(),
                provider: provider.into_owned(),
                day,
                counts,
            })
            .collect(),
    }
}

/// A record's part of its provider's `route_daily` counts (everything but the attempts).
fn add_served(counts: &mut [i64; 9], r: &GenerationRecord) {
    let success = r.status == "success";
    counts[2] += 1;
    counts[3] += i64::from(success);
    counts[4] += i64::from(r.status == "error" || r.status == "error_midstream");
    if !r.byok {
        counts[5] += 1;
        counts[6] = counts[6].saturating_add(r.prompt_tokens.saturating_add(r.completion_tokens));
    }
    if let Some(ms) = r.generation_time_ms.filter(|ms| success && *ms > 0) {
        counts[7] = counts[7].saturating_add(r.completion_tokens);
        counts[8] = counts[8].saturating_add(ms);
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

/// The upserts that add usage deltas (`?` placeholders, 15 values a row), one per piece size.
pub(crate) fn usage_upsert() -> MultiRowSql {
    let sets: Vec<String> = [
        "requests", "errors", "cancelled", "byok_requests", "prompt_tokens", "completion_tokens",
        "reasoning_tokens", "cached_tokens", "byok_tokens", "cost_nanos",
    ]
    .iter()
    .map(|c| format!("{c} = usage_daily.{c} + excluded.{c}"))
    .collect();
    let tail = format!("ON CONFLICT (org_id, day, key_id, model, provider) DO UPDATE SET {}", sets.join(", "));
    MultiRowSql::insert("usage_daily", USAGE_COLUMNS, &tail)
}

/// The binds of [`usage_upsert`], row by row.
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

/// The upserts that add route deltas (12 values a row), one per piece size.
pub(crate) fn routes_upsert() -> MultiRowSql {
    let sets: Vec<String> = ROUTE_COUNTS.iter().map(|c| format!("{c} = route_daily.{c} + excluded.{c}")).collect();
    let tail = format!("ON CONFLICT (model, provider, day) DO UPDATE SET {}", sets.join(", "));
    MultiRowSql::insert("route_daily", &format!("model, provider, day, {}", ROUTE_COUNTS.join(", ")), &tail)
}

pub(crate) fn routes_upsert_binds(rows: &[RouteDelta]) -> Vec<Bind> {
    let mut binds = Vec::with_capacity(rows.len() * 12);
    for r in rows {
        binds.extend([Bind::Text(r.model.clone()), Bind::Text(r.provider.clone()), Bind::Int(r.day)]);
        binds.extend(r.counts.map(Bind::Int));
    }
    binds
}

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
        let records = [record("1", "success", 7), record("2", "error", 0), record("3", "success", 9), record("1", "success", 7)];
        let inserted: HashSet<String> = ["1".to_owned(), "2".to_owned()].into();
        let new = new_records(&records, &inserted);
        assert_eq!(new, [true, true, false, false], "3 was not inserted, 1 is counted once");
        let deltas = rollup_deltas(&records, &new);
        assert_eq!(deltas.usage.len(), 1);
        let row = &deltas.usage[0];
        assert_eq!((row.requests, row.errors, row.prompt_tokens, row.cost_nanos, row.day), (2, 1, 20, 7, 3));
        let counts: Vec<(&str, [i64; 9])> = deltas.routes.iter().map(|r| (r.provider.as_str(), r.counts)).collect();
        // b served both (one success with no generation time, one error); a failed both times.
        assert_eq!(counts, [("a", [2, 2, 0, 0, 0, 0, 0, 0, 0]), ("b", [2, 0, 2, 1, 1, 2, 30, 0, 0])]);
    }
}
