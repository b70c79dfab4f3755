//! Fresh Postgres databases for the e2e suite: whether it runs on Postgres
//! ([`postgres_enabled`]), and [`TestDatabase`], a copy of a migrated template per test,
//! dropped with its last handle.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sqlx::{Connection, PgConnection};

use crate::helpers::files_under;

const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Whether the e2e suite runs on Postgres: `MARGA_E2E_POSTGRES=1`; when that variable is
/// unset, `MARGA_TEST_POSTGRES=1` (so `MARGA_E2E_POSTGRES=0` keeps a run whose store tests use
/// Postgres on SQLite here, as the Makefile's first pass does).
pub fn postgres_enabled() -> bool {
    match std::env::var("MARGA_E2E_POSTGRES") {
        Ok(v) => v == "1",
        Err(_) => std::env::var("MARGA_TEST_POSTGRES").is_ok_and(|v| v == "1"),
    }
}

/// Says once, on stderr (libtest captures `eprintln!` of passing tests), why a Postgres-only
/// test did nothing.
pub fn note_skipped(what: &str) {
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "note: {what}: skipped, it needs Postgres (set MARGA_E2E_POSTGRES=1 or MARGA_TEST_POSTGRES=1)"
    );
}

/// A fresh Postgres database for one test, dropped (with `FORCE`, connections and all) when
/// the last handle goes, even by a panic. Failing to drop it only prints a note.
pub struct TestDatabase {
    admin_url: String,
    pub name: String,
    /// Its URL, as `--database-url` / `Overrides::database_url`.
    pub url: String,
}

impl TestDatabase {
    /// Creates `marga_e2e_<uuid>`, a copy of the migrated template ([`template`]); panics when
    /// Postgres cannot be reached (the suite was asked to run on it).
    pub async fn create() -> TestDatabase {
        let admin_url = std::env::var("MARGA_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_owned());
        let template = TEMPLATE.get_or_init(|| template(&admin_url)).await;
        let mut admin = admin_connection(&admin_url).await;
        let name = format!("marga_e2e_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
            .execute(&mut admin)
            .await
            .expect("create the test database");
        let _ = admin.close().await;
        TestDatabase { url: with_database(&admin_url, &name), admin_url, name }
    }

    /// A fresh database when the suite runs on Postgres, else `None` (SQLite).
    pub async fn if_enabled() -> Option<Arc<TestDatabase>> {
        if postgres_enabled() {
            Some(Arc::new(TestDatabase::create().await))
        } else {
            None
        }
    }

    /// Every row of every table of the database, as text (`row::text`), prefixed by its table.
    pub async fn dump(&self) -> Vec<String> {
        let mut conn = PgConnection::connect(&self.url).await.expect("connect to the test database");
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT table_name::text FROM information_schema.tables \
             WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY 1",
        )
        .fetch_all(&mut conn)
        .await
        .expect("list tables");
        let mut rows = Vec::new();
        for table in tables {
            let sql = format!("SELECT t::text FROM \"{table}\" t");
            let texts: Vec<String> = sqlx::query_scalar(&sql).fetch_all(&mut conn).await.expect("read a table");
            rows.extend(texts.into_iter().map(|t| format!("{table}: {t}")));
        }
        let _ = conn.close().await;
        rows
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop may run inside a test's runtime: do the async work on a thread of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(drop_database(&admin_url, &name))
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("note: could not drop test database {}: {e}", self.name),
            Err(_) => eprintln!("note: could not drop test database {} (the dropping thread panicked)", self.name),
        }
    }
}

/// Drops `name`. `DROP DATABASE … WITH (FORCE)` alone waits in steps of 100 ms for the
/// backends it terminates (the app's pool is still open), so first refuse new connections,
/// terminate the open ones and wait for them here in small steps; `FORCE` stays as the
/// backstop.
async fn drop_database(admin_url: &str, name: &str) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut admin = PgConnection::connect(admin_url).await?;
    sqlx::query(&format!("ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false")).execute(&mut admin).await?;
    let others = "FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()";
    sqlx::query(&format!("SELECT pg_terminate_backend(pid) {others}")).bind(name).execute(&mut admin).await?;
    for _ in 0..500 {
        let left: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) {others}")).bind(name).fetch_one(&mut admin).await?;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut admin).await?;
    admin.close().await?;
    Ok(())
}

