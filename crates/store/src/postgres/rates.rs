//! [`RateRepo`] on Postgres: the window's row is created if missing, then locked
//! (`FOR UPDATE`), so concurrent claims of one window — from any instance — queue up and each
//! sees the count the previous one committed.

use super::PgStore;
use crate::rates::{RateClaim, RateGrant, RateRepo};
use crate::{BoxFuture, StoreError};

impl RateRepo for PgStore {
    fn claim_rate<'a>(&'a self, claim: &'a RateClaim) -> BoxFuture<'a, Result<RateGrant, StoreError>> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await?;
            sqlx::query(
                "INSERT INTO rate_windows (scope, window_start_ms, count) VALUES ($1, $2, 0) \
                 ON CONFLICT (scope, window_start_ms) DO NOTHING",
            )
            .bind(&claim.scope)
            .bind(claim.window_start_ms)
            .execute(&mut *tx)
            .await?;
            let count: i64 = sqlx::query_scalar("SELECT count FROM rate_windows WHERE scope = $1 AND window_start_ms = $2 FOR UPDATE")
                .bind(&claim.scope)
                .bind(claim.window_start_ms)
                .fetch_one(&mut *tx)
                .await?;
            let previous: Option<i64> = match claim.previous_start_ms {
                Some(start) => {
                    sqlx::query_scalar("SELECT count FROM rate_windows WHERE scope = $1 AND window_start_ms = $2")
                        .bind(&claim.scope)
                        .bind(start)
                        .fetch_optional(&mut *tx)
                        .await?
                }
                None => None,
            };
            let grant = RateGrant::compute(claim, count, previous.unwrap_or(0));
            if grant.granted > 0 {
                sqlx::query("UPDATE rate_windows SET count = $1 WHERE scope = $2 AND window_start_ms = $3")
                    .bind(grant.count)
                    .bind(&claim.scope)
                    .bind(claim.window_start_ms)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(grant)
        })
    }

    fn prune_rate_windows(&self, before_ms: i64) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let done = sqlx::query("DELETE FROM rate_windows WHERE window_start_ms < $1")
                .bind(before_ms)
                .execute(&self.pool)
                .await?;
            Ok(done.rows_affected())
        })
    }
}
