//! Postgres: usage analytics queries and the rollup upserts (SQL shared in `crate::usage`).

use std::sync::LazyLock;

use sqlx::postgres::PgArguments;
use sqlx::{Postgres, Transaction};

use super::PgStore;
use crate::sql::{MultiRowSql, GENERATION_COLUMNS};
use crate::usage::{
    events_sql, numbered, rollup_deltas, routes_upsert, routes_upsert_binds, usage_rows_sql,
    usage_upsert, usage_upsert_binds, Bind, EventsPage, ModelTokens, RouteStats, UsageQuery, UsageRepo, UsageRow,
    EVENT_CURSOR_SQL, MODEL_TOKENS_SQL, ROUTE_LATENCIES_SQL, ROUTE_STATS_SQL,
};
use crate::{BoxFuture, GenerationRecord, StoreError};

fn arguments(binds: Vec<Bind>) -> PgArguments {
    use sqlx::Arguments;
    let mut args = PgArguments::default();
    for b in binds {
        // Adding a String or an i64 cannot fail (the error is for encoders that can).
        let _ = match b {
            Bind::Text(s) => args.add(s),
            Bind::Int(i) => args.add(i),
        };
    }
    args
}

/// Adds to the rollups what the records the insert added (`new`) count (same transaction).
pub(super) async fn add_to_rollups(
    tx: &mut Transaction<'static, Postgres>,
    records: &[GenerationRecord],
    new: &[bool],
) -> Result<(), StoreError> {
    static USAGE_UPSERT: LazyLock<MultiRowSql> = LazyLock::new(|| usage_upsert().numbered());
    static ROUTES_UPSERT: LazyLock<MultiRowSql> = LazyLock::new(|| routes_upsert().numbered());
    let deltas = rollup_deltas(records, new);
    for (sql, rows) in USAGE_UPSERT.pieces(&deltas.usage) {
        sqlx::query_with(sql, arguments(usage_upsert_binds(rows))).execute(&mut **tx).await?;
    }
    for (sql, rows) in ROUTES_UPSERT.pieces(&deltas.routes) {
        sqlx::query_with(sql, arguments(routes_upsert_binds(rows))).execute(&mut **tx).await?;
    }
    Ok(())
}

impl UsageRepo for PgStore {
    fn org_generation<'a>(&'a self, org_id: &'a str, id: &'a str) -> BoxFuture<'a, Result<Option<GenerationRecord>, StoreError>> {
        Box::pin(async move {
            let sql = format!("SELECT {GENERATION_COLUMNS} FROM generations WHERE id = $1 AND org_id = $2");
            Ok(sqlx::query_as(&sql).bind(id).bind(org_id).fetch_optional(&self.pool).await?)
        })
    }

    fn generation_events<'a>(
        &'a self,
        org_id: &'a str,
        before: Option<&'a str>,
        limit: u32,
    ) -> BoxFuture<'a, Result<Option<EventsPage>, StoreError>> {
        Box::pin(async move {
            let Some(before) = before else {
                let sql = numbered(&events_sql(GENERATION_COLUMNS, false));
                let rows = sqlx::query_as(&sql).bind(org_id).bind(i64::from(limit)).fetch_all(&self.pool).await?;
                return Ok(Some(rows));
            };
            let cursor: Option<(i64,)> =
                sqlx::query_as(&numbered(EVENT_CURSOR_SQL)).bind(org_id).bind(before).fetch_optional(&self.pool).await?;
            let Some((at,)) = cursor else { return Ok(None) };
            let sql = numbered(&events_sql(GENERATION_COLUMNS, true));
            let rows = sqlx::query_as(&sql)
                .bind(org_id)
                .bind(at)
                .bind(at)
                .bind(before)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
            Ok(Some(rows))
        })
    }

    fn usage_rows<'a>(&'a self, query: &'a UsageQuery<'a>) -> BoxFuture<'a, Result<Vec<UsageRow>, StoreError>> {
        Box::pin(async move {
            let (sql, binds) = usage_rows_sql(query);
            let sql = numbered(&sql);
            Ok(sqlx::query_as_with(&sql, arguments(binds)).fetch_all(&self.pool).await?)
        })
    }

    fn model_tokens(&self, since_day: i64) -> BoxFuture<'_, Result<Vec<ModelTokens>, StoreError>> {
        Box::pin(async move { Ok(sqlx::query_as(&numbered(MODEL_TOKENS_SQL)).bind(since_day).fetch_all(&self.pool).await?) })
    }

    fn route_stats<'a>(&'a self, model: &'a str, since_day: i64) -> BoxFuture<'a, Result<Vec<RouteStats>, StoreError>> {
        Box::pin(async move { Ok(sqlx::query_as(&numbered(ROUTE_STATS_SQL)).bind(model).bind(since_day).fetch_all(&self.pool).await?) })
    }

    fn route_latencies<'a>(
        &'a self,
        model: &'a str,
        since_ms: i64,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<(String, i64)>, StoreError>> {
        Box::pin(async move {
            Ok(sqlx::query_as(&numbered(ROUTE_LATENCIES_SQL))
                .bind(model)
                .bind(since_ms)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?)
        })
    }
}
