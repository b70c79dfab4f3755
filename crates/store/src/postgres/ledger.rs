//! Postgres: the append-only ledger and credit leases.
//!
//! `open_lease` locks the org's row (`FOR NO KEY UPDATE`) before it reads the balance and the
//! live leases, so "is the lease covered?" and "insert it" are one step with respect to every
//! other `open_lease` of that org, on any connection of any instance. Under READ COMMITTED
//! each statement takes a fresh snapshot, so the sums read after the lock is granted include
//! the lease the previous holder of the lock committed.
//!
//! Postgres' `SUM(bigint)` is `numeric` (exact); it is cast back to `BIGINT`, which raises an
//! error rather than wrap if a sum ever left the `i64` range.

use std::collections::{BTreeMap, HashSet};
use std::sync::LazyLock;

use sqlx::{PgConnection, Postgres};

use super::PgStore;
use crate::sql::{
    add_lease_usage, available, balance_deltas, balance_upserts, count_new, ledger_arguments, new_lines, spend_deltas, spend_query,
    spend_upserts, LineKey, MultiRowSql, SpendScope, LEASE_COLUMNS, LEDGER_COLUMNS, LEDGER_INSERT_COLUMNS,
};
use crate::{BoxFuture, Charge, LeaseRecord, LedgerEntry, LedgerRepo, StoreError};

static INSERT: LazyLock<MultiRowSql> = LazyLock::new(|| {
    let tail = "ON CONFLICT (org_id, kind, reference) DO NOTHING RETURNING org_id, kind, reference";
    MultiRowSql::insert("ledger_entries", LEDGER_INSERT_COLUMNS, tail).numbered()
});

/// `(balance, reserved)` of the org at `now_ms`: the sum of its lines (kept in `org_balances`),
/// and the unused part of its live leases.
async fn balance_and_reserved(conn: &mut PgConnection, org_id: &str, now_ms: i64) -> Result<(i64, i64), StoreError> {
    Ok(sqlx::query_as(
        "SELECT \
           (SELECT COALESCE(SUM(balance_nanos), 0)::BIGINT FROM org_balances WHERE org_id = $1), \
           (SELECT COALESCE(SUM(GREATEST(amount_nanos - used_nanos, 0)), 0)::BIGINT FROM credit_leases \
              WHERE org_id = $1 AND NOT closed AND expires_at_ms > $2)",
    )
    .bind(org_id)
    .bind(now_ms)
    .fetch_one(conn)
    .await?)
}

impl PgStore {
    /// Inserts `entries` (a line that exists already is skipped), adds the new lines to this
    /// instance's rows of `org_balances` and `spend_buckets`, in key order, and says which lines
    /// are new ([`new_lines`]).
    async fn insert_lines(&self, tx: &mut PgConnection, entries: &[&LedgerEntry]) -> Result<Vec<bool>, StoreError> {
        let mut inserted = HashSet::new();
        for (sql, chunk) in INSERT.pieces(entries) {
            let keys: Vec<LineKey> = sqlx::query_as_with(sql, ledger_arguments::<Postgres>(chunk)?).fetch_all(&mut *tx).await?;
            inserted.extend(keys);
        }
        let new = new_lines(entries, &inserted);
        for mut upsert in balance_upserts::<Postgres>(&balance_deltas(entries, &new), self.balance_shard) {
            upsert.build().execute(&mut *tx).await?;
        }
        for mut upsert in spend_upserts::<Postgres>(&spend_deltas(entries, &new), self.balance_shard) {
            upsert.build().execute(&mut *tx).await?;
        }
        Ok(new)
    }
}

impl LedgerRepo for PgStore {
    fn append<'a>(&'a self, entries: &'a [LedgerEntry]) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            if entries.is_empty() {
                return Ok(0);
            }
            let mut tx = self.pool.begin().await?;
            let entries: Vec<&LedgerEntry> = entries.iter().collect();
            let new = self.insert_lines(&mut tx, &entries).await?;
            tx.commit().await?;
            Ok(count_new(&new))
        })
    }

    fn charge<'a>(&'a self, charges: &'a [Charge]) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            if charges.is_empty() {
                return Ok(0);
            }
            let mut tx = self.pool.begin().await?;
            let entries: Vec<&LedgerEntry> = charges.iter().map(|c| &c.entry).collect();
            let new = self.insert_lines(&mut tx, &entries).await?;
            let mut usage = BTreeMap::new();
            add_lease_usage(charges, &new, &mut usage);
            for ((org_id, lease_id), used) in usage {
                sqlx::query("UPDATE credit_leases SET used_nanos = used_nanos + $1 WHERE id = $2 AND org_id = $3")
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
                sqlx::query_as("SELECT COALESCE(SUM(balance_nanos), 0)::BIGINT FROM org_balances WHERE org_id = $1")
                    .bind(org_id)
                    .fetch_one(&self.pool)
                    .await?;
            Ok(sum)
        })
    }

    fn totals<'a>(&'a self, org_id: &'a str) -> BoxFuture<'a, Result<(i64, i64), StoreError>> {
        Box::pin(async move {
            Ok(sqlx::query_as(
                "SELECT COALESCE(SUM(balance_nanos), 0)::BIGINT, COALESCE(SUM(usage_nanos), 0)::BIGINT \
                 FROM org_balances WHERE org_id = $1",
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
            let mut tx = self.pool.begin().await?;
            // The lock that serialises the lease openings of this org. `NO KEY UPDATE` rather
            // than `UPDATE`: it excludes other `open_lease` calls just the same but not the
            // `KEY SHARE` locks that inserting ledger lines (foreign key checks) takes, so
            // charges and top-ups never wait for it.
            let org: Option<(String,)> = sqlx::query_as("SELECT id FROM orgs WHERE id = $1 FOR NO KEY UPDATE")
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
                "INSERT INTO credit_leases ({LEASE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
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
                "UPDATE credit_leases SET expires_at_ms = $1 WHERE id = $2 AND NOT closed AND expires_at_ms > $3",
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
            sqlx::query("UPDATE credit_leases SET closed = TRUE WHERE id = $1")
                .bind(id)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
    }

    fn get_lease<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<LeaseRecord>, StoreError>> {
        Box::pin(async move {
            let sql = format!("SELECT {LEASE_COLUMNS} FROM credit_leases WHERE id = $1");
            Ok(sqlx::query_as(&sql).bind(id).fetch_optional(&self.pool).await?)
        })
    }

    fn member_spend_since<'a>(&'a self, org_id: &'a str, user_id: &'a str, since_ms: i64) -> BoxFuture<'a, Result<i64, StoreError>> {
        Box::pin(async move {
            let (spent,): (i64,) =
                spend_query::<Postgres>(org_id, SpendScope::Member(user_id), since_ms).build_query_as().fetch_one(&self.pool).await?;
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
            let (spent,): (i64,) = spend_query::<Postgres>(org_id, scope, since_ms).build_query_as().fetch_one(&self.pool).await?;
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
            let (spent,): (i64,) = spend_query::<Postgres>(org_id, scope, since_ms).build_query_as().fetch_one(&self.pool).await?;
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
                "SELECT {LEDGER_COLUMNS} FROM ledger_entries WHERE org_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3"
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
