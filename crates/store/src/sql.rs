//! What the SQLite and Postgres implementations share: column lists (identical in both
//! schemas), the request-log insert's values, and the dialect-free parts of the ledger logic.

use std::collections::{BTreeMap, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::{Database, Encode, QueryBuilder, Type};

use crate::{Charge, GenerationRecord};

pub(crate) const GENERATION_COLUMNS: &str = "id, created_at_ms, org_id, key_id, endpoint, model, provider, upstream_model, \
    streamed, status, http_status, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, \
    usage_estimated, cost, currency, latency_ms, ttft_ms, finish_reason, attempts, error, user_agent, referer, end_user, \
    cost_nanos, generation_time_ms, cancelled, byok, local_day";

/// The `VALUES (…), (…)` of a request-log insert, in [`GENERATION_COLUMNS`] order, binding
/// the records' fields by reference. The same for both databases.
pub(crate) fn push_generation_values<'a, DB>(builder: &mut QueryBuilder<'a, DB>, records: &'a [GenerationRecord])
where
    DB: Database,
    String: Encode<'a, DB> + Type<DB>,
    Option<String>: Encode<'a, DB> + Type<DB>,
    i64: Encode<'a, DB> + Type<DB>,
    Option<i64>: Encode<'a, DB> + Type<DB>,
    bool: Encode<'a, DB> + Type<DB>,
{
    builder.push_values(records, |mut row, r| {
        row.push_bind(&r.id)
            .push_bind(r.created_at_ms)
            .push_bind(&r.org_id)
            .push_bind(&r.key_id)
            .push_bind(&r.endpoint)
            .push_bind(&r.model)
            .push_bind(&r.provider)
            .push_bind(&r.upstream_model)
            .push_bind(r.streamed)
            .push_bind(&r.status)
            .push_bind(r.http_status)
            .push_bind(r.prompt_tokens)
            .push_bind(r.completion_tokens)
            .push_bind(r.cached_tokens)
            .push_bind(r.reasoning_tokens)
            .push_bind(r.usage_estimated)
            .push_bind(&r.cost)
            .push_bind(&r.currency)
            .push_bind(r.latency_ms)
            .push_bind(r.ttft_ms)
            .push_bind(&r.finish_reason)
            .push_bind(&r.attempts)
            .push_bind(&r.error)
            .push_bind(&r.user_agent)
            .push_bind(&r.referer)
            .push_bind(&r.end_user)
            .push_bind(r.cost_nanos)
            .push_bind(r.generation_time_ms)
            .push_bind(r.cancelled)
            .push_bind(r.byok)
            .push_bind(r.local_day);
    });
}

pub(crate) const ORG_COLUMNS: &str = "id, name, currency, timezone, created_at_ms";

pub(crate) const KEY_COLUMNS: &str = "id, org_id, workspace_id, kind, name, label, limit_nanos, limit_reset, \
    rpm_limit, daily_limit, budget_nanos, trial, disabled, expires_at_ms, created_at_ms, updated_at_ms, revoked_at_ms, member_id";

pub(crate) const WORKSPACE_COLUMNS: &str = "id, org_id, name, monthly_budget_nanos, created_at_ms";

pub(crate) const MEMBER_COLUMNS: &str = "org_id, user_id, email, role, created_at_ms";

pub(crate) const GUARDRAIL_COLUMNS: &str = "id, org_id, name, max_daily_spend_nanos, max_weekly_spend_nanos, \
    max_monthly_spend_nanos, allowed_models, blocked_models, require_zdr, created_at_ms, updated_at_ms";

/// Every column of `ledger_entries` but `id` (assigned by the database).
pub(crate) const LEDGER_INSERT_COLUMNS: &str =
    "org_id, amount_nanos, currency, kind, reference, key_id, workspace_id, note, created_at_ms";

pub(crate) const LEDGER_COLUMNS: &str =
    "id, org_id, amount_nanos, currency, kind, reference, key_id, workspace_id, note, created_at_ms";

pub(crate) const LEASE_COLUMNS: &str =
    "id, org_id, amount_nanos, used_nanos, holder, expires_at_ms, closed, created_at_ms";

/// Ledger rows per INSERT statement (9 parameters each: well within both databases' limits).
pub(crate) const LEDGER_ROWS_PER_INSERT: usize = 500;

/// Milliseconds since the Unix epoch, by the system clock (the gateway's clock too).
pub(crate) fn unix_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `(org_id, kind, reference)`: what identifies a ledger line.
pub(crate) type LineKey = (String, String, String);

/// Adds to `usage` (per `(org_id, lease_id)`) the amount, as a positive number, of each charge
/// of `charges` whose line is in `inserted` (the rows an `INSERT … RETURNING` gave back). A
/// line is counted once even if the batch repeats it.
pub(crate) fn add_lease_usage<'c>(
    charges: &'c [Charge],
    mut inserted: HashSet<LineKey>,
    usage: &mut BTreeMap<(&'c str, &'c str), i64>,
) {
    for charge in charges {
        let e = &charge.entry;
        let key = (e.org_id.clone(), e.kind.clone(), e.reference.clone());
        if !inserted.remove(&key) {
            continue;
        }
        if let Some(lease_id) = charge.lease_id.as_deref() {
            let used = usage.entry((e.org_id.as_str(), lease_id)).or_insert(0);
            *used = used.saturating_add(e.amount_nanos.saturating_abs());
        }
    }
}

/// `balance − reserved`, saturating (both are far from `i64` limits in practice).
pub(crate) fn available(balance: i64, reserved: i64) -> i64 {
    balance.saturating_sub(reserved)
}

pub(crate) const HEALTH_COLUMNS: &str = "route, instance, open_until_ms, failure_ppm, latency_us, updated_at_ms";

pub(crate) const HEALTH_UPSERT: &str = " ON CONFLICT (route, instance) DO UPDATE SET open_until_ms = excluded.open_until_ms, \
    failure_ppm = excluded.failure_ppm, latency_us = excluded.latency_us, updated_at_ms = excluded.updated_at_ms";
