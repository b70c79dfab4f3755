//! SQLite: the append-only ledger and credit leases.
//!
//! Every write transaction here starts with `BEGIN IMMEDIATE` (see the module above): in
//! `open_lease` that makes "is the lease covered?" and "insert it" one step with respect to
//! every other writer, in this process or another one using the same file.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use sqlx::{Sqlite, SqliteConnection};

use super::SqliteStore;
use crate::sql::{
    add_lease_usage, available, balance_deltas, balance_upserts, count_new, ledger_arguments, new_lines, spend_deltas, spend_query,
    spend_upserts, LineKey, MultiRowSql, SpendScope, LEASE_COLUMNS, LEDGER_COLUMNS, LEDGER_INSERT_COLUMNS,
};
use crate::{BoxFuture, Charge, LeaseRecord, LedgerEntry, LedgerRepo, StoreError};

static INSERT: LazyLock<MultiRowSql> = LazyLock::new(|| {
    MultiRowSql::insert("ledger_entries", LEDGER_INSERT_COLUMNS, "ON CONFLICT (org_id, kind, reference) DO NOTHING")
});

/// `(balance, reserved)` of the org at `now_ms`: the sum of its lines (kept in `org_balances`),
/// and the unused part of its live leases.
async fn balance_and_reserved(
    conn: &mut SqliteConnection,
    org_id: &str,
    now_ms: i64,
) -> Result<(i64, i64), StoreError> {
    Ok(sqlx::query_as(
        "SELECT \
           (SELECT COALESCE(SUM(balance_nanos), 0) FROM org_balances WHERE org_id = ?), \
           (SELECT COALESCE(SUM(MAX(amount_nanos - used_nanos, 0)), 0) FROM credit_leases \
              WHERE org_id = ? AND closed = 0 AND expires_at_ms > ?)",
    )
    .bind(org_id)
    .bind(org_id)
    .bind(now_ms)
    .fetch_one(conn)
    .await?)
}

/// Inserts `entries` (a line that exists already is skipped), adds the new lines to
/// `org_balances` and `spend_buckets` and says which lines are new ([`new_lines`]). Which ones
/// the database took is known without asking about each line: when every line was inserted
/// (the usual case) the inserts' row counts say so; otherwise the lines inserted are those
/// with an id above the largest before (`AUTOINCREMENT` ids only grow, and the transaction
/// holds the write lock). `RETURNING` would stream every inserted row back through sqlx's
/// worker channel, one hand-off per row; asking first which lines exist cost an index probe
/// per line on top of the insert's own.
async fn insert_lines(conn: &mut SqliteConnection, entries: &[&LedgerEntry]) -> Result<Vec<bool>, StoreError> {
    let (last_id_before,): (i64,) = sqlx::query_as("SELECT COALESCE(MAX(id), 0) FROM ledger_entries").fetch_one(&mut *conn).await?;
    let mut inserted = 0;
    for (sql, chunk) in INSERT.pieces(entries) {
        inserted += sqlx::query_with(sql, ledger_arguments::<Sqlite>(chunk)?).execute(&mut *conn).await?.rows_affected();
    }
    let new = if inserted == entries.len() as u64 {
        vec![true; entries.len()]
    } else {
        let rows: Vec<LineKey> = sqlx::query_as("SELECT org_id, kind, reference FROM ledger_entries WHERE id > ?")
            .bind(last_id_before)
            .fetch_all(&mut *conn)
            .await?;
        new_lines(entries, &rows.into_iter().collect())
    };
    for mut upsert in balance_upserts::<Sqlite>(&balance_deltas(entries, &new), 0) {
        upsert.build().execute(&mut *conn).await?;
    }
    for mut upsert in spend_upserts::<Sqlite>(&spend_deltas(entries, &new), 0) {
        upsert.build().execute(&mut *conn).await?;
    }
    Ok(new)
}

