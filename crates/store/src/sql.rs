//! What the SQLite and Postgres implementations share: column lists (identical in both
//! schemas), the writers' multi-row statements ([`MultiRowSql`]) and binds, and the
//! dialect-free parts of the ledger logic.

use std::collections::{BTreeMap, HashSet};
use std::hash::Hash;
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::{Arguments, Database, Encode, QueryBuilder, Type};

use crate::{Charge, GenerationRecord, LedgerEntry};

pub(crate) const GENERATION_COLUMNS: &str = "id, created_at_ms, org_id, key_id, endpoint, model, provider, upstream_model, \
    streamed, status, http_status, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, \
    usage_estimated, cost, currency, latency_ms, ttft_ms, finish_reason, attempts, error, user_agent, referer, end_user, \
    cost_nanos, generation_time_ms, cancelled, byok, local_day";

/// The request-log insert's binds, row by row in [`GENERATION_COLUMNS`] order (31 per record),
/// by reference. The same for both databases.
pub(crate) fn generation_arguments<'a, DB>(records: &'a [GenerationRecord]) -> Result<DB::Arguments<'a>, sqlx::Error>
where
    DB: Database,
    String: Encode<'a, DB> + Type<DB>,
    Option<String>: Encode<'a, DB> + Type<DB>,
    i64: Encode<'a, DB> + Type<DB>,
    Option<i64>: Encode<'a, DB> + Type<DB>,
    bool: Encode<'a, DB> + Type<DB>,
{
    let mut args = DB::Arguments::<'a>::default();
    args.reserve(records.len() * 31, 0);
    for r in records {
        add(&mut args, &r.id)?;
        add(&mut args, r.created_at_ms)?;
        add(&mut args, &r.org_id)?;
        add(&mut args, &r.key_id)?;
        add(&mut args, &r.endpoint)?;
        add(&mut args, &r.model)?;
        add(&mut args, &r.provider)?;
        add(&mut args, &r.upstream_model)?;
        add(&mut args, r.streamed)?;
        add(&mut args, &r.status)?;
        add(&mut args, r.http_status)?;
        add(&mut args, r.prompt_tokens)?;
        add(&mut args, r.completion_tokens)?;
        add(&mut args, r.cached_tokens)?;
        add(&mut args, r.reasoning_tokens)?;
        add(&mut args, r.usage_estimated)?;
        add(&mut args, &r.cost)?;
        add(&mut args, &r.currency)?;
        add(&mut args, r.latency_ms)?;
        add(&mut args, r.ttft_ms)?;
        add(&mut args, &r.finish_reason)?;
        add(&mut args, &r.attempts)?;
        add(&mut args, &r.error)?;
        add(&mut args, &r.user_agent)?;
        add(&mut args, &r.referer)?;
        add(&mut args, &r.end_user)?;
        add(&mut args, r.cost_nanos)?;
        add(&mut args, r.generation_time_ms)?;
        add(&mut args, r.cancelled)?;
        add(&mut args, r.byok)?;
        add(&mut args, r.local_day)?;
    }
    Ok(args)
}

/// The ledger insert's binds, row by row in [`LEDGER_INSERT_COLUMNS`] order (9 per line), by
/// reference. The same for both databases.
pub(crate) fn ledger_arguments<'a, DB>(entries: &[&'a LedgerEntry]) -> Result<DB::Arguments<'a>, sqlx::Error>
where
    DB: Database,
    String: Encode<'a, DB> + Type<DB>,
    Option<String>: Encode<'a, DB> + Type<DB>,
    i64: Encode<'a, DB> + Type<DB>,
{
    let mut args = DB::Arguments::<'a>::default();
    args.reserve(entries.len() * 9, 0);
    for e in entries {
        add(&mut args, &e.org_id)?;
        add(&mut args, e.amount_nanos)?;
        add(&mut args, &e.currency)?;
        add(&mut args, &e.kind)?;
        add(&mut args, &e.reference)?;
        add(&mut args, &e.key_id)?;
        add(&mut args, &e.workspace_id)?;
        add(&mut args, &e.note)?;
        add(&mut args, e.created_at_ms)?;
    }
    Ok(args)
}

