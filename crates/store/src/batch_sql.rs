//! [`FileRepo`](crate::FileRepo) and [`BatchRepo`](crate::BatchRepo) for both backends, from
//! one macro: the statements are the same but for placeholders (`?` on SQLite, `$n` on
//! Postgres: [`numbered`]), how a write transaction starts (SQLite takes the write lock up
//! front) and how items are claimed (see each backend's `CLAIM_SQL`).

use std::borrow::Cow;

/// SQLite's statements as they are.
pub(crate) fn plain(sql: &'static str) -> Cow<'static, str> {
    Cow::Borrowed(sql)
}

/// Postgres placeholders: the n-th `?` becomes `$n`.
pub(crate) fn numbered(sql: &'static str) -> Cow<'static, str> {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Items inserted per statement at batch creation (4 parameters each).
pub(crate) const ITEM_CHUNK: usize = 500;

/// Whether any item is claimable (the claim's condition), read before claiming: the claim is
/// a write, and on SQLite a write takes the database's one write lock even when it changes
/// nothing, so a worker polling an idle queue under load queued behind (and ahead of) the
/// request log and the ledger every poll.
pub(crate) const ITEMS_DUE_SQL: &str = "SELECT 1 FROM batch_items i JOIN batches b ON b.id = i.batch_id \
     WHERE b.status = 'in_progress' AND b.lane = 'realtime' AND b.expires_at_ms > ? \
     AND (i.state = 'pending' OR (i.state = 'running' AND i.lease_until_ms < ?)) LIMIT 1";

/// Whether any webhook delivery is due (see [`ITEMS_DUE_SQL`]).
pub(crate) const DELIVERIES_DUE_SQL: &str =
    "SELECT 1 FROM webhook_deliveries WHERE state = 'pending' AND next_at_ms <= ? AND lease_until_ms < ? LIMIT 1";

macro_rules! batch_repos {
    ($store:ty, $db:ty, $q:path, $claim:expr, $claim_deliveries:expr) => {
        use sqlx::QueryBuilder;

        use crate::batch::{
            BatchRecord, BatchRepo, ClaimedItem, DeliveryRecord, DeliveryRepo, FileRecord, FileRepo, ItemResult, NewItem,
            BATCH_COLUMNS, BATCH_TIME_COLUMNS, DELIVERY_COLUMNS, FILE_COLUMNS,
        };
        use crate::batch_sql::ITEM_CHUNK;
        use crate::{BoxFuture, StoreError};

        impl FileRepo for $store {
            fn create_file<'a>(&'a self, f: &'a FileRecord) -> BoxFuture<'a, Result<(), StoreError>> {
                Box::pin(async move {
                    let sql = $q("INSERT INTO files (id, org_id, purpose, filename, bytes, lines, created_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?)");
                    sqlx::query(&sql)
                        .bind(&f.id)
                        .bind(&f.org_id)
                        .bind(&f.purpose)
                        .bind(&f.filename)
                        .bind(f.bytes)
                        .bind(f.lines)
                        .bind(f.created_at_ms)
                        .execute(&self.pool)
                        .await?;
                    Ok(())
                })
            }

            fn get_file<'a>(&'a self, org_id: &'a str, id: &'a str) -> BoxFuture<'a, Result<Option<FileRecord>, StoreError>> {
                Box::pin(async move {
                    let mut b = QueryBuilder::<$db>::new(format!("SELECT {FILE_COLUMNS} FROM files WHERE org_id = "));
                    b.push_bind(org_id).push(" AND id = ").push_bind(id);
                    Ok(b.build_query_as().fetch_optional(&self.pool).await?)
                })
            }

            fn list_files<'a>(
                &'a self,
                org_id: &'a str,
                purpose: Option<&'a str>,
                after: Option<&'a str>,
                limit: i64,
            ) -> BoxFuture<'a, Result<Vec<FileRecord>, StoreError>> {
                Box::pin(async move {
                    let mut b = QueryBuilder::<$db>::new(format!("SELECT {FILE_COLUMNS} FROM files WHERE org_id = "));
                    b.push_bind(org_id);
                    if let Some(purpose) = purpose {
                        b.push(" AND purpose = ").push_bind(purpose);
                    }
                    if let Some(after) = after {
                        b.push(" AND id < ").push_bind(after);
                    }
                    b.push(" ORDER BY id DESC LIMIT ").push_bind(limit);
                    Ok(b.build_query_as().fetch_all(&self.pool).await?)
                })
            }

            fn delete_file<'a>(&'a self, org_id: &'a str, id: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
                Box::pin(async move {
                    let sql = $q("DELETE FROM files WHERE org_id = ? AND id = ?");
                    let done = sqlx::query(&sql).bind(org_id).bind(id).execute(&self.pool).await?;
                    Ok(done.rows_affected() > 0)
                })
            }
        }

        impl BatchRepo for $store {
            fn create_batch<'a>(&'a self, batch: &'a BatchRecord, items: &'a [NewItem]) -> BoxFuture<'a, Result<(), StoreError>> {
                Box::pin(async move {
                    let mut tx = self.begin_write().await?;
                    let mut b = QueryBuilder::<$db>::new(format!("INSERT INTO batches ({BATCH_COLUMNS}) "));
                    b.push_values(std::iter::once(batch), |mut row, r| {
                        row.push_bind(&r.id)
                            .push_bind(&r.org_id)
                            .push_bind(&r.key_id)
                            .push_bind(&r.endpoint)
                            .push_bind(&r.input_file_id)
                            .push_bind(&r.completion_window)
                            .push_bind(&r.metadata)
                            .push_bind(&r.status)
                            .push_bind(r.total)
                            .push_bind(r.completed)
                            .push_bind(r.failed)
                            .push_bind(&r.output_file_id)
                            .push_bind(&r.error_file_id)
                            .push_bind(r.created_at_ms)
                            .push_bind(r.in_progress_at_ms)
                            .push_bind(r.finalizing_at_ms)
                            .push_bind(r.completed_at_ms)
                            .push_bind(r.cancelling_at_ms)
                            .push_bind(r.cancelled_at_ms)
                            .push_bind(r.expires_at_ms)
                            .push_bind(&r.idempotency_key)
                            .push_bind(&r.request_hash)
                            .push_bind(&r.webhook_url)
                            .push_bind(&r.webhook_secret)
                            .push_bind(&r.credit_lease_id)
                            .push_bind(&r.lane)
                            .push_bind(&r.lane_route)
                            .push_bind(&r.native_batch_id)
                            .push_bind(&r.rejected_lanes);
                    });
                    b.build().execute(&mut *tx).await?;
                    for (chunk_no, chunk) in items.chunks(ITEM_CHUNK).enumerate() {
                        let first = (chunk_no * ITEM_CHUNK) as i64;
                        let mut b = QueryBuilder::<$db>::new("INSERT INTO batch_items (batch_id, idx, custom_id, body, state) ");
                        b.push_values(chunk.iter().enumerate(), |mut row, (i, item)| {
                            row.push_bind(&batch.id)
                                .push_bind(first + i as i64)
                                .push_bind(&item.custom_id)
                                .push_bind(&item.body)
                                .push_bind("pending");
                        });
                        b.build().persistent(false).execute(&mut *tx).await?;
                    }
                    tx.commit().await?;
                    Ok(())
                })
            }

            fn get_batch<'a>(&'a self, org_id: &'a str, id: &'a str) -> BoxFuture<'a, Result<Option<BatchRecord>, StoreError>> {
                Box::pin(async move {
                    let mut b = QueryBuilder::<$db>::new(format!("SELECT {BATCH_COLUMNS} FROM batches WHERE org_id = "));
                    b.push_bind(org_id).push(" AND id = ").push_bind(id);
                    Ok(b.build_query_as().fetch_optional(&self.pool).await?)
                })
            }

            fn find_batch_by_key<'a>(&'a self, org_id: &'a str, key: &'a str) -> BoxFuture<'a, Result<Option<BatchRecord>, StoreError>> {
                Box::pin(async move {
                    let mut b = QueryBuilder::<$db>::new(format!("SELECT {BATCH_COLUMNS} FROM batches WHERE org_id = "));
                    b.push_bind(org_id).push(" AND idempotency_key = ").push_bind(key);
                    Ok(b.build_query_as().fetch_optional(&self.pool).await?)
                })
            }

            fn list_batches<'a>(
                &'a self,
                org_id: &'a str,
                after: Option<&'a str>,
                limit: i64,
            ) -> BoxFuture<'a, Result<Vec<BatchRecord>, StoreError>> {
                Box::pin(async move {
                    let mut b = QueryBuilder::<$db>::new(format!("SELECT {BATCH_COLUMNS} FROM batches WHERE org_id = "));
                    b.push_bind(org_id);
                    if let Some(after) = after {
                        b.push(" AND id < ").push_bind(after);
                    }
                    b.push(" ORDER BY id DESC LIMIT ").push_bind(limit);
                    Ok(b.build_query_as().fetch_all(&self.pool).await?)
                })
            }

            fn batches_in<'a>(&'a self, statuses: &'a [&'a str], limit: i64) -> BoxFuture<'a, Result<Vec<BatchRecord>, StoreError>> {
                Box::pin(async move {
                    let mut b = QueryBuilder::<$db>::new(format!("SELECT {BATCH_COLUMNS} FROM batches WHERE status IN ("));
                    let mut list = b.separated(", ");
                    for s in statuses {
                        list.push_bind(*s);
                    }
                    b.push(") ORDER BY id LIMIT ").push_bind(limit);
                    Ok(b.build_query_as().persistent(false).fetch_all(&self.pool).await?)
                })
            }

            fn claim_items<'a>(
                &'a self,
                owner: &'a str,
                now_ms: i64,
                lease_until_ms: i64,
                limit: i64,
            ) -> BoxFuture<'a, Result<Vec<ClaimedItem>, StoreError>> {
                Box::pin(async move {
                    let due = $q(crate::batch_sql::ITEMS_DUE_SQL);
                    let due: Option<(i32,)> = sqlx::query_as(&due).bind(now_ms).bind(now_ms).fetch_optional(&self.pool).await?;
                    if due.is_none() {
                        return Ok(Vec::new());
                    }
                    let claimed = sqlx::query_as($claim)
                        .bind(owner)
                        .bind(lease_until_ms)
                        .bind(now_ms)
                        .bind(now_ms)
                        .bind(limit)
                        .fetch_all(&self.pool)
                        .await?;
                    Ok(claimed)
                })
            }

            fn renew_items<'a>(
                &'a self,
                owner: &'a str,
                items: &'a [(String, i64)],
                lease_until_ms: i64,
            ) -> BoxFuture<'a, Result<(), StoreError>> {
                Box::pin(async move {
                    if items.is_empty() {
                        return Ok(());
                    }
                    let sql = $q("UPDATE batch_items SET lease_until_ms = ? WHERE batch_id = ? AND idx = ? AND owner = ? AND state = 'running'");
                    let mut tx = self.begin_write().await?;
                    for (batch_id, idx) in items {
                        sqlx::query(&sql).bind(lease_until_ms).bind(batch_id).bind(*idx).bind(owner).execute(&mut *tx).await?;
                    }
                    tx.commit().await?;
                    Ok(())
                })
            }

            fn complete_item<'a>(
                &'a self,
                batch_id: &'a str,
                idx: i64,
                owner: &'a str,
                result: &'a str,
                is_error: bool,
            ) -> BoxFuture<'a, Result<bool, StoreError>> {
                Box::pin(async move {
                    let error = i64::from(is_error);
                    let mut tx = self.begin_write().await?;
                    let mark = $q("UPDATE batch_items SET state = 'done', result = ?, is_error = ?, owner = NULL \
                         WHERE batch_id = ? AND idx = ? AND state = 'running' AND owner = ?");
                    let done = sqlx::query(&mark).bind(result).bind(error).bind(batch_id).bind(idx).bind(owner).execute(&mut *tx).await?;
                    if done.rows_affected() != 1 {
                        return Ok(false);
                    }
                    let count = $q("UPDATE batches SET completed = completed + ?, failed = failed + ? WHERE id = ?");
                    sqlx::query(&count).bind(1 - error).bind(error).bind(batch_id).execute(&mut *tx).await?;
                    tx.commit().await?;
                    Ok(true)
                })
            }

            fn set_batch_status<'a>(
                &'a self,
                id: &'a str,
                from: &'a [&'a str],
                to: &'a str,
                at_column: &'a str,
                now_ms: i64,
            ) -> BoxFuture<'a, Result<bool, StoreError>> {
                Box::pin(async move {
                    let Some(column) = BATCH_TIME_COLUMNS.iter().find(|c| **c == at_column) else { return Ok(false) };
                    let mut b = QueryBuilder::<$db>::new("UPDATE batches SET status = ");
                    b.push_bind(to).push(format!(", {column} = ")).push_bind(now_ms);
                    b.push(" WHERE id = ").push_bind(id).push(" AND status IN (");
                    let mut list = b.separated(", ");
                    for s in from {
                        list.push_bind(*s);
                    }
                    b.push(")");
                    let done = b.build().persistent(false).execute(&self.pool).await?;
                    Ok(done.rows_affected() > 0)
                })
            }

            fn cancel_pending_items<'a>(&'a self, batch_id: &'a str, now_ms: i64) -> BoxFuture<'a, Result<i64, StoreError>> {
                Box::pin(async move {
                    let cancel = $q("UPDATE batch_items SET state = 'cancelled', owner = NULL WHERE batch_id = ? \
                         AND (state = 'pending' OR (state = 'running' AND lease_until_ms < ?))");
                    sqlx::query(&cancel).bind(batch_id).bind(now_ms).execute(&self.pool).await?;
                    let running = $q("SELECT COUNT(*) FROM batch_items WHERE batch_id = ? AND state = 'running'");
                    let (n,): (i64,) = sqlx::query_as(&running).bind(batch_id).fetch_one(&self.pool).await?;
                    Ok(n)
                })
            }

            fn unfinished_items<'a>(&'a self, batch_id: &'a str) -> BoxFuture<'a, Result<i64, StoreError>> {
                Box::pin(async move {
                    let sql = $q("SELECT COUNT(*) FROM batch_items WHERE batch_id = ? AND state IN ('pending', 'running')");
                    let (n,): (i64,) = sqlx::query_as(&sql).bind(batch_id).fetch_one(&self.pool).await?;
                    Ok(n)
                })
            }

            fn item_results<'a>(
                &'a self,
                batch_id: &'a str,
                after_idx: i64,
                limit: i64,
            ) -> BoxFuture<'a, Result<Vec<ItemResult>, StoreError>> {
                Box::pin(async move {
                    let sql = $q("SELECT idx, COALESCE(result, '') AS result, is_error <> 0 AS is_error FROM batch_items \
                         WHERE batch_id = ? AND state = 'done' AND idx > ? ORDER BY idx LIMIT ?");
                    Ok(sqlx::query_as(&sql).bind(batch_id).bind(after_idx).bind(limit).fetch_all(&self.pool).await?)
                })
            }

            fn lease_native<'a>(
                &'a self,
                id: &'a str,
                owner: &'a str,
                now_ms: i64,
                lease_until_ms: i64,
            ) -> BoxFuture<'a, Result<bool, StoreError>> {
                Box::pin(async move {
                    let sql = $q("UPDATE batches SET native_owner = ?, native_lease_until_ms = ? WHERE id = ? AND lane = 'native' \
                         AND status = 'in_progress' AND (native_owner IS NULL OR native_owner = ? OR native_lease_until_ms < ?)");
                    let done = sqlx::query(&sql).bind(owner).bind(lease_until_ms).bind(id).bind(owner).bind(now_ms).execute(&self.pool).await?;
                    Ok(done.rows_affected() > 0)
                })
            }

            fn set_native_batch_id<'a>(&'a self, id: &'a str, owner: &'a str, native_id: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
                Box::pin(async move {
                    let sql = $q("UPDATE batches SET native_batch_id = ? WHERE id = ? AND lane = 'native' AND native_owner = ? AND native_batch_id IS NULL");
                    let done = sqlx::query(&sql).bind(native_id).bind(id).bind(owner).execute(&self.pool).await?;
                    Ok(done.rows_affected() > 0)
                })
            }

            fn fall_back_to_realtime<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
                Box::pin(async move {
                    let sql = $q("UPDATE batches SET lane = 'realtime', native_owner = NULL, native_lease_until_ms = 0 WHERE id = ? AND lane = 'native'");
                    let done = sqlx::query(&sql).bind(id).execute(&self.pool).await?;
                    Ok(done.rows_affected() > 0)
                })
            }

            fn pending_items<'a>(&'a self, batch_id: &'a str, after_idx: i64, limit: i64) -> BoxFuture<'a, Result<Vec<ClaimedItem>, StoreError>> {
                Box::pin(async move {
                    let sql = $q("SELECT batch_id, idx, custom_id, body, attempts FROM batch_items \
                         WHERE batch_id = ? AND state = 'pending' AND idx > ? ORDER BY idx LIMIT ?");
                    Ok(sqlx::query_as(&sql).bind(batch_id).bind(after_idx).bind(limit).fetch_all(&self.pool).await?)
                })
            }

            fn complete_native_item<'a>(
                &'a self,
                batch_id: &'a str,
                idx: i64,
                result: &'a str,
                is_error: bool,
            ) -> BoxFuture<'a, Result<bool, StoreError>> {
                Box::pin(async move {
                    let error = i64::from(is_error);
                    let mut tx = self.begin_write().await?;
                    let mark = $q("UPDATE batch_items SET state = 'done', result = ?, is_error = ?, owner = NULL \
                         WHERE batch_id = ? AND idx = ? AND state = 'pending'");
                    let done = sqlx::query(&mark).bind(result).bind(error).bind(batch_id).bind(idx).execute(&mut *tx).await?;
                    if done.rows_affected() != 1 {
                        return Ok(false);
                    }
                    let count = $q("UPDATE batches SET completed = completed + ?, failed = failed + ? WHERE id = ?");
                    sqlx::query(&count).bind(1 - error).bind(error).bind(batch_id).execute(&mut *tx).await?;
                    tx.commit().await?;
                    Ok(true)
                })
            }

            fn finish_batch<'a>(
                &'a self,
                id: &'a str,
                status: &'a str,
                output: Option<&'a FileRecord>,
                errors: Option<&'a FileRecord>,
                now_ms: i64,
            ) -> BoxFuture<'a, Result<bool, StoreError>> {
                Box::pin(async move {
                    let mut tx = self.begin_write().await?;
                    let insert = $q("INSERT INTO files (id, org_id, purpose, filename, bytes, lines, created_at_ms) \
                         VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING");
                    for f in output.into_iter().chain(errors) {
                        sqlx::query(&insert)
                            .bind(&f.id)
                            .bind(&f.org_id)
                            .bind(&f.purpose)
                            .bind(&f.filename)
                            .bind(f.bytes)
                            .bind(f.lines)
                            .bind(f.created_at_ms)
                            .execute(&mut *tx)
                            .await?;
                    }
                    let column = if status == "cancelled" { "cancelled_at_ms" } else { "completed_at_ms" };
                    let mut b = QueryBuilder::<$db>::new("UPDATE batches SET status = ");
                    b.push_bind(status);
                    b.push(", output_file_id = ").push_bind(output.map(|f| f.id.clone()));
                    b.push(", error_file_id = ").push_bind(errors.map(|f| f.id.clone()));
                    b.push(format!(", {column} = ")).push_bind(now_ms);
                    b.push(" WHERE id = ").push_bind(id).push(" AND status IN ('finalizing', 'cancelling')");
                    let done = b.build().execute(&mut *tx).await?;
                    tx.commit().await?;
                    Ok(done.rows_affected() > 0)
                })
            }
        }

        impl DeliveryRepo for $store {
            fn enqueue_delivery<'a>(&'a self, d: &'a DeliveryRecord) -> BoxFuture<'a, Result<(), StoreError>> {
                Box::pin(async move {
                    let mut b = QueryBuilder::<$db>::new(format!("INSERT INTO webhook_deliveries ({DELIVERY_COLUMNS}) "));
                    b.push_values(std::iter::once(d), |mut row, d| {
                        row.push_bind(&d.id)
                            .push_bind(&d.batch_id)
                            .push_bind(&d.url)
                            .push_bind(&d.secret)
                            .push_bind(&d.body)
                            .push_bind(d.attempts)
                            .push_bind(d.max_attempts)
                            .push_bind(d.next_at_ms)
                            .push_bind(&d.state);
                    });
                    b.push(" ON CONFLICT (id) DO NOTHING");
                    b.build().execute(&self.pool).await?;
                    Ok(())
                })
            }

            fn claim_deliveries<'a>(
                &'a self,
                owner: &'a str,
                now_ms: i64,
                lease_until_ms: i64,
                limit: i64,
            ) -> BoxFuture<'a, Result<Vec<DeliveryRecord>, StoreError>> {
                Box::pin(async move {
                    let due = $q(crate::batch_sql::DELIVERIES_DUE_SQL);
                    let due: Option<(i32,)> = sqlx::query_as(&due).bind(now_ms).bind(now_ms).fetch_optional(&self.pool).await?;
                    if due.is_none() {
                        return Ok(Vec::new());
                    }
                    let claimed = sqlx::query_as($claim_deliveries)
                        .bind(owner)
                        .bind(lease_until_ms)
                        .bind(now_ms)
                        .bind(now_ms)
                        .bind(limit)
                        .fetch_all(&self.pool)
                        .await?;
                    Ok(claimed)
                })
            }

            fn finish_delivery<'a>(
                &'a self,
                id: &'a str,
                owner: &'a str,
                state: &'a str,
                attempts: i64,
                next_at_ms: i64,
            ) -> BoxFuture<'a, Result<bool, StoreError>> {
                Box::pin(async move {
                    let sql = $q("UPDATE webhook_deliveries SET state = ?, attempts = ?, next_at_ms = ?, owner = NULL, lease_until_ms = 0 \
                         WHERE id = ? AND owner = ?");
                    let done = sqlx::query(&sql).bind(state).bind(attempts).bind(next_at_ms).bind(id).bind(owner).execute(&self.pool).await?;
                    Ok(done.rows_affected() > 0)
                })
            }

            fn get_delivery<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<DeliveryRecord>, StoreError>> {
                Box::pin(async move {
                    let mut b = QueryBuilder::<$db>::new(format!("SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE id = "));
                    b.push_bind(id);
                    Ok(b.build_query_as().fetch_optional(&self.pool).await?)
                })
            }
        }
    };
}

pub(crate) use batch_repos;
