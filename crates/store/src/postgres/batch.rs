//! [`FileRepo`] and [`BatchRepo`] on Postgres. Items are claimed with
//! `SELECT … FOR UPDATE SKIP LOCKED`: instances sharing the database each take items no other
//! transaction holds, without waiting for each other.

use sqlx::{Postgres, Transaction};

use super::PgStore;

const CLAIM_SQL: &str = "WITH c AS (SELECT i.batch_id, i.idx FROM batch_items i JOIN batches b ON b.id = i.batch_id \
         WHERE b.status = 'in_progress' AND b.lane = 'realtime' AND b.expires_at_ms > $3 AND (i.state = 'pending' OR (i.state = 'running' AND i.lease_until_ms < $4)) \
         ORDER BY b.id, i.idx LIMIT $5 FOR UPDATE OF i SKIP LOCKED) \
     UPDATE batch_items t SET state = 'running', owner = $1, lease_until_ms = $2, attempts = t.attempts + 1 \
     FROM c WHERE t.batch_id = c.batch_id AND t.idx = c.idx \
     RETURNING t.batch_id, t.idx, t.custom_id, t.body, t.attempts";

impl PgStore {
    async fn begin_write(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        Ok(self.pool.begin().await?)
    }
}

const CLAIM_DELIVERIES_SQL: &str = "UPDATE webhook_deliveries SET owner = $1, lease_until_ms = $2 \
     WHERE id IN (SELECT id FROM webhook_deliveries WHERE state = 'pending' AND next_at_ms <= $3 AND lease_until_ms < $4 \
         ORDER BY next_at_ms LIMIT $5 FOR UPDATE SKIP LOCKED) \
     RETURNING id, batch_id, url, secret, body, attempts, max_attempts, next_at_ms, state";

crate::batch_sql::batch_repos!(PgStore, sqlx::Postgres, crate::batch_sql::numbered, CLAIM_SQL, CLAIM_DELIVERIES_SQL);