/// One bind; the encoders used here cannot fail, but an error is still an error.
fn add<'a, DB: Database, T: 'a + Encode<'a, DB> + Type<DB>>(args: &mut DB::Arguments<'a>, value: T) -> Result<(), sqlx::Error> {
    args.add(value).map_err(sqlx::Error::Encode)
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

/// The row counts a multi-row statement of the writers may have, largest first. A batch is cut
/// into pieces of these sizes ([`fixed_chunks`]), so each statement has one of a few shapes,
/// is prepared once per connection and then found in sqlx's statement cache: parsing a
/// statement of hundreds of `VALUES` rows anew for every batch was a quarter of SQLite's work.
/// 256 rows of the widest table (31 columns) bind 7,936 parameters, within both databases'
/// limits (SQLite 32,766; Postgres 65,535).
const STATEMENT_ROWS: [usize; 5] = [256, 64, 16, 4, 1];

/// Cuts `items` into consecutive pieces whose lengths are in [`STATEMENT_ROWS`], greedily
/// (at most three pieces of each smaller size follow the largest ones).
pub(crate) fn fixed_chunks<T>(items: &[T]) -> impl Iterator<Item = &[T]> {
    sized_chunks(items).map(|(_, piece)| piece)
}

/// [`fixed_chunks`], each piece with the index of its size in [`STATEMENT_ROWS`].
fn sized_chunks<T>(items: &[T]) -> impl Iterator<Item = (usize, &[T])> {
    let mut rest = items;
    std::iter::from_fn(move || {
        let index = STATEMENT_ROWS.iter().position(|&size| size <= rest.len())?;
        let (piece, after) = rest.split_at(STATEMENT_ROWS[index]);
        rest = after;
        Some((index, piece))
    })
}

/// The texts of one multi-row insert for each size of [`STATEMENT_ROWS`], written once (the
/// writers keep them in statics): `INSERT INTO {table} ({columns}) VALUES (?, …), … {tail}`.
/// Writing the text placeholder by placeholder for every batch (sqlx's `QueryBuilder` formats
/// each one) cost the writers more instructions than binding the values.
pub(crate) struct MultiRowSql {
    texts: [String; STATEMENT_ROWS.len()],
}

impl MultiRowSql {
    /// With SQLite's `?` placeholders, one per column of the comma-separated `columns`.
    pub(crate) fn insert(table: &str, columns: &str, tail: &str) -> Self {
        let row = format!("({})", vec!["?"; columns.split(',').count()].join(", "));
        MultiRowSql {
            texts: STATEMENT_ROWS.map(|rows| format!("INSERT INTO {table} ({columns}) VALUES {} {tail}", vec![row.as_str(); rows].join(", "))),
        }
    }

    /// The same statements with Postgres' numbered placeholders ([`crate::usage::numbered`]).
    pub(crate) fn numbered(self) -> Self {
        MultiRowSql { texts: self.texts.map(|text| crate::usage::numbered(&text)) }
    }

    /// `items` cut as [`fixed_chunks`] cuts them, each piece with its statement's text.
    pub(crate) fn pieces<'s, 'i, T>(&'s self, items: &'i [T]) -> impl Iterator<Item = (&'s str, &'i [T])> {
        sized_chunks(items).map(|(index, piece)| (self.texts[index].as_str(), piece))
    }
}

/// Milliseconds since the Unix epoch, by the system clock (the gateway's clock too).
pub(crate) fn unix_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `(org_id, kind, reference)`: what identifies a ledger line.
pub(crate) type LineKey = (String, String, String);

/// For each of a batch's rows, whether the insert added it: its key is among those the
/// database reports inserted, and it is the first row of that key in the batch (a row the batch
/// repeats is counted once). The writers' rollups and running sums count only these.
pub(crate) fn first_inserted<T, K: Hash + Eq>(
    rows: impl IntoIterator<Item = T>,
    key: impl Fn(&T) -> K,
    inserted: impl Fn(&K) -> bool,
) -> Vec<bool> {
    let mut seen = HashSet::new();
    rows.into_iter()
        .map(|row| {
            let key = key(&row);
            inserted(&key) && seen.insert(key)
        })
        .collect()
}

/// [`first_inserted`] for ledger lines, over borrowed keys: no copy of the three strings per
/// line.
pub(crate) fn new_lines(entries: &[&LedgerEntry], inserted: &HashSet<LineKey>) -> Vec<bool> {
    let inserted: HashSet<(&str, &str, &str)> = inserted.iter().map(|(o, k, r)| (o.as_str(), k.as_str(), r.as_str())).collect();
    first_inserted(entries, |e| (e.org_id.as_str(), e.kind.as_str(), e.reference.as_str()), |key| inserted.contains(key))
}

/// How many lines of a batch are new (of [`new_lines`]' answer).
pub(crate) fn count_new(new: &[bool]) -> u64 {
    new.iter().filter(|new| **new).count() as u64
}

/// Adds to `usage` (per `(org_id, lease_id)`) the amount, as a positive number, of each new
/// line's charge (`new`, as [`new_lines`] gives it).
pub(crate) fn add_lease_usage<'c>(charges: &'c [Charge], new: &[bool], usage: &mut BTreeMap<(&'c str, &'c str), i64>) {
    for (charge, _) in charges.iter().zip(new).filter(|(_, new)| **new) {
        if let Some(lease_id) = charge.lease_id.as_deref() {
            let used = usage.entry((charge.entry.org_id.as_str(), lease_id)).or_insert(0);
            *used = used.saturating_add(charge.entry.amount_nanos.saturating_abs());
        }
    }
}

