//! [`App`]: builds every component from a [`Config`], binds the listeners, and runs until a
//! shutdown signal, then drains in-flight requests and flushes the request log and the ledger.
//! Requests are served by the threads of [`crate::serving`]; the writers and other background
//! tasks run on the runtime that calls [`App::run_until_stopped`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use marga_store::Repos;
use tokio::task::JoinHandle;

use crate::accounts::Accounts;
use crate::admission::Admission;
use crate::auth::MasterKey;
use crate::batch::Batches;
use crate::budget::SpendTracker;
use crate::config::Config;
use crate::http::{router, AppState, ModelPages, Shared, UsageState};
use crate::ledger::Ledger;
use crate::limits::{LimitDefaults, Limiter};
use crate::registry::Registry;
use crate::request_log::RequestLog;
use crate::routing::chains::SavedChains;
use crate::routing::Routing;
use crate::serving::{Listeners, Serving};

/// A gateway, bound and ready to serve.
pub struct App {
    listeners: Listeners,
    router: axum::Router,
    /// The serving threads' timer anchor period ([`crate::serving::timer_anchor_period`]).
    timer_anchor: std::time::Duration,
    log_writer: JoinHandle<()>,
    ledger_writer: JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
    master_key: MasterKey,
    store: Arc<dyn Repos>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] marga_store::StoreError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    #[error(transparent)]
    Chains(#[from] crate::routing::chains::ChainError),
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    #[error("cannot create the data directory: {source}")]
    DataDir {
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    SecretsKey(#[from] crate::secrets::KeyFileError),
    #[error("cannot open the request log's spill file: {source}")]
    RequestLog {
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl App {
    /// Opens the store (SQLite in `data_dir`, or Postgres at `database_url`), builds providers
    /// and models, and binds `config.listen` (port 0 picks a free port: see [`App::port`]).
    pub async fn build(config: Config, master_key_from_env: Option<String>) -> Result<App, StartError> {
        let store = marga_store::open(config.database_url.as_deref(), &config.data_dir).await?;
        let (master_hash, master_key) = crate::auth::establish(store.as_ref(), master_key_from_env.as_deref()).await?;
        // The recorder first: routes register their metric handles when they are built.
        let prometheus = crate::telemetry::prometheus();
        let registry = Arc::new(Registry::build(&config)?);
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir { source })?;
        let secrets_key = crate::secrets::load_or_create(config.secrets_key.clone(), &config.data_dir)?;
        let spill = config.data_dir.join("requests.spill");
        let (log, log_writer) = RequestLog::start(store.clone(), &config.log, Some(&spill))
            .map_err(|source| StartError::RequestLog { source })?;
        let chains = SavedChains::load(store.clone()).await?;
        let accounts = Arc::new(Accounts::start(store.clone(), master_hash, &config.billing.default_org_currency).await?);
        let lease_ttl = Duration::from_secs(config.billing.lease_ttl_s);
        let commit_interval = Duration::from_millis(config.billing.commit_interval_ms);
        let journal = config.data_dir.join("charges.journal");
        // A journal lane per serving thread, and one for the background threads (batches).
        let lanes = config.server.serving_threads() + 1;
        let (ledger, ledger_writer) = Ledger::start(store.clone(), lease_ttl, Some((&journal, lanes)), commit_interval).await?;
        let health_sync = crate::routing::shared::HealthSync::new(store.clone(), &registry).spawn();
        let mut background = vec![accounts.spawn_refresher(), ledger.spawn_renewer(), health_sync];
        background.extend(prometheus.clone().map(crate::telemetry::spawn_upkeep));
        // Several instances share Postgres: request counts are global. SQLite: one instance,
        // counted in memory.
        let limiter = if config.database_url.as_deref().is_some_and(|url| !url.trim().is_empty()) {
            background.push(crate::limits::spawn_pruner(store.clone()));
            Limiter::shared(store.clone())
        } else {
            Limiter::local()
        };
        let admission = Admission {
            accounts,
            spend: SpendTracker::new(store.clone()),
            ledger,
            limiter,
            defaults: LimitDefaults {
                key_rpm: config.limits.default_key_rpm,
                ip_rpm: config.limits.ip_rpm,
                trial_rpm: config.limits.trial_rpm,
                trial_daily: config.limits.trial_daily,
            },
            trial_keys: config.billing.trial_keys,
            fx: config.fx.clone(),
        };
        let secret = crate::batch::artifact_secret(store.as_ref()).await?;
        let allow_private = config.security.allow_private_webhook_targets;
        let batches = Batches::new(store.clone(), &config.data_dir, config.batch.clone(), secret, allow_private)
            .map_err(|source| StartError::DataDir { source })?;
        let state = AppState::new(Shared {
            model_pages: Arc::new(ModelPages::render(&registry)),
            usage: Arc::new(UsageState::new(store.clone())),
            registry,
            admission: Arc::new(admission),
            log,
            routing: Arc::new(Routing::new(config.routing.clone(), chains)),
            prometheus,
            max_body: config.server.max_body_bytes,
            batches: Arc::new(batches),
            secrets: Arc::new(crate::secrets::Secrets::new(&secrets_key)),
        });
        let mut background = background;
        if config.batch.worker {
            background.extend(crate::batch::worker::Worker::spawn(state.clone()));
        }
        let listeners = Listeners::bind(config.listen, config.server.serving_threads())
            .map_err(|source| StartError::Bind { addr: config.listen, source })?;
        let timer_anchor = crate::serving::timer_anchor_period(config.routing.first_token_timeout);
        Ok(App { listeners, router: router(state), timer_anchor, log_writer, ledger_writer, background, master_key, store })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listeners.local_addr()
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    /// What start-up decided about the master key (a generated key is shown once, by `main`).
    pub fn master_key(&self) -> &MasterKey {
        &self.master_key
    }

    /// The store, for tests that inspect what was written.
    pub fn store(&self) -> Arc<dyn Repos> {
        self.store.clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests finish
    /// and flushes the request log and the ledger before returning.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        let App { listeners, router, timer_anchor, log_writer, ledger_writer, background, .. } = self;
        let mut serving = Serving::start(listeners, router, timer_anchor)?;
        let served = serving.drain(shutdown).await;
        for task in background {
            task.abort();
        }
        for (name, task) in [("request log", log_writer), ("ledger", ledger_writer)] {
            match tokio::time::timeout(Duration::from_secs(10), task).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "{name} writer failed"),
                Err(_) => tracing::error!("{name} writer did not finish within 10 s"),
            }
        }
        serving.end().await;
        served
    }
}
