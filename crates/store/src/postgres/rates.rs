//! [`RateRepo`] on Postgres: a claim is one `INSERT … ON CONFLICT DO UPDATE` statement (one
//! round trip). The upsert locks the window's row and computes the grant from the row's latest
//! committed count, so concurrent claims of one window — from any instance — queue up on the
//! row and each sees what the previous one granted. The previous window's count is read in the
//! same statement (it no longer changes, but for claims racing a minute boundary, which at
//! worst carry a little less).

use super::PgStore;
use crate::rates::{RateClaim, RateGrant, RateRepo};
use crate::{BoxFuture, StoreError};

/// `$1` scope, `$2` window start, `$3` previous window start (NULL: none), `$4` carry weight in
/// millionths, `$5` wanted, `$6` limit. The grant is `min(want, limit − carried − count)`, never
/// negative, as [`RateGrant::compute`] computes it.
const CLAIM: &str = "\
WITH carried AS (
    SELECT (COALESCE((SELECT count FROM rate_windows WHERE scope = $1 AND window_start_ms = $3), 0) * $4 + 999999)
           / 1000000 AS c
)
INSERT INTO rate_windows AS w (scope, window_start_ms, count, last_granted)
SELECT $1, $2, g, g FROM (SELECT LEAST($5, GREATEST(0, $6 - c)) AS g FROM carried) AS first
ON CONFLICT (scope, window_start_ms) DO UPDATE
SET last_granted = LEAST($5, GREATEST(0, $6 - (SELECT c FROM carried) - w.count)),
    count = w.count + LEAST($5, GREATEST(0, $6 - (SELECT c FROM carried) - w.count))
RETURNING w.last_granted, w.count, (SELECT c FROM carried)";

impl RateRepo for PgStore {
    fn claim_rate<'a>(&'a self, claim: &'a RateClaim) -> BoxFuture<'a, Result<RateGrant, StoreError>> {
        Box::pin(async move {
            let (granted, count, carried): (i64, i64, i64) = sqlx::query_as(CLAIM)
                .bind(&claim.scope)
                .bind(claim.window_start_ms)
                .bind(claim.previous_start_ms)
                .bind(claim.carry_ppm.clamp(0, 1_000_000))
                .bind(claim.want.max(0))
                .bind(claim.limit)
                .fetch_one(&self.pool)
                .await?;
            Ok(RateGrant { granted, count, carried })
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