/// What one organisation's new lines add to its running sums in `org_balances`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct BalanceDelta {
    /// The sum of the lines' amounts (signed).
    pub balance: i64,
    /// The sum of the charges, as a positive number.
    pub usage: i64,
}

/// Per organisation (in `org_id` order, the order every writer updates `org_balances` in, so
/// that two transactions never wait for each other's rows crosswise), what the new lines of
/// `entries` (`new`, as [`new_lines`] gives it) add to its running sums.
pub(crate) fn balance_deltas<'e>(entries: &[&'e LedgerEntry], new: &[bool]) -> Vec<(&'e str, BalanceDelta)> {
    let mut deltas: BTreeMap<&str, BalanceDelta> = BTreeMap::new();
    for (e, _) in entries.iter().zip(new).filter(|(_, new)| **new) {
        let delta = deltas.entry(e.org_id.as_str()).or_default();
        delta.balance = delta.balance.saturating_add(e.amount_nanos);
        if e.kind == "charge" {
            delta.usage = delta.usage.saturating_sub(e.amount_nanos);
        }
    }
    deltas.into_iter().collect()
}

/// Adds `deltas` to the `shard` rows of `org_balances`, one statement per piece of
/// [`fixed_chunks`]. The same for both databases.
pub(crate) fn balance_upserts<'a, DB>(
    deltas: &'a [(&'a str, BalanceDelta)],
    shard: i32,
) -> impl Iterator<Item = QueryBuilder<'a, DB>> + 'a
where
    DB: Database,
    &'a str: Encode<'a, DB> + Type<DB>,
    i64: Encode<'a, DB> + Type<DB>,
    i32: Encode<'a, DB> + Type<DB>,
{
    fixed_chunks(deltas).map(move |chunk| {
        let mut builder = QueryBuilder::<DB>::new("INSERT INTO org_balances (org_id, shard, balance_nanos, usage_nanos) ");
        builder.push_values(chunk, |mut row, (org_id, delta)| {
            row.push_bind(*org_id).push_bind(shard).push_bind(delta.balance).push_bind(delta.usage);
        });
        builder.push(
            " ON CONFLICT (org_id, shard) DO UPDATE SET \
             balance_nanos = org_balances.balance_nanos + excluded.balance_nanos, \
             usage_nanos = org_balances.usage_nanos + excluded.usage_nanos",
        );
        builder
    })
}

/// The width of a `spend_buckets` row: 15 minutes, so that every time zone's midnight (all
/// UTC offsets in use are whole quarter hours) starts a bucket and a day, week or month of
/// spend is a sum of whole buckets.
pub(crate) const SPEND_BUCKET_MS: i64 = 15 * 60 * 1000;

/// Whose charges a `spend_buckets` row adds up: `o` the organisation, `k` a key, `w` a
/// workspace (a member's spend is the sum of their keys').
pub(crate) type SpendRow<'e> = (&'e str, &'static str, &'e str, i64);

/// Per `(org_id, scope, scope_id, bucket)`, in that order, what the new `charge` lines of
/// `entries` (`new`, as [`new_lines`] gives it) add to the spend rollup (as positive numbers).
pub(crate) fn spend_deltas<'e>(entries: &[&'e LedgerEntry], new: &[bool]) -> Vec<(SpendRow<'e>, i64)> {
    let mut deltas: BTreeMap<SpendRow<'e>, i64> = BTreeMap::new();
    for (e, _) in entries.iter().zip(new).filter(|(e, new)| **new && e.kind == "charge") {
        let bucket = e.created_at_ms.div_euclid(SPEND_BUCKET_MS);
        let scopes = [Some(("o", e.org_id.as_str())), e.key_id.as_deref().map(|k| ("k", k)), e.workspace_id.as_deref().map(|w| ("w", w))];
        for (scope, scope_id) in scopes.into_iter().flatten() {
            let spent = deltas.entry((e.org_id.as_str(), scope, scope_id, bucket)).or_insert(0);
            *spent = spent.saturating_sub(e.amount_nanos);
        }
    }
    deltas.into_iter().collect()
}

