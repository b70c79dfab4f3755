//! SQLite: the embedded default. WAL mode, foreign keys on, a busy timeout, and migrations
//! applied at open.
//!
//! SQLite has one writer at a time. Transactions that read before they write (`open_lease`)
//! start with `BEGIN IMMEDIATE`, which takes the write lock up front (waiting up to the busy
//! timeout), so no other writer can slip in between their check and their write.

mod accounts;
mod batch;
mod generations;
mod health;
mod ledger;
mod members;
mod rates;
mod usage;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool, Transaction};

use crate::{BoxFuture, SettingsRepo, StoreError};

#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// One connection for every write transaction ([`SqliteStore::begin_write`]). SQLite lets
    /// one writer in at a time anyway; a connection's page cache is dropped whenever another
    /// connection has written since its last transaction, so with the request log and the
    /// ledger writing through different pool connections each batch re-read its B-tree pages.
    /// On one connection they stay cached, and writers queue here rather than in SQLite's
    /// busy handler.
    writer: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) `marga.db` in `data_dir` and migrates it.
    pub async fn open(data_dir: &Path) -> Result<SqliteStore, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.display().to_string(),
            source,
        })?;
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(data_dir.join("marga.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5))
            // Statement journals and sorts in memory: the writers' multi-row upserts each
            // opened, wrote and unlinked a temporary file (dozens a second under load).
            .pragma("temp_store", "memory");
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        let writer = SqlitePoolOptions::new().max_connections(1).connect_with(options).await?;
        Ok(SqliteStore { pool, writer })
    }

    /// A write transaction holding SQLite's write lock from its first statement, on the
    /// writer connection (nothing may begin another one while it is open).
    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }
}

impl SettingsRepo for SqliteStore {
    fn get_setting<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        Box::pin(async move {
            let row: Option<(String,)> = sqlx::query_as("SELECT value FROM settings WHERE key = ?")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?;
            Ok(row.map(|(v,)| v))
        })
    }

    fn put_setting<'a>(&'a self, key: &'a str, value: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            sqlx::query("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value")
                .bind(key)
                .bind(value)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::SqliteStore;

    /// Every connection, the writer's included, keeps temporary tables and statement journals
    /// in memory.
    #[tokio::test]
    async fn connections_keep_temporary_data_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).await.unwrap();
        for pool in [&store.pool, &store.writer] {
            let (mode,): (i64,) = sqlx::query_as("PRAGMA temp_store").fetch_one(pool).await.unwrap();
            assert_eq!(mode, 2, "2 = MEMORY");
        }
    }
}
