//! Postgres: for several gateway instances sharing one database.
//!
//! Atomicity across connections and processes comes from row locks: `open_lease` locks the
//! org's row before it checks and inserts, so concurrent lease openings for one org queue up
//! behind each other while everything else (charges, top-ups, other orgs) proceeds.

mod accounts;
mod batch;
mod generations;
mod health;
mod ledger;
mod members;
mod rates;
mod usage;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::{BoxFuture, SettingsRepo, StoreError};

/// Connections in the pool of one instance.
const MAX_CONNECTIONS: u32 = 10;

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// This instance's row of each organisation in `org_balances` (see `ledger.rs`).
    balance_shard: i32,
}

/// How many rows per organisation `org_balances` may have on Postgres.
const BALANCE_SHARDS: u32 = 16;

/// A shard for this store: spread over instances by their process id and start time, so that
/// instances charging one organisation at the same time seldom add to the same row.
fn pick_balance_shard() -> i32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    ((std::process::id() ^ nanos) % BALANCE_SHARDS) as i32
}

impl PgStore {
    /// Connects to `url` (`postgres://user:password@host:port/database`) and applies the
    /// migrations in `migrations/postgres`.
    ///
    /// Several instances may start at once: sqlx's migrator (sqlx-core 0.8.6,
    /// `Migrator::run_direct`) first takes a session-level Postgres advisory lock,
    /// `pg_advisory_lock(id)` with `id` derived from the database name (sqlx-postgres
    /// `migrate.rs`, `PgConnection::lock`), and holds it while it creates `_sqlx_migrations`,
    /// reads what was applied and applies the rest (each migration in its own transaction).
    /// A second instance blocks on the lock, then finds everything applied. If a migration
    /// fails, its connection is dropped with the pool, which releases the lock.
    pub async fn connect(url: &str) -> Result<PgStore, StoreError> {
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(PgStore { pool, balance_shard: pick_balance_shard() })
    }

    /// Closes the pool's connections (waiting for those in use to be returned).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

impl SettingsRepo for PgStore {
    fn get_setting<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, StoreError>> {
        Box::pin(async move {
            let row: Option<(String,)> = sqlx::query_as("SELECT value FROM settings WHERE key = $1")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?;
            Ok(row.map(|(v,)| v))
        })
    }

    fn put_setting<'a>(&'a self, key: &'a str, value: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await?;
            Ok(())
        })
    }
}