/// The migrated template every test database is copied from, once per test process.
static TEMPLATE: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();

async fn admin_connection(admin_url: &str) -> PgConnection {
    match tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(admin_url)).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => panic!("the e2e suite runs on Postgres but it is unreachable at MARGA_TEST_POSTGRES_URL: {e}"),
        Err(_) => panic!("the e2e suite runs on Postgres but connecting to MARGA_TEST_POSTGRES_URL timed out"),
    }
}

/// `marga_e2e_template_<hash of the Postgres migrations>`: a database with the migrations
/// applied, built when missing and kept, so that each test database is a cheap copy rather
/// than ~200 ms of migrations. Built under an advisory lock (concurrent test processes) as
/// `marga_e2e_building_<uuid>` and renamed when complete. Connections to it are refused:
/// `CREATE DATABASE … TEMPLATE` needs it idle.
async fn template(admin_url: &str) -> String {
    let name = format!("marga_e2e_template_{}", migrations_hash());
    let mut admin = admin_connection(admin_url).await;
    // Arbitrary, fixed: serialises template builds across processes.
    const LOCK: i64 = 0x6d61_7267_6165_3265;
    sqlx::query("SELECT pg_advisory_lock($1)").bind(LOCK).execute(&mut admin).await.expect("advisory lock");
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&name)
        .fetch_one(&mut admin)
        .await
        .expect("look for the template");
    if !exists {
        let building = format!("marga_e2e_building_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE {building}")).execute(&mut admin).await.expect("create the template");
        let store = marga_store::PgStore::connect(&with_database(admin_url, &building)).await.expect("migrate the template");
        store.close().await;
        publish_template(&mut admin, &building, &name).await;
    }
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)").bind(LOCK).execute(&mut admin).await;
    let _ = admin.close().await;
    name
}

/// Renames the freshly migrated `building` database to `name` and closes it to connections.
/// A closed pool's server sessions end asynchronously (a retry of 5 s was seen to be not
/// enough), so lingering sessions on `building` are terminated and the rename retried while
/// Postgres still counts them (55006 "being accessed by other users"). Templates of other
/// migrations are left alone: another test process (another branch) may be copying them.
async fn publish_template(admin: &mut PgConnection, building: &str, name: &str) {
    let rename = format!("ALTER DATABASE {building} RENAME TO {name}");
    let mut tries = 0;
    loop {
        match sqlx::query(&rename).execute(&mut *admin).await {
            Ok(_) => break,
            Err(e) if tries < 100 && e.as_database_error().and_then(|d| d.code()).as_deref() == Some("55006") => {
                tries += 1;
                let _ = sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
                    .bind(building)
                    .execute(&mut *admin)
                    .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("publish the template: {e}"),
        }
    }
    sqlx::query(&format!("ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false"))
        .execute(&mut *admin)
        .await
        .expect("close the template to connections");
}

/// A short hash of the store's Postgres migrations (names and contents).
fn migrations_hash() -> String {
    use sha2::{Digest, Sha256};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../store/migrations/postgres");
    let mut files: Vec<PathBuf> = files_under(&dir);
    files.sort();
    let mut hasher = Sha256::new();
    for file in files {
        hasher.update(file.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
        hasher.update(std::fs::read(&file).expect("read a migration"));
    }
    hex::encode(&hasher.finalize()[..8])
}

/// `admin_url` with its database replaced by `name` (query string kept).
fn with_database(admin_url: &str, name: &str) -> String {
    let (scheme, rest) = admin_url.split_once("://").expect("a URL");
    let (rest, query) = match rest.split_once('?') {
        Some((rest, query)) => (rest, format!("?{query}")),
        None => (rest, String::new()),
    };
    let authority = rest.split_once('/').map_or(rest, |(authority, _)| authority);
    format!("{scheme}://{authority}/{name}{query}")
}
