//! Configuration: the bundled catalog, the operator's TOML file on top of it, the environment,
//! and the command line, resolved into one validated [`Config`].
//!
//! Parse, then validate, then build: `load` never panics, and every error names the file, the
//! key and what is wrong.

mod env;
mod observability;
mod schema;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rust_decimal::Decimal;
use thiserror::Error;

pub use observability::{LogConfig, LogFormat, TelemetryConfig};
pub use schema::{
    BatchSettings, BillingSettings, LimitSettings, ModelConfig, ModelType, ProviderConfig, RouteConfig, SecuritySettings,
};

/// The catalog of real providers and models compiled into the binary.
pub const BUNDLED_CATALOG: &str = include_str!("../../catalog/catalog.toml");
const CATALOG_NAME: &str = "<bundled catalog>";

/// Everything the gateway needs to start, validated.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Postgres URL (several instances share it), or `None` for the embedded SQLite.
    pub database_url: Option<String>,
    pub server: schema::ServerSettings,
    /// `[log]`: the request log's writer and the log format.
    pub log: LogConfig,
    /// `[telemetry]`: OpenTelemetry export.
    pub telemetry: TelemetryConfig,
    pub billing: BillingSettings,
    pub limits: LimitSettings,
    pub batch: schema::BatchSettings,
    pub security: schema::SecuritySettings,
    /// The key that seals stored secrets, when configured (`None`: the key file under
    /// `data_dir`, SQLite only).
    pub secrets_key: Option<crate::secrets::SecretsKey>,
    pub routing: RoutingSettings,
    pub fx: crate::money::Fx,
    pub providers: BTreeMap<String, ProviderConfig>,
    pub models: BTreeMap<String, ModelConfig>,
}

/// Timeouts and retry limits of the attempt loop.
#[derive(Clone, Debug)]
pub struct RoutingSettings {
    pub connect_timeout: Duration,
    /// From sending the request to the first content token (or the whole answer when not
    /// streaming); past it the attempt fails over.
    pub first_token_timeout: Duration,
    /// Longest silence between two chunks of a stream once it has started.
    pub stream_idle_timeout: Duration,
    /// The whole request, all attempts included.
    pub total_timeout: Duration,
    /// The most routes one request tries.
    pub max_attempts: usize,
    /// Used when a request names no strategy.
    pub default_strategy: crate::routing::Strategy,
    /// One request in this many ranked by latency or throughput explores a route without
    /// recent measurements (0: never).
    pub explore_every: u64,
    pub breaker: crate::routing::BreakerSettings,
    /// Retries may add at most this percentage of first attempts…
    pub retry_budget_percent: u64,
    /// …plus this many per second.
    pub retry_budget_min_per_s: u64,
}

/// What the command line and environment say (they win over the file).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub config_file: Option<PathBuf>,
    pub database_url: Option<String>,
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {source}")]
    Parse {
        file: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("{file}: `{key}`: {message}")]
    Invalid { file: String, key: String, message: String },
}

fn invalid(file: &str, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { file: file.to_owned(), key: key.into(), message: message.into() }
}

impl Config {
    /// Loads the configuration with the process environment.
    pub fn load(overrides: Overrides) -> Result<Config, ConfigError> {
        Config::load_with_env(overrides, &|name| std::env::var(name).ok())
    }