impl LedgerRepo for SqliteStore {
    fn append<'a>(&'a self, entries: &'a [LedgerEntry]) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            if entries.is_empty() {
                return Ok(0);
            }
            let mut tx = self.begin_write().await?;
            let entries: Vec<&LedgerEntry> = entries.iter().collect();
            let inserted = count_new(&insert_lines(&mut tx, &entries).await?);
            tx.commit().await?;
            Ok(inserted)
        })
    }

    fn charge<'a>(&'a self, charges: &'a [Charge]) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            if charges.is_empty() {
                return Ok(0);
            }
            let mut tx = self.begin_write().await?;
            let entries: Vec<&LedgerEntry> = charges.iter().map(|c| &c.entry).collect();
            let new = insert_lines(&mut tx, &entries).await?;
            let mut usage = BTreeMap::new();
            add_lease_usage(charges, &new, &mut usage);
            for ((org_id, lease_id), used) in usage {
                sqlx::query("UPDATE credit_leases SET used_nanos = used_nanos + ? WHERE id = ? AND org_id = ?")
                    .bind(used)
                    .bind(lease_id)
                    .bind(org_id)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(count_new(&new))
        })
    }

    fn balance<'a>(&'a self, org_id: &'a str) -> BoxFuture<'a, Result<i64, StoreError>> {
        Box::pin(async move {
            let (sum,): (i64,) =
                sqlx::query_as("SELECT COALESCE(SUM(balance_nanos), 0) FROM org_balances WHERE org_id = ?")
                    .bind(org_id)
                    .fetch_one(&self.pool)
                    .await?;
            Ok(sum)
        })
    }

    fn totals<'a>(&'a self, org_id: &'a str) -> BoxFuture<'a, Result<(i64, i64), StoreError>> {
        Box::pin(async move {
            Ok(sqlx::query_as(
                "SELECT COALESCE(SUM(balance_nanos), 0), COALESCE(SUM(usage_nanos), 0) \
                 FROM org_balances WHERE org_id = ?",
            )
            .bind(org_id)
            .fetch_one(&self.pool)
            .await?)
        })
    }

    fn available<'a>(&'a self, org_id: &'a str, now_ms: i64) -> BoxFuture<'a, Result<i64, StoreError>> {
        Box::pin(async move {
            let mut conn = self.pool.acquire().await?;
            let (balance, reserved) = balance_and_reserved(&mut conn, org_id, now_ms).await?;
            Ok(available(balance, reserved))
        })
    }

    fn open_lease<'a>(&'a self, lease: &'a LeaseRecord) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            if lease.amount_nanos < 0 {
                return Ok(false);
            }
            let mut tx = self.begin_write().await?;
            let org: Option<(String,)> = sqlx::query_as("SELECT id FROM orgs WHERE id = ?")
                .bind(&lease.org_id)
                .fetch_optional(&mut *tx)
                .await?;
            if org.is_none() {
                return Ok(false);
            }
            let (balance, reserved) = balance_and_reserved(&mut tx, &lease.org_id, lease.created_at_ms).await?;
            if available(balance, reserved) < lease.amount_nanos {
                return Ok(false);
            }
            sqlx::query(&format!(
                "INSERT INTO credit_leases ({LEASE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            ))
            .bind(&lease.id)
            .bind(&lease.org_id)
            .bind(lease.amount_nanos)
            .bind(lease.used_nanos)
            .bind(&lease.holder)
            .bind(lease.expires_at_ms)
            .bind(lease.closed)
            .bind(lease.created_at_ms)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    fn renew_lease<'a>(&'a self, id: &'a str, expires_at_ms: i64) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            // An expired lease stays expired: its credit may already be leased to someone else.
            let done = sqlx::query(
                "UPDATE credit_leases SET expires_at_ms = ? WHERE id = ? AND closed = 0 AND expires_at_ms > ?",
            )
            .bind(expires_at_ms)
            .bind(id)
            .bind(crate::sql::unix_now_ms())
            .execute(&self.pool)
            .await?;
            Ok(done.rows_affected() > 0)
        })
    }

    fn close_lease<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            sqlx::query("UPDATE credit_leases SET closed = 1 WHERE id = ?")
                .bind(id)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
    }

    fn get_lease<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<LeaseRecord>, StoreError>> {
        Box::pin(async move {
            let sql = format!("SELECT {LEASE_COLUMNS} FROM credit_leases WHERE id = ?");
            Ok(sqlx::query_as(&sql).bind(id).fetch_optional(&self.pool).await?)
        })
    }

    fn member_spend_since<'a>(&'a self, org_id: &'a str, user_id: &'a str, since_ms: i64) -> BoxFuture<'a, Result<i64, StoreError>> {
        Box::pin(async move {
            let (spent,): (i64,) =
                spend_query::<Sqlite>(org_id, SpendScope::Member(user_id), since_ms).build_query_as().fetch_one(&self.pool).await?;
            Ok(spent)
        })
    }

    fn workspace_spend_since<'a>(
        &'a self,
        org_id: &'a str,
        workspace_id: &'a str,
        since_ms: i64,
    ) -> BoxFuture<'a, Result<i64, StoreError>> {
        Box::pin(async move {
            let scope = SpendScope::Workspace(workspace_id);
            let (spent,): (i64,) = spend_query::<Sqlite>(org_id, scope, since_ms).build_query_as().fetch_one(&self.pool).await?;
            Ok(spent)
        })
    }

    fn spend_since<'a>(
        &'a self,
        org_id: &'a str,
        key_id: Option<&'a str>,
        since_ms: i64,
    ) -> BoxFuture<'a, Result<i64, StoreError>> {
        Box::pin(async move {
            let scope = key_id.map_or(SpendScope::Org, SpendScope::Key);
            let (spent,): (i64,) = spend_query::<Sqlite>(org_id, scope, since_ms).build_query_as().fetch_one(&self.pool).await?;
            Ok(spent)
        })
    }

    fn entries<'a>(
        &'a self,
        org_id: &'a str,
        before: Option<i64>,
        limit: i64,
    ) -> BoxFuture<'a, Result<Vec<LedgerEntry>, StoreError>> {
        Box::pin(async move {
            let sql = format!(
                "SELECT {LEDGER_COLUMNS} FROM ledger_entries WHERE org_id = ? AND id < ? ORDER BY id DESC LIMIT ?"
            );
            Ok(sqlx::query_as(&sql)
                .bind(org_id)
                .bind(before.unwrap_or(i64::MAX))
                .bind(limit.max(0))
                .fetch_all(&self.pool)
                .await?)
        })
    }
}
