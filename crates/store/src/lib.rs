//! Marga's persistence: repository traits per aggregate and their SQL implementations.
//!
//! Architecture invariant: this is the only crate that contains SQL. The gateway sees
//! repository traits ([`SettingsRepo`], [`GenerationRepo`], [`UsageRepo`], [`ChainRepo`],
//! [`AccountRepo`], [`LedgerRepo`], [`MemberRepo`], [`RateRepo`], [`FileRepo`], [`BatchRepo`],
//! [`DeliveryRepo`], all of them together as [`Repos`]) and plain record structs; which database
//! sits behind them is decided once, at start, by [`open`]: SQLite ([`SqliteStore`], embedded,
//! the default) or Postgres ([`PgStore`], for several instances sharing one database).

mod accounts;
mod batch;
mod batch_sql;
mod health;
mod members;
mod postgres;
mod rates;
mod record;
mod sql;
mod sqlite;
mod usage;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

pub use accounts::{
    AccountRepo, Charge, GuardrailRecord, KeyRecord, LeaseRecord, LedgerEntry, LedgerRepo, MemberRecord, OrgRecord,
    WorkspaceRecord,
};
pub use batch::{
    BatchRecord, LANE_NATIVE, LANE_REALTIME, BatchRepo, ClaimedItem, DeliveryRecord, DeliveryRepo, FileRecord, FileRepo, ItemResult, NewItem,
    BATCH_TIME_COLUMNS,
};
pub use postgres::PgStore;
pub use health::{HealthRepo, RouteHealthRecord};
pub use members::{GuardrailMemberRecord, MemberChange, MemberRepo, MAX_MEMBERS};
pub use rates::{RateClaim, RateGrant, RateRepo};
pub use record::{ChainRecord, GenerationRecord};
pub use sqlite::SqliteStore;
pub use usage::{EventsPage, ModelTokens, RouteStats, UsageGroup, UsageQuery, UsageRepo, UsageRow};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Only the scheme is kept: the rest of a URL may hold a password.
    #[error("unsupported database URL scheme `{scheme}` (expected postgres:// or postgresql://)")]
    UnsupportedDatabaseUrl { scheme: String },
}

/// Small operator settings (the master key's hash, …).
pub trait SettingsRepo: Send + Sync {
    fn get_setting<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, StoreError>>;
    fn put_setting<'a>(&'a self, key: &'a str, value: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// The request log: one record per request, written in batches.
pub trait GenerationRepo: Send + Sync {
    /// Inserts the records in one transaction; a record whose id exists is skipped.
    fn insert_generations<'a>(&'a self, records: &'a [GenerationRecord]) -> BoxFuture<'a, Result<(), StoreError>>;
    fn get_generation<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<GenerationRecord>, StoreError>>;
    fn count_generations(&self) -> BoxFuture<'_, Result<u64, StoreError>>;
}

/// Saved fallback chains (steps as JSON, owned by the gateway).
pub trait ChainRepo: Send + Sync {
    fn list_chains(&self) -> BoxFuture<'_, Result<Vec<ChainRecord>, StoreError>>;
    fn put_chain<'a>(&'a self, chain: &'a ChainRecord) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Returns whether a chain was deleted.
    fn delete_chain<'a>(&'a self, org_id: &'a str, model: &'a str) -> BoxFuture<'a, Result<bool, StoreError>>;
}

/// Every repository, as one object: what [`open`] returns. `Arc<dyn Repos>` coerces to
/// `Arc<dyn SettingsRepo>`, `Arc<dyn LedgerRepo>`, … (trait upcasting, Rust 1.86+).
pub trait Repos:
    SettingsRepo
    + GenerationRepo
    + UsageRepo
    + ChainRepo
    + AccountRepo
    + LedgerRepo
    + HealthRepo
    + MemberRepo
    + RateRepo
    + FileRepo
    + BatchRepo
    + DeliveryRepo
    + Send
    + Sync
{
}

impl<T> Repos for T where
    T: SettingsRepo
        + GenerationRepo
        + UsageRepo
        + ChainRepo
        + AccountRepo
        + LedgerRepo
        + HealthRepo
        + MemberRepo
        + RateRepo
        + FileRepo
        + BatchRepo
        + DeliveryRepo
        + Send
        + Sync
        + ?Sized
{
}

/// Opens the configured database, migrated: Postgres when `database_url` is a
/// `postgres://` or `postgresql://` URL, otherwise (`None` or empty) SQLite in `data_dir`.
/// Any other URL is an error rather than a silent fallback to SQLite.
pub async fn open(database_url: Option<&str>, data_dir: &Path) -> Result<Arc<dyn Repos>, StoreError> {
    match database_url.map(str::trim).filter(|url| !url.is_empty()) {
        None => Ok(Arc::new(SqliteStore::open(data_dir).await?)),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Ok(Arc::new(PgStore::connect(url).await?))
        }
        Some(url) => {
            let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
            Err(StoreError::UnsupportedDatabaseUrl {
                scheme: scheme.chars().take(32).collect(),
            })
        }
    }
}
