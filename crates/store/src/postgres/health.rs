//! [`HealthRepo`] on Postgres.

use sqlx::{QueryBuilder, Postgres};

use super::PgStore;
use crate::health::{HealthRepo, RouteHealthRecord};
use crate::{BoxFuture, StoreError};

impl HealthRepo for PgStore {
    fn put_route_health<'a>(&'a self, records: &'a [RouteHealthRecord]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if records.is_empty() {
                return Ok(());
            }
            let mut builder = QueryBuilder::<Postgres>::new(format!("INSERT INTO route_health ({}) ", crate::sql::HEALTH_COLUMNS));
            builder.push_values(records, |mut row, r| {
                row.push_bind(r.route.clone())
                    .push_bind(r.instance.clone())
                    .push_bind(r.open_until_ms)
                    .push_bind(r.failure_ppm)
                    .push_bind(r.latency_us)
                    .push_bind(r.updated_at_ms);
            });
            builder.push(crate::sql::HEALTH_UPSERT);
            builder.build().persistent(false).execute(&self.pool).await?;
            Ok(())
        })
    }

    fn route_health_since(&self, since_ms: i64) -> BoxFuture<'_, Result<Vec<RouteHealthRecord>, StoreError>> {
        Box::pin(async move {
            let sql = format!("SELECT {} FROM route_health WHERE updated_at_ms > $1", crate::sql::HEALTH_COLUMNS);
            Ok(sqlx::query_as(&sql).bind(since_ms).fetch_all(&self.pool).await?)
        })
    }
}
