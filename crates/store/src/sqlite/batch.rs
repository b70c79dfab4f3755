//! [`FileRepo`] and [`BatchRepo`] on SQLite. Items are claimed by one `UPDATE … RETURNING`:
//! SQLite runs it under its single write lock, so two workers never claim one item.

use super::SqliteStore;

const CLAIM_SQL: &str = "UPDATE batch_items SET state = 'running', owner = ?, lease_until_ms = ?, attempts = attempts + 1 \
     WHERE rowid IN (SELECT i.rowid FROM batch_items i JOIN batches b ON b.id = i.batch_id \
         WHERE b.status = 'in_progress' AND b.lane = 'realtime' AND b.expires_at_ms > ? AND (i.state = 'pending' OR (i.state = 'running' AND i.lease_until_ms < ?)) \
         ORDER BY b.id, i.idx LIMIT ?) \
     RETURNING batch_id, idx, custom_id, body, attempts";

const CLAIM_DELIVERIES_SQL: &str = "UPDATE webhook_deliveries SET owner = ?, lease_until_ms = ? \
     WHERE id IN (SELECT id FROM webhook_deliveries WHERE state = 'pending' AND next_at_ms <= ? AND lease_until_ms < ? \
         ORDER BY next_at_ms LIMIT ?) \
     RETURNING id, batch_id, url, secret, body, attempts, max_attempts, next_at_ms, state";

crate::batch_sql::batch_repos!(SqliteStore, sqlx::Sqlite, crate::batch_sql::plain, CLAIM_SQL, CLAIM_DELIVERIES_SQL);