/// Adds `deltas` to the `shard` rows of `spend_buckets`, one statement per piece of
/// [`fixed_chunks`]. The same for both databases.
pub(crate) fn spend_upserts<'a, DB>(
    deltas: &'a [(SpendRow<'a>, i64)],
    shard: i32,
) -> impl Iterator<Item = QueryBuilder<'a, DB>> + 'a
where
    DB: Database,
    &'a str: Encode<'a, DB> + Type<DB>,
    i64: Encode<'a, DB> + Type<DB>,
    i32: Encode<'a, DB> + Type<DB>,
{
    fixed_chunks(deltas).map(move |chunk| {
        let mut builder =
            QueryBuilder::<DB>::new("INSERT INTO spend_buckets (org_id, scope, scope_id, bucket, shard, spent_nanos) ");
        builder.push_values(chunk, |mut row, ((org_id, scope, scope_id, bucket), spent)| {
            row.push_bind(*org_id).push_bind(*scope).push_bind(*scope_id).push_bind(*bucket).push_bind(shard).push_bind(*spent);
        });
        builder.push(
            " ON CONFLICT (org_id, scope, scope_id, bucket, shard) DO UPDATE SET \
             spent_nanos = spend_buckets.spent_nanos + excluded.spent_nanos",
        );
        builder
    })
}

