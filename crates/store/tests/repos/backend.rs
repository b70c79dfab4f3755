//! The backends a case runs on: [`Ctx`] over a fresh SQLite directory or a fresh Postgres
//! database (dropped when the case ends), and how the Postgres URL is derived.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use marga_store::Repos;
use sqlx::{Connection, PgConnection};

const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

pub(crate) struct Ctx {
    pub(crate) repos: Arc<dyn Repos>,
    backend: Backend,
}

enum Backend {
    Sqlite(tempfile::TempDir),
    Postgres(PgDatabase),
}

impl Ctx {
    pub(crate) async fn sqlite() -> Ctx {
        let dir = tempfile::tempdir().unwrap();
        let repos = marga_store::open(None, dir.path()).await.unwrap();
        Ctx {
            repos,
            backend: Backend::Sqlite(dir),
        }
    }

    /// `None` (after printing why) when Postgres is unreachable and not required.
    pub(crate) async fn postgres() -> Option<Ctx> {
        let admin_url = std::env::var("MARGA_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_owned());
        let required = std::env::var("MARGA_TEST_POSTGRES").is_ok_and(|v| v == "1");
        let mut admin = match tokio::time::timeout(Duration::from_secs(5), PgConnection::connect(&admin_url)).await {
            Ok(Ok(conn)) => conn,
            failure => {
                let why = match failure {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_owned(),
                };
                if required {
                    panic!("MARGA_TEST_POSTGRES=1 but Postgres is unreachable at MARGA_TEST_POSTGRES_URL: {why}");
                }
                // Straight to stderr (libtest captures `eprintln!` of passing tests), once.
                static NOTE: std::sync::Once = std::sync::Once::new();
                NOTE.call_once(|| {
                    let _ = writeln!(
                        std::io::stderr(),
                        "note: skipping the Postgres cases: cannot connect ({why}); MARGA_TEST_POSTGRES=1 makes this fail"
                    );
                });
                return None;
            }
        };
        let name = format!("marga_test_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        let _ = admin.close().await;
        let db = PgDatabase {
            url: with_database(&admin_url, &name),
            admin_url,
            name,
        };
        let repos = marga_store::open(Some(&db.url), std::path::Path::new("/nonexistent"))
            .await
            .unwrap();
        Some(Ctx {
            repos,
            backend: Backend::Postgres(db),
        })
    }

    /// A second store over the same database (as another instance, or after a restart).
    pub(crate) async fn reopen(&self) -> Arc<dyn Repos> {
        match &self.backend {
            Backend::Sqlite(dir) => marga_store::open(None, dir.path()).await.unwrap(),
            Backend::Postgres(db) => marga_store::open(Some(&db.url), std::path::Path::new("/nonexistent"))
                .await
                .unwrap(),
        }
    }
}

/// A test database, dropped (connections and all) when the case ends, even by a panic.
struct PgDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        // Drop runs inside the test's runtime: do the async work on a thread of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let mut admin = PgConnection::connect(&admin_url).await?;
                sqlx::query(&sql).execute(&mut admin).await?;
                admin.close().await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("note: could not drop test database {}", self.name);
        }
    }
}

/// `admin_url` with its database replaced by `name` (query string kept).
pub(crate) fn with_database(admin_url: &str, name: &str) -> String {
    let (scheme, rest) = admin_url.split_once("://").unwrap();
    let (rest, query) = match rest.split_once('?') {
        Some((rest, query)) => (rest, format!("?{query}")),
        None => (rest, String::new()),
    };
    let authority = rest.split_once('/').map_or(rest, |(authority, _)| authority);
    format!("{scheme}://{authority}/{name}{query}")
}