    /// Loads the configuration with `lookup` standing in for the environment.
    pub fn load_with_env(
        overrides: Overrides,
        lookup: &impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let (file_name, user) = match &overrides.config_file {
            Some(path) => (path.display().to_string(), read_table(path)?),
            None => ("<no config file>".to_owned(), toml::Table::new()),
        };
        let catalog = parse_table(CATALOG_NAME, BUNDLED_CATALOG)?;
        let top: schema::TopLevel = toml::Value::Table(user.clone())
            .try_into()
            .map_err(|source| ConfigError::Parse { file: file_name.clone(), source })?;
        let providers = merge_providers(&catalog, &user, &file_name, lookup)?;
        let models = merge_models(&catalog, &user, &providers, &file_name)?;
        let routing = top.routing.resolve(&file_name)?;
        let fx = top.fx.resolve(&file_name)?;
        let log = top.log.resolve(&top.server, &file_name, lookup)?;
        let telemetry = top.telemetry.resolve(&file_name, lookup)?;
        let listen = match overrides.listen {
            Some(addr) => addr,
            None => parse_listen(top.listen.as_deref(), &file_name)?,
        };
        let data_dir = overrides.data_dir.or(top.data_dir).unwrap_or_else(|| PathBuf::from("./marga-data"));
        let database_url = overrides.database_url.or(top.database_url).filter(|u| !u.is_empty());
        if let Some(url) = &database_url {
            if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
                return Err(invalid(&file_name, "database_url", "must be a postgres:// URL (omit it for SQLite)"));
            }
        }
        let mut security = top.security;
        let secrets_key = secrets_key(security.secrets_key.take(), database_url.is_some(), &file_name, lookup)?;
        if top.server.threads > schema::MAX_SERVING_THREADS {
            let message = format!("must be at most {} (0: one per CPU core)", schema::MAX_SERVING_THREADS);
            return Err(invalid(&file_name, "server.threads", message));
        }
        if top.server.upstream_idle_connections > schema::MAX_UPSTREAM_IDLE_CONNECTIONS {
            let message = format!("must be at most {}", schema::MAX_UPSTREAM_IDLE_CONNECTIONS);
            return Err(invalid(&file_name, "server.upstream_idle_connections", message));
        }
        if !schema::LEASE_TTL_S.contains(&top.billing.lease_ttl_s) {
            let (low, high) = schema::LEASE_TTL_S.into_inner();
            return Err(invalid(&file_name, "billing.lease_ttl_s", format!("must be between {low} and {high}")));
        }
        if !(1..=schema::MAX_COMMIT_INTERVAL_MS).contains(&top.billing.commit_interval_ms) {
            let message = format!("must be between 1 and {}", schema::MAX_COMMIT_INTERVAL_MS);
            return Err(invalid(&file_name, "billing.commit_interval_ms", message));
        }
        if top.billing.default_org_currency.parse::<crate::money::Currency>().is_err() {
            return Err(invalid(&file_name, "billing.default_org_currency", "must be USD or INR"));
        }
        Ok(Config {
            listen,
            data_dir,
            database_url,
            server: top.server,
            log,
            telemetry,
            billing: top.billing,
            limits: top.limits,
            batch: top.batch,
            security,
            secrets_key,
            routing,
            fx,
            providers,
            models,
        })
    }
}

/// `MARGA_SECRETS_KEY`, or else `[security] secrets_key` with `${VAR}` expanded; required
/// with Postgres, where every instance must open what another sealed.
fn secrets_key(
    from_file: Option<String>,
    postgres: bool,
    file: &str,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<Option<crate::secrets::SecretsKey>, ConfigError> {
    const KEY: &str = "security.secrets_key";
    let env_name = crate::secrets::KEY_ENV;
    let (text, source) = match lookup(env_name).filter(|v| !v.trim().is_empty()) {
        Some(value) => (Some(value), env_name),
        None => {
            let expanded = from_file
                .map(|raw| env::expand(&raw, lookup))
                .transpose()
                .map_err(|name| invalid(file, KEY, format!("the environment variable `{name}` is not set")))?;
            (expanded.filter(|v| !v.trim().is_empty()), file)
        }
    };
    match text {
        Some(text) => crate::secrets::SecretsKey::parse(&text).map(Some).map_err(|e| invalid(source, KEY, e.to_string())),
        None if postgres => Err(invalid(
            file,
            KEY,
            format!("required with a Postgres `database_url`: set {env_name} (the same key on every instance; e.g. `openssl rand -base64 32`)"),
        )),
        None => Ok(None),
    }
}

fn parse_listen(value: Option<&str>, file: &str) -> Result<SocketAddr, ConfigError> {
    value
        .unwrap_or("127.0.0.1:8080")
        .parse()
        .map_err(|e| invalid(file, "listen", format!("not a socket address: {e}")))
}

fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { file: file.clone(), source })?;
    parse_table(&file, &text)
}

fn parse_table(file: &str, text: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>().map_err(|source| ConfigError::Parse { file: file.to_owned(), source })
}

fn section<'a>(table: &'a toml::Table, name: &str) -> Option<&'a toml::Table> {
    table.get(name).and_then(toml::Value::as_table)
}

