//! Postgres: the request log (and its rollups, in the same transaction) and saved fallback chains.

use std::collections::HashSet;
use std::sync::LazyLock;

use sqlx::Postgres;

use super::PgStore;
use crate::sql::{generation_arguments, MultiRowSql, GENERATION_COLUMNS};
use crate::usage::new_records;
use crate::{BoxFuture, ChainRecord, ChainRepo, GenerationRecord, GenerationRepo, StoreError};

static INSERT: LazyLock<MultiRowSql> = LazyLock::new(|| {
    MultiRowSql::insert("generations", GENERATION_COLUMNS, "ON CONFLICT (id) DO NOTHING RETURNING id").numbered()
});

impl GenerationRepo for PgStore {
    fn insert_generations<'a>(&'a self, records: &'a [GenerationRecord]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if records.is_empty() {
                return Ok(());
            }
            let mut tx = self.pool.begin().await?;
            let mut inserted = HashSet::with_capacity(records.len());
            for (sql, batch) in INSERT.pieces(records) {
                let args = generation_arguments::<Postgres>(batch)?;
                let ids: Vec<(String,)> = sqlx::query_as_with(sql, args).fetch_all(&mut *tx).await?;
                inserted.extend(ids.into_iter().map(|(id,)| id));
            }
            super::usage::add_to_rollups(&mut tx, records, &new_records(records, &inserted)).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn get_generation<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<GenerationRecord>, StoreError>> {
        Box::pin(async move {
            let sql = format!("SELECT {GENERATION_COLUMNS} FROM generations WHERE id = $1");
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

impl ChainRepo for PgStore {
    fn list_chains(&self) -> BoxFuture<'_, Result<Vec<ChainRecord>, StoreError>> {
        Box::pin(async move {
            let sql = "SELECT org_id, model, steps, updated_at_ms FROM routing_chains ORDER BY org_id, model";
            Ok(sqlx::query_as(sql).fetch_all(&self.pool).await?)
        })
    }

    fn put_chain<'a>(&'a self, chain: &'a ChainRecord) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO routing_chains (org_id, model, steps, updated_at_ms) VALUES ($1, $2, $3, $4) \
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
            let done = sqlx::query("DELETE FROM routing_chains WHERE org_id = $1 AND model = $2")
                .bind(org_id)
                .bind(model)
                .execute(&self.pool)
                .await?;
            Ok(done.rows_affected() > 0)
        })
    }
}
