//! [`RateRepo`] on SQLite: read and bump a window's count in one `BEGIN IMMEDIATE`
//! transaction. (With SQLite there is one instance and the gateway counts in memory; this
//! exists so that every store method has both implementations and the same tests.)

use super::SqliteStore;
use crate::rates::{RateClaim, RateGrant, RateRepo};
use crate::{BoxFuture, StoreError};

impl RateRepo for SqliteStore {
    fn claim_rate<'a>(&'a self, claim: &'a RateClaim) -> BoxFuture<'a, Result<RateGrant, StoreError>> {
        Box::pin(async move {
            let mut tx = self.begin_write().await?;
            let count_of = "SELECT count FROM rate_windows WHERE scope = ? AND window_start_ms = ?";
            let count: Option<i64> = sqlx::query_scalar(count_of)
                .bind(&claim.scope)
                .bind(claim.window_start_ms)
                .fetch_optional(&mut *tx)
                .await?;
            let previous: Option<i64> = match claim.previous_start_ms {
                Some(start) => sqlx::query_scalar(count_of).bind(&claim.scope).bind(start).fetch_optional(&mut *tx).await?,
                None => None,
            };
            let grant = RateGrant::compute(claim, count.unwrap_or(0), previous.unwrap_or(0));
            if grant.granted > 0 {
                sqlx::query(
                    "INSERT INTO rate_windows (scope, window_start_ms, count, last_granted) VALUES (?, ?, ?, ?) \
                     ON CONFLICT (scope, window_start_ms) DO UPDATE SET count = excluded.count, \
                     last_granted = excluded.last_granted",
                )
                .bind(&claim.scope)
                .bind(claim.window_start_ms)
                .bind(grant.count)
                .bind(grant.granted)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(grant)
        })
    }

    fn prune_rate_windows(&self, before_ms: i64) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let done = sqlx::query("DELETE FROM rate_windows WHERE window_start_ms < ?")
                .bind(before_ms)
                .execute(&self.pool)
                .await?;
            Ok(done.rows_affected())
        })
    }
}