/// Whose spend [`spend_query`] sums.
#[derive(Clone, Copy, Debug)]
pub(crate) enum SpendScope<'a> {
    Org,
    Key(&'a str),
    Workspace(&'a str),
    /// The keys of this member.
    Member(&'a str),
}

/// The charges (a positive number) of `scope` in `org_id` since `since_ms`: the whole
/// 15-minute buckets of `spend_buckets` from the first one that starts at or after `since_ms`,
/// plus the ledger's own lines between `since_ms` and that bucket (none when `since_ms` starts
/// a bucket, as every window's start does). The same for both databases.
pub(crate) fn spend_query<'a, DB>(org_id: &'a str, scope: SpendScope<'a>, since_ms: i64) -> QueryBuilder<'a, DB>
where
    DB: Database,
    &'a str: Encode<'a, DB> + Type<DB>,
    i64: Encode<'a, DB> + Type<DB>,
{
    let first_bucket = since_ms.div_euclid(SPEND_BUCKET_MS) + i64::from(since_ms.rem_euclid(SPEND_BUCKET_MS) != 0);
    let mut b = QueryBuilder::<DB>::new("SELECT CAST((SELECT COALESCE(SUM(spent_nanos), 0) FROM spend_buckets WHERE org_id = ");
    b.push_bind(org_id);
    match scope {
        SpendScope::Org => b.push(" AND scope = 'o' AND scope_id = ").push_bind(org_id),
        SpendScope::Key(id) => b.push(" AND scope = 'k' AND scope_id = ").push_bind(id),
        SpendScope::Workspace(id) => b.push(" AND scope = 'w' AND scope_id = ").push_bind(id),
        SpendScope::Member(user) => b
            .push(" AND scope = 'k' AND scope_id IN (SELECT id FROM api_keys WHERE org_id = ")
            .push_bind(org_id)
            .push(" AND member_id = ")
            .push_bind(user)
            .push(")"),
    };
    b.push(" AND bucket >= ").push_bind(first_bucket);
    b.push(") AS BIGINT) + CAST((SELECT COALESCE(-SUM(amount_nanos), 0) FROM ledger_entries WHERE org_id = ");
    b.push_bind(org_id).push(" AND kind = 'charge'");
    match scope {
        SpendScope::Org => &mut b,
        SpendScope::Key(id) => b.push(" AND key_id = ").push_bind(id),
        SpendScope::Workspace(id) => b.push(" AND workspace_id = ").push_bind(id),
        SpendScope::Member(user) => b
            .push(" AND key_id IN (SELECT id FROM api_keys WHERE org_id = ")
            .push_bind(org_id)
            .push(" AND member_id = ")
            .push_bind(user)
            .push(")"),
    };
    b.push(" AND created_at_ms >= ").push_bind(since_ms);
    b.push(" AND created_at_ms < ").push_bind(first_bucket.saturating_mul(SPEND_BUCKET_MS));
    b.push(") AS BIGINT)");
    b
}

/// `balance − reserved`, saturating (both are far from `i64` limits in practice).
pub(crate) fn available(balance: i64, reserved: i64) -> i64 {
    balance.saturating_sub(reserved)
}

pub(crate) const HEALTH_COLUMNS: &str = "route, instance, open_until_ms, failure_ppm, latency_us, updated_at_ms";

pub(crate) const HEALTH_UPSERT: &str = " ON CONFLICT (route, instance) DO UPDATE SET open_until_ms = excluded.open_until_ms, \
    failure_ppm = excluded.failure_ppm, latency_us = excluded.latency_us, updated_at_ms = excluded.updated_at_ms";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_chunks_cover_the_batch_in_order_with_few_shapes() {
        for n in [0usize, 1, 3, 4, 5, 63, 64, 65, 255, 256, 257, 700, 1000] {
            let items: Vec<usize> = (0..n).collect();
            let pieces: Vec<&[usize]> = fixed_chunks(&items).collect();
            assert_eq!(pieces.concat(), items, "n = {n}");
            assert!(pieces.iter().all(|p| STATEMENT_ROWS.contains(&p.len())), "n = {n}");
            for size in &STATEMENT_ROWS[1..] {
                assert!(pieces.iter().filter(|p| p.len() == *size).count() <= 3, "n = {n}, size {size}");
            }
        }
        let sizes: Vec<usize> = fixed_chunks(&[0u8; 600]).map(<[u8]>::len).collect();
        assert_eq!(sizes, vec![256, 256, 64, 16, 4, 4]);
    }

    #[test]
    fn multi_row_texts_match_their_pieces_in_both_dialects() {
        let sqlite = MultiRowSql::insert("t", "a, b", "ON CONFLICT DO NOTHING");
        let items: Vec<u8> = vec![0; 5];
        let pieces: Vec<(&str, &[u8])> = sqlite.pieces(&items).collect();
        assert_eq!(pieces.iter().map(|(_, p)| p.len()).collect::<Vec<_>>(), [4, 1]);
        assert_eq!(pieces[1].0, "INSERT INTO t (a, b) VALUES (?, ?) ON CONFLICT DO NOTHING");
        assert_eq!(pieces[0].0.matches('?').count(), 8);
        let postgres = MultiRowSql::insert("t", "a, b", "RETURNING a").numbered();
        let texts: Vec<&str> = postgres.pieces(&items[..4]).map(|(text, _)| text).collect();
        assert_eq!(texts, ["INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4), ($5, $6), ($7, $8) RETURNING a"]);
        // Every piece of a large batch has a text whose placeholders match its binds.
        let items: Vec<u8> = vec![0; 600];
        for (text, piece) in postgres.pieces(&items) {
            assert_eq!(text.matches('$').count(), piece.len() * 2);
            assert!(text.contains(&format!("${})", piece.len() * 2)));
        }
    }

    fn line(org: &str, kind: &str, reference: &str, amount_nanos: i64) -> LedgerEntry {
        LedgerEntry {
            org_id: org.to_owned(),
            kind: kind.to_owned(),
            reference: reference.to_owned(),
            amount_nanos,
            ..LedgerEntry::default()
        }
    }

    fn key(org: &str, kind: &str, reference: &str) -> LineKey {
        (org.to_owned(), kind.to_owned(), reference.to_owned())
    }

    #[test]
    fn a_line_is_new_once_when_the_database_took_it() {
        let lines = [line("o1", "charge", "g1", -5), line("o1", "charge", "g2", -7), line("o1", "charge", "g1", -5),
            line("o2", "charge", "g1", -11), line("o1", "grant", "g1", 100)];
        let entries: Vec<&LedgerEntry> = lines.iter().collect();
        // The repeated g1 charge is new once; lines the database did not insert are not new.
        let all: HashSet<LineKey> = lines.iter().map(|l| key(&l.org_id, &l.kind, &l.reference)).collect();
        assert_eq!(new_lines(&entries, &all), [true, true, false, true, true]);
        let inserted = HashSet::from([key("o1", "charge", "g1"), key("o2", "charge", "g1")]);
        let new = new_lines(&entries, &inserted);
        assert_eq!(new, [true, false, false, true, false]);
        assert_eq!(count_new(&new), 2);
        // Only new lines move the sums, each once.
        let deltas = balance_deltas(&entries, &new);
        assert_eq!(deltas, [("o1", BalanceDelta { balance: -5, usage: 5 }), ("o2", BalanceDelta { balance: -11, usage: 11 })]);
        let spend: Vec<i64> = spend_deltas(&entries, &new).into_iter().map(|(_, spent)| spent).collect();
        assert_eq!(spend, [5, 11]);
    }
}
