//! SQLite: the request log (and its rollups, in the same transaction) and saved fallback chains.

use std::sync::LazyLock;

use sqlx::Sqlite;

use super::SqliteStore;
use crate::sql::{generation_arguments, MultiRowSql, GENERATION_COLUMNS};
use crate::usage::new_records;
use crate::{BoxFuture, ChainRecord, ChainRepo, GenerationRecord, GenerationRepo, StoreError};

static INSERT: LazyLock<MultiRowSql> =
    LazyLock::new(|| MultiRowSql::insert("generations", GENERATION_COLUMNS, "ON CONFLICT (id) DO NOTHING"));

impl GenerationRepo for SqliteStore {
    fn insert_generations<'a>(&'a self, records: &'a [GenerationRecord]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if records.is_empty() {
                return Ok(());
            }
            let mut tx = self.begin_write().await?;
            // Which records the insert added (normally all; a replayed spill file may repeat
            // some) is known without asking about each id: the row counts say when all were
            // added, else the rows above the largest rowid before are the new ones (the
            // transaction holds the write lock). Asking first which ids exist cost a primary-key
            // probe per record on top of the insert's own; `RETURNING` would stream every row
            // back through sqlx's worker channel, one hand-off per row.
            let (last_rowid_before,): (i64,) =
                sqlx::query_as("SELECT COALESCE(MAX(rowid), 0) FROM generations").fetch_one(&mut *tx).await?;
            let mut added = 0;
            for (sql, batch) in INSERT.pieces(records) {
                let args = generation_arguments::<Sqlite>(batch)?;
                added += sqlx::query_with(sql, args).execute(&mut *tx).await?.rows_affected();
            }
            let new = if added == records.len() as u64 {
                vec![true; records.len()]
            } else {
                let ids: Vec<(String,)> = sqlx::query_as("SELECT id FROM generations WHERE rowid > ?")
                    .bind(last_rowid_before)
                    .fetch_all(&mut *tx)
                    .await?;
                new_records(records, &ids.into_iter().map(|(id,)| id).collect())
            };
            super::usage::add_to_rollups(&mut tx, records, &new).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn get_generation<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<GenerationRecord>, StoreError>> {
        Box::pin(async move {
            let sql = format!("SELECT {GENERATION_COLUMNS} FROM generations WHERE id = ?");
            Ok(sqlx::query_as(&sql).bind(id).fetch_optional(&self.pool).await?)
        })
    }

    fn count_generations(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM generations")
                .fetch_one(&self.pool)
                .await?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }
}

impl ChainRepo for SqliteStore {
    fn list_chains(&self) -> BoxFuture<'_, Result<Vec<ChainRecord>, StoreError>> {
        Box::pin(async move {
            let sql = "SELECT org_id, model, steps, updated_at_ms FROM routing_chains ORDER BY org_id, model";
            Ok(sqlx::query_as(sql).fetch_all(&self.pool).await?)
        })
    }

    fn put_chain<'a>(&'a self, chain: &'a ChainRecord) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO routing_chains (org_id, model, steps, updated_at_ms) VALUES (?, ?, ?, ?) \
                 ON CONFLICT (org_id, model) DO UPDATE SET steps = excluded.steps, updated_at_ms = excluded.updated_at_ms",
            )
            .bind(&chain.org_id)
            .bind(&chain.model)
            .bind(&chain.steps)
            .bind(chain.updated_at_ms)
            .execute(&self.pool)
            .await?;
            Ok(())
        })
    }

    fn delete_chain<'a>(&'a self, org_id: &'a str, model: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let done = sqlx::query("DELETE FROM routing_chains WHERE org_id = ? AND model = ?")
                .bind(org_id)
                .bind(model)
                .execute(&self.pool)
                .await?;
            Ok(done.rows_affected() > 0)
        })
    }
}