/// `over` laid on `base`: tables merge key by key, anything else is replaced.
fn deep_merge(base: &mut toml::Table, over: &toml::Table) {
    for (key, value) in over {
        match (base.get_mut(key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => deep_merge(b, o),
            _ => {
                base.insert(key.clone(), value.clone());
            }
        }
    }
}

/// Catalog providers whose `${VAR}`s are all set, plus every provider of the user's file
/// (merged over the catalog entry of the same id). An unset variable in the user's file is an
/// error; in the catalog it just leaves that provider out.
fn merge_providers(
    catalog: &toml::Table,
    user: &toml::Table,
    file: &str,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<BTreeMap<String, ProviderConfig>, ConfigError> {
    let empty = toml::Table::new();
    let from_catalog = section(catalog, "providers").unwrap_or(&empty);
    let from_user = section(user, "providers").unwrap_or(&empty);
    let ids: BTreeSet<&String> = from_catalog.keys().chain(from_user.keys()).collect();
    let mut providers = BTreeMap::new();
    for id in ids {
        let mut merged = from_catalog.get(id).and_then(toml::Value::as_table).cloned().unwrap_or_default();
        let user_entry = from_user.get(id);
        if let Some(over) = user_entry {
            let over = over.as_table().ok_or_else(|| invalid(file, format!("providers.{id}"), "must be a table"))?;
            deep_merge(&mut merged, over);
        }
        let source = if user_entry.is_some() { file } else { CATALOG_NAME };
        let mut value = toml::Value::Table(merged);
        match env::expand_value(&mut value, &format!("providers.{id}"), lookup) {
            Ok(()) => {}
            Err(_) if user_entry.is_none() => continue,
            Err((key, name)) => {
                return Err(invalid(file, key, format!("environment variable {name} is not set")));
            }
        }
        let provider: ProviderConfig = value
            .try_into()
            .map_err(|e: toml::de::Error| invalid(source, format!("providers.{id}"), e.message().to_owned()))?;
        provider.validate().map_err(|(key, message)| invalid(source, format!("providers.{id}.{key}"), message))?;
        providers.insert(id.clone(), provider);
    }
    Ok(providers)
}

/// Catalog models merged with the user's; routes to providers that are not enabled are left
/// out, and models left with no route are dropped. A route naming an unknown provider is an
/// error (a typo is not silently ignored).
fn merge_models(
    catalog: &toml::Table,
    user: &toml::Table,
    providers: &BTreeMap<String, ProviderConfig>,
    file: &str,
) -> Result<BTreeMap<String, ModelConfig>, ConfigError> {
    let empty = toml::Table::new();
    let from_catalog = section(catalog, "models").unwrap_or(&empty);
    let from_user = section(user, "models").unwrap_or(&empty);
    let known: BTreeSet<String> = known_provider_ids(catalog, user);
    let ids: BTreeSet<&String> = from_catalog.keys().chain(from_user.keys()).collect();
    let mut models = BTreeMap::new();
    for id in ids {
        let mut merged = from_catalog.get(id).and_then(toml::Value::as_table).cloned().unwrap_or_default();
        let source = if from_user.contains_key(id) { file } else { CATALOG_NAME };
        if let Some(over) = from_user.get(id) {
            let over = over.as_table().ok_or_else(|| invalid(file, format!("models.{id}"), "must be a table"))?;
            deep_merge(&mut merged, over);
        }
        let mut model: ModelConfig = toml::Value::Table(merged)
            .try_into()
            .map_err(|e: toml::de::Error| invalid(source, format!("models.\"{id}\""), e.message().to_owned()))?;
        model.validate().map_err(|(key, message)| invalid(source, format!("models.\"{id}\".{key}"), message))?;
        if let Some(route) = model.routes.iter().find(|r| !known.contains(&r.provider)) {
            let message = format!("route names unknown provider `{}`", route.provider);
            return Err(invalid(source, format!("models.\"{id}\".routes"), message));
        }
        model.routes.retain(|r| providers.contains_key(&r.provider));
        check_batch_prices(&model, id, providers, source)?;
        if !model.routes.is_empty() {
            models.insert(id.clone(), model);
        }
    }
    check_aliases(&models, file)?;
    Ok(models)
}

/// Batch prices only on routes whose provider has a native batch API.
fn check_batch_prices(
    model: &ModelConfig,
    id: &str,
    providers: &BTreeMap<String, ProviderConfig>,
    file: &str,
) -> Result<(), ConfigError> {
    for (i, route) in model.routes.iter().enumerate() {
        let Some(provider) = providers.get(&route.provider) else { continue };
        if route.batch_input_per_mtok.is_some() && !provider.kind.has_native_batch() {
            let message = format!("provider `{}` ({} kind) has no native batch API", route.provider, provider.kind.as_str());
            return Err(invalid(file, format!("models.\"{id}\".routes[{i}].batch_input_per_mtok"), message));
        }
    }
    Ok(())
}

fn known_provider_ids(catalog: &toml::Table, user: &toml::Table) -> BTreeSet<String> {
    [catalog, user]
        .into_iter()
        .filter_map(|t| section(t, "providers"))
        .flat_map(|t| t.keys().cloned())
        .collect()
}

/// No alias may shadow a model id or another alias.
fn check_aliases(models: &BTreeMap<String, ModelConfig>, file: &str) -> Result<(), ConfigError> {
    let mut seen: BTreeMap<&str, &str> = models.keys().map(|id| (id.as_str(), id.as_str())).collect();
    for (id, model) in models {
        for alias in &model.aliases {
            if let Some(owner) = seen.insert(alias, id) {
                let message = format!("alias `{alias}` is already used by `{owner}`");
                return Err(invalid(file, format!("models.\"{id}\".aliases"), message));
            }
        }
    }
    Ok(())
}

/// A decimal from a config string, refusing negatives.
pub(crate) fn parse_price(value: &str) -> Result<Decimal, String> {
    let d: Decimal = value.trim().parse().map_err(|_| format!("`{value}` is not a decimal number"))?;
    if d.is_sign_negative() {
        return Err(format!("`{value}` is negative"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests;
